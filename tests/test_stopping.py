"""Stop signals: repeats of one stop, and data-loading workers that outlive a stop signal."""
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vitaclip.engine import stopping
from vitaclip.engine.stopping import StopRequest, _shield_worker, shield_workers

needs_sigwaitinfo = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="sigwaitinfo is Linux-only")


def test_repeats_within_the_grace_are_the_same_stop_and_later_ones_act_as_before():
    seen, now = [], [100.0]
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    request = StopRequest(["usr1"], repeat_grace_s=5.0, clock=lambda: now[0]).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        now[0] += 4.9
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.received == "SIGUSR1" and seen == []
        now[0] += 0.2  # 5.1 s after the first
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)  # the previous handler is back
        assert seen == [signal.SIGUSR1] * 2
    finally:
        request.uninstall()
        signal.signal(signal.SIGUSR1, previous)


class WorkerPids(Dataset):
    def __len__(self):
        return 10 ** 6

    def __getitem__(self, index):
        return torch.tensor(os.getpid())


@needs_sigwaitinfo
def test_workers_are_shielded_only_while_a_stop_request_is_installed(monkeypatch):
    monkeypatch.setattr(stopping, "_fork_server_ignores", {signal.SIGTERM})  # as the fork server started
    plain = (stopping._unshielded_worker, ((signal.SIGTERM,), os.getpid()))
    assert (shield_workers().func, shield_workers().args) == plain
    with warnings.catch_warnings():  # (a fork server an earlier test started, said to ignore SIGTERM only)
        warnings.filterwarnings("ignore", "the data workers' fork server started before SIGUSR1")
        request = StopRequest(["SIGTERM", "SIGUSR1"]).install()
    try:
        init = shield_workers()
        assert init.func is stopping._shield_worker and set(init.args[0]) == {signal.SIGTERM, signal.SIGUSR1}
        assert init.args[1] == os.getpid()
    finally:
        request.uninstall()
    assert (shield_workers().func, shield_workers().args) == plain


@needs_sigwaitinfo
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_shielded_worker_ignores_a_stop_signal_from_others_and_ends_on_its_owners(method):
    context = multiprocessing.get_context(method)
    if method == "forkserver":  # as the PyAV pool's: workers start without torch's threads
        context.set_forkserver_preload(["torch"])
        stopping.start_fork_server()  # as the package's loaders start it
    request = StopRequest(["SIGUSR1"]).install()
    try:
        loader = DataLoader(WorkerPids(), batch_size=None, num_workers=1, multiprocessing_context=context,
                            worker_init_fn=shield_workers())
        batches = iter(loader)
        pid = int(next(batches))
        # another process (a scheduler signalling the whole job) sends it twice
        subprocess.run([sys.executable, "-c", f"import os, signal; [os.kill({pid}, signal.SIGUSR1) for _ in '12']"],
                       check=True)
        time.sleep(0.5)
        assert [int(next(batches)) for _ in range(20)] == [pid] * 20  # alive and still serving
        assert request.received is None  # the test process was not signalled
        worker = batches._workers[0]
        with pytest.raises(RuntimeError, match=f"{pid}"):
            os.kill(pid, signal.SIGUSR1)  # from its owner, as DataLoader's terminate()
            worker.join(timeout=30)
            next(batches)
        assert worker.exitcode == -signal.SIGUSR1
    finally:
        request.uninstall()


SIGNALLED_WHILE_SHIELDING = """
import os, signal
from vitaclip.engine import stopping

worker = os.fork()  # with this thread only, as the fork server forks a worker
if worker == 0:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as the fork server leaves its workers
    set_signal = signal.signal

    def set_then_signalled(sig, handler):  # another process's SIGUSR1 comes as the shield sets it
        previous = set_signal(sig, handler)
        if sig == signal.SIGUSR1 and handler is signal.SIG_DFL:
            sender = os.fork()
            if sender == 0:
                os.kill(os.getppid(), signal.SIGUSR1)
                os._exit(0)
            os.waitpid(sender, 0)
        return previous

    signal.signal = set_then_signalled
    stopping._shield_worker((signal.SIGUSR1,), os.getppid(), 0)
    os._exit(0)
print(os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1]))
"""


