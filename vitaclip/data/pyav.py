"""PyAV decoding: probing (frame count, size, codec) and reading frames by index.

Frame i is the i-th frame in presentation order, as the public code counted it. Frames
come out as planar YUV 4:2:0 and are converted on the device (transforms.yuv420_to_rgb)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .transforms import Yuv420

try:
    import av
except ImportError:  # the DALI-only machine has no PyAV
    av = None


class VideoDecodeError(RuntimeError):
    """A video that cannot be opened, decoded, or has fewer frames than needed."""


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    height: int
    width: int
    codec: str


def available() -> bool:
    return av is not None


def probe(path: str) -> VideoInfo:
    """Count frames by demuxing (no decoding): one packet with data per frame."""
    _require_av()
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
            return VideoInfo(frames, stream.codec_context.height, stream.codec_context.width,
                             stream.codec_context.name)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: cannot read video ({e})") from e


def decode_frames(path: str, indices: np.ndarray) -> Yuv420:
    """Frames at the given sorted unique indices, decoding from the start up to the last one."""
    _require_av()
    wanted = {int(i): k for k, i in enumerate(indices)}
    last = int(indices[-1])
    planes = None
    got = 0
    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for position, frame in enumerate(container.decode(stream)):
                if position in wanted:
                    if frame.format.name != "yuv420p":
                        frame = frame.reformat(format="yuv420p")
                    if planes is None:
                        planes = [np.empty((len(indices), p.height, p.width), np.uint8) for p in frame.planes]
                    for dst, plane in zip(planes, frame.planes):
                        row = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)
                        dst[wanted[position]] = row[:, :plane.width]
                    got += 1
                if position >= last:
                    break
    except (av.FFmpegError, OSError) as e:
        raise VideoDecodeError(f"{path}: decoding failed ({e})") from e
    if got < len(indices):
        raise VideoDecodeError(f"{path}: ended before frame {last} (decoded {got} of {len(indices)} wanted)")
    return Yuv420(*(torch.from_numpy(p) for p in planes))


def _require_av():
    if av is None:
        raise ImportError("PyAV is not installed: pip install av (or use the DALI backend)")
