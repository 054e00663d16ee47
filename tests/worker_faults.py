"""Decoding work that fails as a broken FFmpeg might, or leaves a trace, for the loader's worker-pool
tests: the worker processes import this module by name, so the fault happens inside them."""
import errno
import os
import signal
import threading
import time
from pathlib import Path

from vitaclip.data import loader


class FaultyTasks(loader._PyAVTasks):
    """Dies on a chunk holding a path with "crash" in its name, hangs on one with "hang", takes
    a second over one with "slow"."""

    def __getitem__(self, chunk):
        if any("crash" in os.path.basename(path) for path, _ in chunk):
            os._exit(1)
        if any("slow" in os.path.basename(path) for path, _ in chunk):
            time.sleep(1)
        for path, _ in chunk:
            if "hang" in os.path.basename(path):
                Path(path + ".pid").write_text(str(os.getpid()))  # for the test to see it end
                threading.Event().wait()
        return super().__getitem__(chunk)


def faulty_prepare_job(src, dst, settings, reuse):
    """`vitaclip prepare`'s job, dying as a crashed FFmpeg would on a video with "crash" in its name,
    hanging on one with "hang", finding the disk full on one with "full", and beginning one with
    "late" only once the encode of hang.webm beside it has begun."""
    from vitaclip.data.prepare import _job

    if "crash" in os.path.basename(src) or "hang" in os.path.basename(src):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        Path(dst + ".partial.mp4").write_bytes(b"half an encode")  # ended midway
    if "crash" in os.path.basename(src):
        os._exit(1)
    if "full" in os.path.basename(src):  # a full disk or quota met by the encoder
        raise OSError(errno.ENOSPC, f"No space left on device: writing {dst}")
    if "late" in os.path.basename(src):
        _wait_for(Path(src).with_name("hang.webm.pid"))
    if "hang" in os.path.basename(src):
        Path(src + ".pid").write_text(str(os.getpid()))  # for the test to see it end
        threading.Event().wait()
    return _job(src, dst, settings, reuse)


def faulty_probe(entry):
    """The loader's probe of one video, dying as a crashed FFmpeg would on a video with "crash" in its
    name, hanging on one with "hang", and taking half a second over one with "slow" (still running
    when another worker dies)."""
    from vitaclip.data.meta import _probe

    name = os.path.basename(entry.path)
    if "crash" in name:
        os._exit(1)
    if "hang" in name:
        threading.Event().wait()
    if "slow" in name:
        time.sleep(0.5)
    return _probe(entry)


def recording_probe(entry):
    """The loader's probe of one video, noting the video in `<list file>.probed-rank<RANK>`."""
    from vitaclip.data.meta import _probe

    with open(f"{entry.list_file}.probed-rank{os.environ.get('RANK', 0)}", "a") as log:
        log.write(os.path.basename(entry.path) + "\n")
    return _probe(entry)


def assert_process_ends(pid: int, within_s: float = 30) -> None:
    """Fails the test unless process `pid` ends within `within_s` seconds."""
    import pytest

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # ended, not yet reaped
                    return
        except FileNotFoundError:
            return
        time.sleep(0.1)
    pytest.fail(f"process {pid} still runs")


class _LateSecondWorker(dict):
    """A pool's table of its workers that learns of the second one 2 s after that worker started, as
    on a loaded machine: a crash of the first meanwhile breaks the pool without it."""

    def __setitem__(self, pid, process):
        if len(self) == 1:
            time.sleep(2)
        super().__setitem__(pid, process)


def _record_workers_in(make_table) -> None:
    """Every ProcessPoolExecutor made after this call keeps its workers in a table from make_table()."""
    from concurrent.futures import process as pool_module

    made = pool_module.ProcessPoolExecutor.__init__

    def init(self, *args, **kwargs):
        made(self, *args, **kwargs)
        self._processes = make_table()

    pool_module.ProcessPoolExecutor.__init__ = init


def start_second_workers_late():
    """Every ProcessPoolExecutor made after this call records its second worker late."""
    _record_workers_in(_LateSecondWorker)


class _SecondWorkerRecordedOnceEnded(dict):
    """A pool's table of its workers that records the second one only once that worker has ended,
    naming it in `<folder>/late-worker` meanwhile: the pool's manager thread, which lists the
    workers to watch when it wakes, has listed them without it."""

    def __init__(self, folder: str):
        super().__init__()
        self.folder = Path(folder)

    def __setitem__(self, pid, process):
        if len(self) == 1:
            (self.folder / "late-worker.tmp").write_text(str(pid))
            os.replace(self.folder / "late-worker.tmp", self.folder / "late-worker")
            process.join(30)
        super().__setitem__(pid, process)


def record_second_workers_once_ended(folder: str):
    """Every ProcessPoolExecutor made after this call records its second worker once it has ended."""
    _record_workers_in(lambda: _SecondWorkerRecordedOnceEnded(folder))


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def crash_in_the_late_worker(folder: str) -> str:
    """Called twice at once in a pool made after record_second_workers_once_ended(folder): dies in
    the late worker once the other call has returned; in the other worker, returns "returned" once
    the late worker holds the other call (so that it cannot take both). Run again in a worker of
    its own, it returns."""
    folder = Path(folder)
    late = folder / "late-worker"
    _wait_for(late)
    if int(late.read_text()) == os.getpid():
        (folder / "late-arrived").touch()
        _wait_for(folder / "returned")
        time.sleep(0.5)  # for the other's result to reach the pool's manager thread first
        os._exit(1)
    _wait_for(folder / "late-arrived")
    (folder / "returned").touch()
    return "returned"


def exits_within(script: str, folder: Path, timeout: float = 60) -> bool:
    """Runs `script` (the tests folder importable), which prints "done" when its work is done, from
    `folder`: whether it then exits, within `timeout` s (if not, it is killed with its workers)."""
    import signal
    import subprocess
    import sys

    path = folder / "run.py"
    path.write_text(script)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                                    os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, "-X", "faulthandler", str(path)], cwd=folder, env=env,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGABRT)  # faulthandler prints where each of its threads is
        time.sleep(1)
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        assert "done" in out, out  # the work was done: what hung is the exit
        return False
    assert "done" in out and process.returncode == 0, out
    return True


def stop_signal_dispositions() -> tuple:
    """What this worker does with SIGTERM, SIGUSR1 and SIGUSR2 (signal handler values)."""
    return tuple(int(signal.getsignal(sig)) for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2))


class PidThenSleep:
    """A dataset whose item 0 is its worker's pid and whose later items never come (a long decode)."""

    def __len__(self):
        return 10

    def __getitem__(self, index):
        if index == 0:
            return os.getpid()
        time.sleep(600)


def recording_prepare_job(src, dst, settings, reuse):
    """`vitaclip prepare`'s job, noting each call ("reuse" or "encode") in `<dst>.jobs`."""
    from vitaclip.data.prepare import _job

    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(dst + ".jobs", "a") as log:
        log.write(("reuse" if reuse else "encode") + "\n")
    return _job(src, dst, settings, reuse)
