"""Stopping a training run early, on a signal, with a checkpoint.

Schedulers warn a job before they end it: SLURM sends SIGTERM at a time limit, preemption or
`scancel` (or the signal of `sbatch --signal=USR1@120` ahead of the limit), and torchrun passes
SIGTERM on to its workers, then waits about 30 s before killing them. The default action of
either signal ends the process at once, losing every step since the last checkpoint.
"""
from __future__ import annotations

import functools
import os
import select
import signal
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

DEFAULT_STOP_SIGNALS = ("SIGTERM", "SIGUSR1")
# SLURM signals every process of a job step and torchrun passes the signal on to its ranks: one
# stop can reach a rank twice within milliseconds
REPEAT_GRACE_S = 5.0
# the stop signals multiprocessing's fork server was started ignoring, which its workers inherit,
# and the process id of that server
_fork_server_ignores: set = set()
_fork_server_pid: List[Optional[int]] = [None]
# the job's stop signals, which the fork server ignores wherever it starts (loaders probe new videos
# in worker pools before training installs its StopRequest): the defaults and any declared
_job_stop_signals: set = {signal.Signals[name] for name in DEFAULT_STOP_SIGNALS}


def parse_signal(name: str) -> signal.Signals:
    """signal.Signals from "SIGTERM" or "TERM" (any case), one a process can catch."""
    # names only (not a settings file's 15, nor signal.SIGTERM): a run's checkpoints hold its settings,
    # read back with weights_only, which refuses a signal.Signals
    if not isinstance(name, str):
        raise ValueError(f"a stop signal is given by its signal name, e.g. 'SIGTERM', got {name!r}")
    key = name.strip().upper()
    key = key if key.startswith("SIG") else "SIG" + key
    try:
        sig = signal.Signals[key]
    except KeyError:
        raise ValueError(f"unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)") from None
    if sig in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"{sig.name} cannot be caught or ignored: give a signal the job can be warned with "
                         "(e.g. SIGTERM, SIGUSR1)")
    if sig in _NOT_A_WARNING:
        raise ValueError(f"{sig.name} is {_NOT_A_WARNING[sig]}, not a warning to stop: give e.g. SIGTERM or SIGUSR1")
    return sig


# signals the system sends for other reasons: taken as stops, they would end runs at random
_ORDINARY = "sent by the terminal or the kernel in ordinary work"
_FAULT = "a fault of the process itself, which a Python handler would return into for ever"
_NOT_A_WARNING = {
    signal.SIGCHLD: "sent whenever a child process ends (each data worker, each decoder)",
    signal.SIGWINCH: _ORDINARY, signal.SIGURG: _ORDINARY, signal.SIGCONT: _ORDINARY,
    signal.SIGSEGV: _FAULT, signal.SIGBUS: _FAULT, signal.SIGFPE: _FAULT, signal.SIGILL: _FAULT,
}


class StopRequest:
    """Once installed (in the main thread; elsewhere Python cannot take signals and it does
    nothing), the first of `signals` to arrive is remembered in `received` instead of ending the
    process, and so are repeats within `repeat_grace_s` of it (the same stop, told twice); a
    later one acts as it would have without this (by default, ends the process). `uninstall`
    puts back the previous handlers. While one is installed, `shield_workers` keeps its signals
    from this process's data-loading workers."""

    _installed: List["StopRequest"] = []

    def __init__(self, signals: Sequence[str], repeat_grace_s: float = REPEAT_GRACE_S,
                 clock: Callable[[], float] = time.monotonic):
        # once each: a second install of one ("TERM,SIGTERM") took this handler for the previous one
        self.signals = list(dict.fromkeys(parse_signal(name) for name in signals))
        self.repeat_grace_s, self._clock = repeat_grace_s, clock
        self.received: Optional[str] = None
        self._received_at = 0.0
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            StopRequest._installed.append(self)
            unshielded = [sig.name for sig in self.signals if sig not in _fork_server_ignores]
            if _fork_server_running() and unshielded:
                warnings.warn(f"the data workers' fork server started before {', '.join(unshielded)} were made stop "
                              f"signals: one of them would end it, and its workers would look dead to the loader; "
                              f"call vitaclip.engine.stopping.declare_stop_signals before making loaders, and before "
                              f"anything else starts multiprocessing's fork server")
        return self

    def uninstall(self) -> None:
        for sig in list(self._previous):
            self._restore(sig)
        if self in StopRequest._installed:
            StopRequest._installed.remove(self)

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if self.received is None:
            self.received, self._received_at = sig.name, self._clock()
        elif self._clock() - self._received_at > self.repeat_grace_s:
            self._restore(sig)
            signal.raise_signal(sig)

    def _restore(self, sig: signal.Signals) -> None:
        if sig in self._previous:
            previous = self._previous.pop(sig)
            # None: a handler set outside Python, which Python cannot put back; the default instead
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)


