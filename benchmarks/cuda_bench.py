"""Shared helpers of the throughput suites: timed on the GPU, skipped without one."""
import pytest
import torch

from vitaclip.backends import resolve_backend
from vitaclip.graphs import CapturedPass

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LAUNCHES = ("eager", "cuda-graph")


def launched(step, launch: str):
    """step as a benchmark times it: launched eagerly (the host's launch overhead counts), or
    replayed from a CUDA graph captured as the model's graphed passes are (the GPU time alone)."""
    return CapturedPass(step, [], [], []).forward_graph.replay if launch == "cuda-graph" else step


def bench_cuda(benchmark, fn, rounds: int = 20, warmup: int = 3):
    """Time fn() with pytest-benchmark, synchronising the device so each round is complete.
    Returns the median seconds per call and records the card in extra_info."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()

    def step():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=rounds, iterations=1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    return benchmark.stats.stats.median


def check_graphed(benchmark, model):
    """A graphed backend's figure is one of CUDA graphs: a failed capture (a warning, hidden by
    pytest) would leave the passes uncaptured under the graphed name."""
    if resolve_backend(model.backend, torch.device("cuda")).cuda_graphs:
        assert len(model._graphs) > 0 and not model._graphs.failed_passes, \
            f"passes not captured: {model._graphs.failed_passes or 'none captured'}"
        benchmark.extra_info["graphed_passes"] = len(model._graphs)
