"""Stop signals given twice, shielded workers and the signals the fork server ignores, signal names
of the wrong type, and the benchmark's count of timed iterations."""
import signal
import subprocess
import sys

import pytest

from vitaclip.engine.stopping import StopRequest, parse_signal

needs_sigwaitinfo = pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="sigwaitinfo is Linux-only")


def test_a_signal_named_twice_gets_its_previous_handler_back():
    """`--stop-signals TERM,SIGTERM`: installed twice, the second install took the request's own handler
    for the previous one, which uninstall then put back: after the run a SIGTERM was still swallowed."""
    def previous(signum, frame):
        pass

    before = signal.signal(signal.SIGUSR1, previous)
    try:
        request = StopRequest(["SIGUSR1", "usr1"]).install()
        request.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is previous
    finally:
        signal.signal(signal.SIGUSR1, before)


@pytest.mark.parametrize("name", [signal.SIGTERM, 10, None])
def test_a_signal_name_that_is_not_a_str_is_named(name):
    """A settings file's `stop_signals: [10]` or a script's signal.SIGTERM failed with AttributeError: 'int'
    object has no attribute 'strip', naming neither the setting nor the value."""
    with pytest.raises(ValueError, match=f"signal name.*got {name!r}"):
        parse_signal(name)


SHIELDED_FROM_ONE_OF_THE_IGNORED = """
import os, signal, time
from vitaclip.engine import stopping

# the fork server ignores the default stop signals (SIGTERM, SIGUSR1) and its workers inherit that
stopping._fork_server_ignores.update({signal.SIGTERM, signal.SIGUSR1})
stopping.StopRequest(["SIGUSR1"]).install()  # --stop-signals SIGUSR1
init = stopping.shield_workers()
ready_r, ready_w = os.pipe()
worker = os.fork()
if worker == 0:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)  # as the fork server leaves its workers
    init(0)
    os.write(ready_w, b"1")
    time.sleep(30)
    os._exit(0)
os.read(ready_r, 1)
os.kill(worker, signal.SIGTERM)  # from its owner: DataLoader's terminate()
deadline = time.monotonic() + 10
while os.waitpid(worker, os.WNOHANG) == (0, 0):
    if time.monotonic() > deadline:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)
        print("alive")
        raise SystemExit
    time.sleep(0.05)
print("ended")
"""


@needs_sigwaitinfo
def test_a_shielded_worker_takes_the_ignored_signals_that_are_not_stop_signals_again():
    """With stop signals other than all those the fork server ignores (--stop-signals SIGUSR1), a shielded
    worker kept ignoring SIGTERM, from anyone: DataLoader's terminate() of a hung worker did nothing, and the
    job's SIGTERM, which ends the rank, left its workers running."""
    out = subprocess.run([sys.executable, "-c", SHIELDED_FROM_ONE_OF_THE_IGNORED], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["ended"]


def test_the_model_benchmark_refuses_no_timed_iterations():
    """bench_model(iters=0) built the model and timed it, then failed with ZeroDivisionError."""
    from vitaclip.engine.bench import bench_model

    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        bench_model(iters=0, tiny=True, device="cpu", batch_size=1, frames=2, num_classes=2, precision="fp32")


def test_the_loader_benchmark_refuses_no_timed_iterations(monkeypatch):
    """bench_loader(iters=0) counted down past 0 and read epoch after epoch for ever."""
    import torch

    import vitaclip.data
    from vitaclip.engine.bench import bench_loader

    class Batch:
        video = torch.zeros(1, 3, 2, 4, 4)

    class OneBatchLoader:  # stands in for VideoLoader; a loop past a few epochs is the endless one
        backend, dali_decoder = "pyav", None

        def __init__(self, *args, **kwargs):
            pass

        def set_epoch(self, epoch):
            if epoch > 3:
                raise RuntimeError("still reading at epoch 4")

        def __iter__(self):
            return iter([Batch()])

    monkeypatch.setattr(vitaclip.data, "VideoLoader", OneBatchLoader)
    with pytest.raises(ValueError, match="iters must be >= 1, got 0"):
        bench_loader("list.csv", iters=0, device="cpu")


def test_stop_signals_that_are_no_sequence_are_named():
    """TrainConfig(stop_signals=None) failed with "TypeError: 'NoneType' object is not iterable"."""
    from vitaclip.engine.train import TrainConfig

    with pytest.raises(ValueError, match=r"stop_signals must be a tuple of signal names \(\(\) for none\), got None"):
        TrainConfig(stop_signals=None).validate()


@pytest.mark.parametrize("name,why", [("SIGCHLD", "child process ends"), ("WINCH", "in ordinary work"),
                                      ("SIGCONT", "in ordinary work"), ("SIGSEGV", "a fault of the process")])
def test_signals_the_system_sends_for_other_reasons_are_no_stop_signals(name, why):
    """SIGCHLD as a stop signal stopped the run when a data worker or decoder process ended."""
    with pytest.raises(ValueError, match=f"{why}.*not a warning to stop"):
        parse_signal(name)


def test_the_fp16_training_benchmark_steps_through_a_grad_scaler(monkeypatch):
    """bench_model(train=True, precision="fp16") stepped without the scaler `train` uses: the speed
    it reported left out the scaler's unscale and overflow check."""
    import torch

    from vitaclip.engine import bench

    steps = []

    class CountingScaler(torch.amp.GradScaler):
        def step(self, optimizer, *args, **kwargs):
            steps.append(self.is_enabled())
            return super().step(optimizer, *args, **kwargs)

    monkeypatch.setattr(bench, "grad_scaler", lambda device, precision: CountingScaler(
        device.type, enabled=precision == "fp16"))
    report = bench.bench_model(iters=1, warmup=0, tiny=True, device="cpu", batch_size=1, frames=2, num_classes=2,
                               precision="fp16", train=True)
    assert steps == [True] and report["train_clips_per_s"] > 0