def ignore_signals(signals: Sequence[str]) -> None:
    """Ignore these signals from now on (in the main thread; elsewhere Python cannot)."""
    if threading.current_thread() is threading.main_thread():
        for name in signals:
            signal.signal(parse_signal(name), signal.SIG_IGN)


def declare_stop_signals(signals: Sequence[str]) -> None:
    """Make `signals` (besides the default ones) stop signals of this job for the fork server,
    which its first worker pool starts, maybe before training installs its StopRequest."""
    _job_stop_signals.update(parse_signal(name) for name in signals)


def installed_signals() -> List[signal.Signals]:
    """The signals of the installed stop requests."""
    return sorted({sig for request in StopRequest._installed for sig in request.signals})


def start_fork_server() -> None:
    """Start multiprocessing's fork server, if it is not running, ignoring the job's stop signals
    (the installed ones, the default ones and those declared). It is in the job's process group,
    and when a stop signal ends it, its live workers look dead to their owner, which learns of
    them through it: a DataLoader of them then fails the epoch the rank still needs for its last
    step. Whatever it ignores, it ends once its owner has and its workers with it (`_end_with`).
    Ignored here while it starts (a handler does not outlive exec, an ignored signal does; a
    blocked one does not, as Python starts), so a stop in those milliseconds is lost: it starts
    with the first worker pool, before the first step. Its workers inherit this: `shield_workers`
    gives a loader's workers their own handling, or, with no request installed, the default one,
    as `pool_worker_init` does for the tools' pools. Only from the main thread."""
    from multiprocessing import forkserver

    main = threading.current_thread() is threading.main_thread()
    stops = _job_stop_signals.union(installed_signals())
    running_before = forkserver._forkserver._forkserver_pid
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in stops} if main else {}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():  # None: set outside Python, which cannot set it back
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
    server = forkserver._forkserver._forkserver_pid
    if _fork_server_running() and server != _fork_server_pid[0]:  # not seen before
        _fork_server_pid[0] = server
        _fork_server_ignores.clear()
        # started now, ignoring them; or started by something else before (the user's script, a pool of
        # the default context from Python 3.14 on), ignoring what its starter ignored then
        _fork_server_ignores.update(previous if server != running_before else _ignored_by(server, stops))


