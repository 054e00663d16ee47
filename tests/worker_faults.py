"""Decoding work that fails as a broken FFmpeg might, or leaves a trace, for the loader's worker-pool
tests: the worker processes import this module by name, so the fault happens inside them."""
import os
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
    hanging on one with "hang", and taking a second over one with "slow"."""
    from vitaclip.data.prepare import _job

    if "crash" in os.path.basename(src):
        os._exit(1)
    if "slow" in os.path.basename(src):
        time.sleep(1)
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
