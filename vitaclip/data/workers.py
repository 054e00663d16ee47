"""Worker processes of the data tools: the loader's PyAV decoders, `prepare`'s encoders and the
probes of new videos run in processes forked by one fork server, so that a decoder crashing on a
damaged file (FFmpeg) ends a worker, never the caller, and no fork copies the caller's threads
(DALI, PyAV, CUDA) mid-lock."""
from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterator, List, Optional, Sequence

from ..engine.stopping import pool_worker_init, start_fork_server

# what the fork server imports once, for every worker it forks: torch and PyAV, and the loader's
# task code (the loader's workers unpickle it)
PRELOAD = ["vitaclip.data.loader"]
MAX_ALARM_S = 2**31 - 1  # the most signal.alarm takes (a C int); a longer timeout is none
WATCH_ALL_WORKERS_S = 1.0  # how often a wait on a pool's calls has it look at every worker (watch_all_workers)


def fork_server_context():
    """The multiprocessing context of the package's worker pools: processes forked by one fork
    server that has imported PRELOAD, so that a worker starts in milliseconds with one thread,
    whichever pool starts the server first (a server started without the import made every later
    pool's workers import torch themselves, seconds each, and left them unshielded from stop
    signals)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    start_fork_server()  # shielded from the job's stop signals, as the workers are
    return context


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes forked by the fork server, which end on the job's stop
    signals as any process does (the server ignores them)."""
    context = fork_server_context()  # (starts the server: pool_worker_init knows what it ignores)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=pool_worker_init())


def as_completed(pool, fn, calls: Iterator, in_flight: int, running: dict):
    """(key, args, future) of fn(*args) for each (key, args) taken from the iterator `calls`, as
    they finish. At most in_flight are submitted at a time, so that stopping early leaves no queue
    of work behind; `running` (future -> (key, args)) holds those not yet yielded: after a worker
    died, what was in flight (a broken pool's futures all end with BrokenProcessPool)."""
    while True:
        for key, args in itertools.islice(calls, in_flight - len(running)):
            try:
                future = pool.submit(fn, *args)
            except BrokenProcessPool as broken:  # kept with the others in flight, which share its fate
                future = Future()
                future.set_exception(broken)
            running[future] = (key, args)
        if not running:
            return
        finished, _ = wait(running, timeout=WATCH_ALL_WORKERS_S, return_when=FIRST_COMPLETED)
        if not finished:
            watch_all_workers(pool)
        for future in finished:
            yield (*running.pop(future), future)


def watch_all_workers(pool: ProcessPoolExecutor) -> None:
    """Has `pool`'s manager thread watch every worker the pool has recorded. It lists the workers
    to watch when it wakes, and a worker recorded later (the caller's thread records it just after
    starting it, which a loaded machine can delay by seconds) goes unwatched until it wakes again:
    had that worker crashed on the last call in flight, with the others idle, the call's future
    would never end and the job would hang. Waking it is what `submit` does."""
    lock, wakeup = getattr(pool, "_shutdown_lock", None), getattr(pool, "_executor_manager_thread_wakeup", None)
    if lock is not None and wakeup is not None:
        with lock:  # (the manager closes the wakeup under it)
            wakeup.wakeup()


def map_in_workers(calls: Sequence[tuple], workers: int, timeout: Optional[float] = None,
                   done: Callable[[], object] = lambda: None) -> List:
    """[fn(*args) for fn, *args in calls] run in up to `workers` worker processes, in order, with a
    BrokenProcessPool in the place of a call whose worker died, or ran past `timeout` seconds (a
    hang: the kernel ends the worker). A death fails every call in flight with it: those are run
    again one at a time, so that only the one at fault keeps the failure. Each fn reaches the
    workers by name: a module-level function. `done()` is called as each call ends (a progress
    bar's update)."""
    results: List = [None] * len(calls)
    pending = ((index, (timeout, *call)) for index, call in enumerate(calls))
    workers = max(1, min(workers, len(calls)))
    while True:
        pool = worker_pool(workers)
        running, current = {}, None
        try:
            for index, _, future in as_completed(pool, within, pending, 2 * workers, running):
                current = index
                results[index] = future.result()
                current = None
                done()
            pool.shutdown()
            return results
        except BrokenProcessPool:
            abandon(pool)  # a worker it started as it broke would keep the process from exiting
            check_workers_start()
            for index in ([current] if current is not None else []) + [i for i, _ in running.values()]:
                alone = run_alone(within, (timeout, *calls[index]))
                death = alone.exception()
                results[index] = death if isinstance(death, BrokenProcessPool) else alone.result()
                done()
        except BaseException:
            abandon(pool)
            raise


def within(timeout: Optional[float], fn: Callable, *args):
    """fn(*args) in a worker, which SIGALRM's default action ends if it takes more than `timeout`
    seconds: a hang in a decoder's C code, which no Python handler could interrupt, then fails as a
    crash does."""
    if timeout is None or not math.isfinite(timeout):
        return fn(*args)
    previous = signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(min(max(1, math.ceil(timeout)), MAX_ALARM_S))
    try:
        return fn(*args)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def abandon(pool: ProcessPoolExecutor) -> None:
    """End `pool` now: queued calls are cancelled and running ones killed with their workers (the
    tools' outputs appear whole or not at all), so that an error or Ctrl-C in the caller does not
    wait for them (an encode can take minutes; a hung one, until its timeout). Also how a broken
    pool ends: a worker that started while it broke waits for work that never comes, and Python's
    exit waits for the pool's thread, which waits for that worker."""
    # (ProcessPoolExecutor.kill_workers comes with Python 3.14)
    processes = getattr(pool, "_processes", None) or {}
    for process in list(processes.values()):
        process.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def check_workers_start() -> None:
    """Raises where no worker process can even start (e.g. a script without an `if __name__ ==
    "__main__":` guard, whose code each new process runs again): otherwise every call would be
    taken for one that crashed its worker, and every video named as at fault."""
    if isinstance(run_alone(os.getpid, ()).exception(), BrokenProcessPool):
        script = getattr(sys.modules["__main__"], "__file__", None)
        if script is not None and not os.path.isfile(script):  # `python - <<EOF`: '<stdin>'
            raise RuntimeError(f"worker processes cannot start: they import the main script again, and it is not a "
                               f"file ({script}): save it to a file, guarded by `if __name__ == \"__main__\":`")
        raise RuntimeError("worker processes cannot start: a script that makes a loader or runs `prepare` must do so "
                           "under `if __name__ == \"__main__\":` (each worker process imports the script again)")


def run_alone(fn: Callable, args: tuple) -> Future:
    """fn(*args) in a worker process of its own, done: its future ends with BrokenProcessPool if the
    worker died."""
    pool = worker_pool(1)
    try:
        future = pool.submit(fn, *args)
        wait([future])
        return future
    finally:
        pool.shutdown(wait=False)