def _ignored_by(pid: int, signals) -> set:
    """Which of `signals` process `pid` ignores (Linux's /proc; elsewhere none is assumed)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            mask = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    except (OSError, StopIteration, ValueError, IndexError):
        return set()
    return {sig for sig in signals if mask >> (sig - 1) & 1}


def _fork_server_running() -> bool:
    from multiprocessing import forkserver

    return forkserver._forkserver._forkserver_pid is not None


def pool_worker_init() -> Callable[[], None]:
    """An `initializer` for the tools' worker pools (probing, `prepare`): their workers end on the
    job's stop signals, as any process, although the fork server ignores them, and when this
    process ends (`_end_with`)."""
    return functools.partial(_unshielded_worker, tuple(sorted(_fork_server_ignores)), os.getpid())


def shield_workers() -> Callable[[int], None]:
    """A `worker_init_fn` for this process's DataLoader workers: while a StopRequest is installed,
    its signals end a worker only when this process sends them (DataLoader and multiprocessing end
    workers with SIGTERM) and are ignored from anyone else. A scheduler signals every process of a
    job, a rank's workers included, and a rank still fetching batches for its last step would
    otherwise lose them and fail instead of stopping. The other signals the fork server ignores (the
    job's default ones, where the run stops on others) they take again, as any process. Only for
    workers that start with one thread (forked, or from a fork server that preloaded torch) and on
    Linux (sigwaitinfo); others are left as they are, with a warning. With no request installed,
    workers take the signals the fork server ignores by default again. Either way a worker ends
    when this process ends (`_end_with`)."""
    signals = installed_signals()
    if not signals or not hasattr(signal, "sigwaitinfo"):
        return pool_worker_init()
    others = tuple(sorted(_fork_server_ignores.difference(signals)))
    return functools.partial(_shield_worker, tuple(signals), os.getpid(), taken=others)


def _take_ignored_signals(signals: Sequence[signal.Signals]) -> None:
    """Undo the fork server's ignoring of `signals` in a worker: it ends on them, as any process."""
    for sig in signals:
        if signal.getsignal(sig) is signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)


def _unshielded_worker(signals: Sequence[signal.Signals], owner: int, worker_id: int = 0) -> None:
    _take_ignored_signals(signals)
    _end_with(owner)


def _shield_worker(signals: Sequence[signal.Signals], owner: int, worker_id: int,
                   taken: Sequence[signal.Signals] = ()) -> None:
    # ignored by the fork server but no stop signal of this run: left so, DataLoader's terminate() did nothing
    _take_ignored_signals(taken)
    threads = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None
    if threads != 1:  # e.g. a worker that imported torch itself (spawned, or forkserver without preload)
        if threads is not None:  # (None: its threads cannot be counted)
            warnings.warn(f"data-loading worker {worker_id} already runs {threads} threads, which would take stop "
                          f"signals meant for it: not shielded from them")
        _unshielded_worker(signals, owner)  # as any process takes them
        return
    # blocked in this thread, and in every thread started from it (FFmpeg's), the signals wait for
    # the thread below, which alone sees who sent them; blocked before their default action is set,
    # or one sent between the two would end the worker
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    for sig in signals:  # a forked worker inherits its owner's handlers
        signal.signal(sig, signal.SIG_DFL)
    threading.Thread(target=_end_on_owners_signal, args=(signals, owner), daemon=True,
                     name="vitaclip-stop-signal-shield").start()
    _end_with(owner)


def _end_with(owner: int) -> None:
    """End this worker when process `owner` ends, however it ends (SIGKILL, the out-of-memory
    killer). A worker's parent is the fork server, not its owner: PyTorch's watchdog, which watches
    the parent, never fires, and the server, held open by its workers, outlives the owner; a
    killed run left them all running (a GiB or more each), and pool workers waiting for work."""
    try:
        watched = os.pidfd_open(owner)
    except ProcessLookupError:  # ended already
        os._exit(0)
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): asked every second
        watched = None
    threading.Thread(target=_exit_when_ended, args=(owner, watched), daemon=True,
                     name="vitaclip-owner-watch").start()


def _exit_when_ended(owner: int, watched: Optional[int]) -> None:
    if watched is not None:
        select.select([watched], [], [])  # readable once the process has ended
    else:
        while _alive(owner):
            time.sleep(1.0)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: the pid was taken again
        return False
    return True


def _end_on_owners_signal(signals: Sequence[signal.Signals], owner: int) -> None:
    while True:
        info = signal.sigwaitinfo(signals)
        if info.si_pid == owner:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [info.si_signo])
            signal.raise_signal(info.si_signo)  # its default action: ends the process