@needs_sigwaitinfo
def test_a_stop_signal_from_others_while_a_worker_is_being_shielded_waits_for_the_shield():
    """The shield set a signal's default action before blocking it: one sent in between (a scheduler
    signalling the job as a rank starts its workers) ended the worker."""
    out = subprocess.run([sys.executable, "-c", SIGNALLED_WHILE_SHIELDING], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["0"]


FORK_SERVER_SIGNALLED = """
import multiprocessing, os, signal, sys, time
from multiprocessing import forkserver
from vitaclip.engine.stopping import StopRequest, start_fork_server

if sys.argv[1] == "before the request":  # a loader probing new videos, before training installs its request
    start_fork_server()
request = StopRequest(["SIGTERM"]).install()
if sys.argv[1] == "shielded":
    start_fork_server()
worker = multiprocessing.get_context("forkserver").Process(target=time.sleep, args=(30,))
worker.start()
os.kill(forkserver._forkserver._forkserver_pid, signal.SIGTERM)  # the job's stop reaches it too
time.sleep(1)
print(worker.is_alive(), request.received)
try:  # by its pid: a worker whose server died reads as ended to multiprocessing, which then sends nothing
    os.kill(worker.pid, signal.SIGKILL)  # (alive, it would hold the test's output pipe open for 30 s)
except ProcessLookupError:
    pass
"""


@pytest.mark.parametrize("start", ["shielded", "before the request", "plain"])
def test_the_fork_server_outlives_the_jobs_stop_signal_so_its_workers_stay_alive_to_their_owner(start):
    """Multiprocessing learns whether a fork server's worker is alive from the server: a stop
    signal that ended the server made the PyAV pool's live workers look dead, failing the epoch.
    Started before training installed its request (by probing new videos), the server did not
    ignore the stop signals: a stop in the first pass over a new data set crashed the run."""
    out = subprocess.run([sys.executable, "-c", FORK_SERVER_SIGNALLED, start], capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == (["False", "None"] if start == "plain" else ["True", "None"])


FORK_SERVER_AND_POOL_SIGNALS = """
import signal
from multiprocessing import forkserver
from worker_faults import stop_signal_dispositions
from vitaclip.data.workers import map_in_workers
from vitaclip.engine.stopping import declare_stop_signals

declare_stop_signals(["SIGUSR2"])  # as `vitaclip train --stop-signals SIGUSR2` does first
(in_worker,) = map_in_workers([(stop_signal_dispositions,)], 1)  # starts the server: a probe of new videos
with open(f"/proc/{forkserver._forkserver._forkserver_pid}/status") as f:
    ignored = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
print([bool(ignored >> (sig - 1) & 1) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)], in_worker)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads a process's ignored signals in /proc")
def test_the_fork_server_ignores_the_jobs_stop_signals_and_the_tools_pool_workers_do_not():
    """The server ignores the default stop signals and those declared, wherever it starts; the workers
    of the tools' pools (probing, prepare) take them as any process does."""
    tests = os.path.dirname(os.path.abspath(__file__))  # the workers import worker_faults by name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", FORK_SERVER_AND_POOL_SIGNALS], capture_output=True, text=True,
                         check=True, timeout=120, env=env).stdout.strip()
    default = int(signal.SIG_DFL)
    assert out == f"[True, True, True] ({default}, {default}, {default})"


INSTALLED_AFTER_THE_SERVER = """
import warnings
from vitaclip.engine.stopping import StopRequest, start_fork_server

start_fork_server()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    StopRequest(["SIGTERM"]).install()
    print(len(caught))
    StopRequest(["SIGUSR2"]).install()
print(caught[-1].message)
"""


def test_a_stop_signal_the_running_fork_server_does_not_ignore_is_warned_about():
    out = subprocess.run([sys.executable, "-c", INSTALLED_AFTER_THE_SERVER], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.startswith("0\n") and "started before SIGUSR2 were made stop signals" in out
    assert "declare_stop_signals" in out


STARTED_AGAIN = """
import signal, warnings
from vitaclip.engine.stopping import StopRequest, declare_stop_signals, start_fork_server

request = StopRequest(["SIGTERM"]).install()
start_fork_server()
print(signal.getsignal(signal.SIGTERM) == request._handle, signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL)
declare_stop_signals(["SIGUSR2"])
start_fork_server()  # a later pool's: the server runs already, started without ignoring SIGUSR2
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    StopRequest(["SIGUSR2"]).install()
print(len(caught), "started before SIGUSR2" in str(caught[-1].message) if caught else None)
"""


def test_starting_the_fork_server_leaves_this_process_its_handlers_and_a_running_one_is_not_restarted():
    """The server is started with the stop signals ignored, and this process takes its own handling back
    (a stop request left ignoring its signal never stops the run). A signal declared after the server
    started is not ignored by it, however often start_fork_server is called since: still warned about."""
    out = subprocess.run([sys.executable, "-c", STARTED_AGAIN], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    assert out == ["True", "True", "1", "True"]


def test_a_handler_set_outside_python_is_left_the_default_after_the_fork_server_starts(monkeypatch):
    """Python reports a handler a C library or an embedding program set as None, which it cannot set
    back: the signal gets the default action again, not a TypeError from start_fork_server."""
    from multiprocessing import forkserver

    set_to = []
    monkeypatch.setattr(stopping, "_job_stop_signals", {signal.SIGUSR2})
    monkeypatch.setattr(forkserver, "ensure_running", lambda: None)
    monkeypatch.setattr(stopping, "_fork_server_running", lambda: False)  # (nothing recorded of a server)
    monkeypatch.setattr(stopping.signal, "signal", lambda sig, handler: set_to.append(handler))  # returns None
    stopping.start_fork_server()
    assert set_to == [signal.SIG_IGN, signal.SIG_DFL]


SIGTERM_DISPOSITION = """
import signal


class SigtermDisposition:  # what a worker does with SIGTERM
    def __len__(self):
        return 1

    def __getitem__(self, index):
        return int(signal.getsignal(signal.SIGTERM))
"""

WORKER_AFTER_THE_RUN = """
import multiprocessing
from torch.utils.data import DataLoader
from sigterm_disposition import SigtermDisposition
from vitaclip.engine.stopping import StopRequest, shield_workers, start_fork_server

request = StopRequest(["SIGTERM"]).install()
start_fork_server()  # by a pool during the run
request.uninstall()  # the run is over: e.g. a final evaluation's pool
loader = DataLoader(SigtermDisposition(), batch_size=None, num_workers=1, worker_init_fn=shield_workers(),
                    multiprocessing_context=multiprocessing.get_context("forkserver"))
print(int(next(iter(loader))))
"""


def test_a_worker_started_after_the_run_takes_the_stop_signals_the_fork_server_ignores(tmp_path):
    (tmp_path / "sigterm_disposition.py").write_text(SIGTERM_DISPOSITION)  # workers import it by name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", WORKER_AFTER_THE_RUN], capture_output=True, text=True, check=True,
                         timeout=120, env=env).stdout.split()
    assert out == [str(int(signal.SIG_DFL))]


@needs_sigwaitinfo
def test_a_worker_already_running_threads_is_left_as_it_is_with_a_warning():
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()

    def handler(signum, frame):  # the worker's own (e.g. its dataset module's): neither ignored nor the default
        pass

    previous = signal.signal(signal.SIGUSR1, handler)
    try:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        with pytest.warns(UserWarning, match="worker 3 already runs [0-9]+ threads.*not shielded"):
            _shield_worker((signal.SIGUSR1,), os.getpid(), 3)
        assert signal.getsignal(signal.SIGUSR1) is handler and signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
    finally:
        signal.signal(signal.SIGUSR1, previous)
        stop.set()
        thread.join()


def test_by_default_repeats_within_five_seconds_are_the_same_stop():
    """README: "Repeats within 5 s are the same stop" (SLURM and torchrun both signal each rank);
    the existing test passes its own grace, so the default was never checked."""
    seen, now = [], [100.0]
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    request = StopRequest(["SIGUSR1"], clock=lambda: now[0]).install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        now[0] += 4.5
        os.kill(os.getpid(), signal.SIGUSR1)
        assert request.received == "SIGUSR1" and seen == []
        now[0] += 1.0
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        request.uninstall()
        signal.signal(signal.SIGUSR1, previous)


OWNER_KILLED = """
import os, sys, time
from multiprocessing import forkserver
from torch.utils.data import DataLoader
from worker_faults import PidThenSleep
from vitaclip.data.workers import fork_server_context, worker_pool
from vitaclip.engine.stopping import StopRequest, shield_workers

if sys.argv[1] == "training":
    StopRequest(["SIGTERM"]).install()
loader = DataLoader(PidThenSleep(), batch_size=None, num_workers=1, multiprocessing_context=fork_server_context(),
                    worker_init_fn=shield_workers())
batches = iter(loader)
loader_worker = int(next(batches))
pool = worker_pool(1)
pool_worker = pool.submit(os.getpid).result()
print(loader_worker, pool_worker, forkserver._forkserver._forkserver_pid, flush=True)
time.sleep(600)
"""


def ended(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie waiting for its parent to reap it has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states in /proc")
@pytest.mark.parametrize("during", ["training", "evaluation"])
def test_workers_and_the_fork_server_end_when_their_owner_is_killed(during):
    """A worker's parent is the fork server, held open by its workers: a run killed with SIGKILL (or
    by the out-of-memory killer) left its loader's workers, its pools' workers and the server running
    for good, a GiB or more each."""
    tests = os.path.dirname(os.path.abspath(__file__))  # the workers import worker_faults by name
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    owner = subprocess.Popen([sys.executable, "-c", OWNER_KILLED, during], stdout=subprocess.PIPE, text=True,
                             env=env, start_new_session=True)
    pids = [int(p) for p in owner.stdout.readline().split()]
    assert len(pids) == 3 and not any(ended(pid) for pid in pids)
    owner.kill()
    owner.wait()
    deadline = time.monotonic() + 30
    while not all(ended(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if not ended(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], "still running after their owner was killed"


OWNER_WATCHED_WITHOUT_PIDFD = """
import os, subprocess, sys, time
from vitaclip.engine import stopping

owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)


def no_pidfd(pid):  # a kernel before 5.3
    raise OSError(38, "Function not implemented")


os.pidfd_open = no_pidfd
stopping._end_with(owner.pid)
time.sleep(1.5)
print("alive while the owner is", flush=True)
owner.kill()
owner.wait()  # (reaped, as an owner's own parent reaps it)
time.sleep(10)
print("outlived its owner", flush=True)
"""


def test_without_pidfd_a_worker_asks_every_second_whether_its_owner_lives_and_ends_after_it():
    out = subprocess.run([sys.executable, "-c", OWNER_WATCHED_WITHOUT_PIDFD], capture_output=True, text=True,
                         timeout=120)
    assert (out.returncode, out.stdout) == (0, "alive while the owner is\n")  # ended within 10 s of it


STARTED_BY_ANOTHER = """
import multiprocessing, warnings
from multiprocessing import forkserver
from vitaclip.engine import stopping

# something else (the user's script, a library; any pool of the default context from Python 3.14 on)
# starts multiprocessing's fork server first, ignoring no stop signal
multiprocessing.get_context("forkserver").Pool(1).close()
server = forkserver._forkserver._forkserver_pid
stopping.start_fork_server()  # the package's first pool: the server runs already, as it was started
print(server == forkserver._forkserver._forkserver_pid, sorted(stopping._fork_server_ignores))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    stopping.StopRequest(["SIGTERM"]).install()
print(len(caught), "SIGTERM" in str(caught[-1].message) if caught else None)
"""


def test_a_fork_server_started_by_another_is_not_taken_for_one_ignoring_the_stop_signals():
    """A server already running when the package first starts its pools was recorded as ignoring the
    job's stop signals, which it did not: no warning, and a stop signal ended it (its workers looking
    dead to their loaders) instead of stopping the run."""
    out = subprocess.run([sys.executable, "-c", STARTED_BY_ANOTHER], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split("\n")
    assert out[:2] == ["True []", "1 True"]
