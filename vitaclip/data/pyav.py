"""PyAV decoding: probing (frame count, size, codec) and reading frames by index.

Frame i is the i-th frame in presentation order, as the public code counted it, from the stream's
first keyframe (see _decodable). Frames come out as planar limited-range YUV 4:2:0 and are
converted on the device (transforms.yuv420_to_rgb)."""
from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..errors import VideoDecodeError
from .transforms import Yuv420

log = logging.getLogger(__name__)

try:
    import av
    from av.video.reformatter import ColorRange  # MPEG: limited (16..235), JPEG: full (0..255)
except ImportError:  # the DALI-only machine has no PyAV
    av = None


# a demuxed packet's (pts, dts, is_keyframe, shown: see _shown)
Packet = Tuple[Optional[int], Optional[int], bool, bool]


@dataclass(frozen=True)
class VideoInfo:
    frames: int
    height: int
    width: int
    codec: str
    # the file's (size, mtime_ns) when it was probed: kept in a sidecar, the row holds only
    # while the file still has them
    stamp: Optional[Tuple[int, int]] = None
    # how a player shows it: its YCbCr matrix (transforms.MATRICES), as the stream is tagged; the
    # quarter turns anticlockwise that stand it upright (its display rotation: phones write one
    # instead of turning the pixels); its pixels' width / height. None in a sidecar row written
    # before they were recorded, until meta.video_infos reads them off the file
    matrix: Optional[str] = "bt601"
    turns: Optional[int] = 0
    pixel_aspect: Optional[Fraction] = Fraction(1)

    @property
    def shown_size(self) -> Tuple[int, int]:
        """(height, width) as shown: square pixels, upright. Crops and resizes are planned on it."""
        width = max(1, round(self.width * (self.pixel_aspect or 1)))
        return (width, self.height) if (self.turns or 0) % 2 else (self.height, width)


# FFmpeg's AVColorSpace values of the matrices transforms.MATRICES knows; others (unspecified,
# BT.470BG, SMPTE 170M) are BT.601
_MATRIX_OF_COLORSPACE = {1: "bt709", 9: "bt2020", 10: "bt2020"}


def matrix_of(stream) -> str:
    """The YCbCr matrix a video stream is tagged with."""
    return _MATRIX_OF_COLORSPACE.get(int(stream.codec_context.colorspace), "bt601")


def quarter_turns(frame) -> int:
    """The quarter turns anticlockwise that stand a decoded frame upright (its display rotation, to
    the nearest quarter turn)."""
    return round(frame.rotation / 90) % 4


# pixel shapes taken as tagged: anamorphic video stays within 2:1 (DV, HDV: 8:9 to 64:45); a tag
# beyond these is broken, and followed it would stretch a frame to thousands of pixels
PIXEL_ASPECTS = (Fraction(1, 4), Fraction(4))


def pixel_aspect(stream) -> Fraction:
    """The width / height of a video stream's pixels (1 where untagged, or tagged past PIXEL_ASPECTS,
    with a warning)."""
    aspect = Fraction(stream.sample_aspect_ratio or 1)
    if PIXEL_ASPECTS[0] <= aspect <= PIXEL_ASPECTS[1]:
        return aspect
    log.warning("%s: pixel aspect ratio %s taken for a broken tag: read as square pixels", stream.container.name,
                aspect)
    return Fraction(1)


def file_display(path: str) -> Tuple[str, int, Fraction]:
    """(matrix, turns, pixel_aspect) of a file's video (see VideoInfo), from its headers and first
    frame: nothing else is demuxed or decoded."""
    _require_av()
    try:
        with av.open(path) as container:
            stream = _slice_threaded_video(container, path, 1)
            return _stream_display(stream, container.demux(stream))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: cannot read video ({e})") from e


def file_stamp(path: str) -> Tuple[int, int]:
    """(size, modification time in ns): what changes when a file is replaced or rewritten."""
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def stamp_or_none(path: str) -> Optional[Tuple[int, int]]:
    """file_stamp, or None where the file cannot be stated (whoever reads it names the problem)."""
    try:
        return file_stamp(path)
    except OSError:
        return None


def available() -> bool:
    return av is not None


@functools.lru_cache(maxsize=None)  # a sidecar has a row per video, and a handful of names
def canonical_codec(name: str) -> str:
    """The codec that a decoder of this name decodes ("libdav1d" -> "av1"): what the loader picks
    its decoder by (older sidecar rows hold decoder names)."""
    if av is None:
        return name
    try:
        return av.codec.Codec(name, "r").canonical_name
    except (ValueError, av.FFmpegError):  # unknown to this FFmpeg
        return name


def probe(path: str) -> VideoInfo:
    """Count frames by demuxing: one packet with data per shown frame (packets an MP4 edit list
    discards are not shown), from the first keyframe (see _decodable); only the first frame is
    decoded, for its display rotation."""
    _require_av()
    try:
        stamp = file_stamp(path)  # before reading: a file changed meanwhile is probed again next time
        with av.open(path) as container:
            stream = _slice_threaded_video(container, path, 1)
            height, width = stream.codec_context.height, stream.codec_context.width
            if height <= 0 or width <= 0:  # e.g. a raw stream FFmpeg cannot size: nothing can be planned on it
                raise VideoDecodeError(f"{path}: video of unknown size {width}x{height}")
            described = []

            def recorded(packets):
                for packet in packets:
                    if packet.size > 0:
                        described.append(_described(packet))
                    yield packet

            packets = recorded(container.demux(stream))
            display = _stream_display(stream, packets)
            collections.deque(packets, maxlen=0)  # the rest, for their timestamps and keyframes
            frames = sum(shown for *_, shown in _decodable(described))
            return VideoInfo(frames, height, width, stream.codec_context.codec.canonical_name, stamp, *display)
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise VideoDecodeError(f"{path}: cannot read video ({e})") from e


def _stream_display(stream, packets: Iterator) -> Tuple[str, int, Fraction]:
    """(matrix, turns, pixel_aspect) of a video (see VideoInfo); reads of `packets`, the stream's
    demuxed packets, those of its first frame (see _first_frame)."""
    matrix = matrix_of(stream)  # the header's: a decoder may report another once decoding (VP8)
    first = _first_frame(packets)
    return matrix, quarter_turns(first) if first else 0, pixel_aspect(stream)


# the packets decoded, at most, for a video's display rotation: a stream that gives no frame by then
# is taken as shown as coded (its clips fail when decoded, naming the file)
FIRST_FRAME_PACKETS = 64


def _first_frame(packets: Iterator) -> Optional[object]:
    """The first frame decoded from the next of `packets`, or None. Reads until a frame comes (a
    decoder holds its first frames back a few packets) or FIRST_FRAME_PACKETS were read; a packet
    the decoder rejects (a broken first keyframe, or frames before it) only moves on to the next."""
    for packet in itertools.islice(packets, FIRST_FRAME_PACKETS):
        try:
            frame = next(iter(packet.decode()), None)
        except av.FFmpegError:
            continue
        if frame is not None:
            return frame
    return None


def _described(packet) -> Packet:
    """A packet with data as a Packet tuple (no reference to its data)."""
    return packet.pts, packet.dts, packet.is_keyframe, _shown(packet)


def _decodable(packets: List[Packet]) -> List[Packet]:
    """Of a stream's packets in decoding order, those that count: from the first keyframe on (shown
    or not: an edit list may start the video after it), less the shown ones shown before it (an
    open group of pictures' leading frames). A stream copied out of a longer one without
    re-encoding may start within a group of pictures, with frames that refer to frames it lacks:
    decoders drop or reject them, so counting them would shift every frame index. A stream with
    no keyframe flagged counts whole."""
    first = next((i for i, (_, _, key, _) in enumerate(packets) if key), None)
    if first is None:
        return packets
    start = packets[first][0]
    return [p for p in packets[first:] if not p[3] or start is None or p[0] is None or p[0] >= start]


def decoded_from_first_keyframe(container, stream) -> Iterator:
    """The stream's frames that count (see _decodable), decoded in order: packets before the first
    keyframe are not decoded, frames shown before it are dropped."""
    packets = container.demux(stream)
    held = []
    for packet in packets:
        if packet.is_keyframe:
            break
        held.append(packet)
    else:  # no keyframe flagged: the whole stream
        yield from (frame for packet in held for frame in packet.decode())
        return
    start = packet.pts
    for packet in itertools.chain([packet], packets):
        for frame in packet.decode():
            if start is None or frame.pts is None or frame.pts >= start:
                yield frame


def decode_frames(path: str, indices: np.ndarray, threads: int = 0) -> Yuv420:
    """Frames at the given sorted unique indices. A demux pass (cheap) maps indices to
    timestamps and finds the keyframes; decoding then seeks to the last keyframe before
    a wanted frame whenever that skips frames, instead of decoding everything up to it.

    threads: FFmpeg's slice threads (0: one per core); 1 in a pool of decoding processes,
    which already keeps every core busy. Never frame threads: a frame-threaded decoder
    returns a frame only after reading one packet per thread beyond it, so every seek would
    decode up to a core count of frames that are thrown away."""
    _require_av()
    indices = [int(i) for i in indices]
    out = _Planes(path, len(indices))
    try:
        with av.open(path) as container:
            stream = _slice_threaded_video(container, path, threads)
            packets = _decodable([_described(p) for p in container.demux(stream) if p.size > 0])
            shown = [p for p in packets if p[3]]
            if len(shown) <= indices[-1]:
                raise VideoDecodeError(f"{path}: ended before frame {indices[-1]} ({len(shown)} frames)")
            seekable = (all(pts is not None for pts, *_ in shown) and any(key for _, _, key, _ in packets)
                        and not _guessed_timestamps(stream, shown))
            if seekable:
                try:
                    _decode_seeking(container, stream, packets, indices, out)
                except _SeekMissed:
                    seekable = False
                    out = _Planes(path, len(indices))
        if not seekable:
            # frame i is the i-th frame decoded: streams without timestamps (raw H.264), with guessed
            # ones, or whose seeks miss (formats without an index: MPEG-TS and -PS). A stream that
            # cannot seek cannot go back to its start after the demux pass either: read the file again
            with av.open(path) as container:
                stream = _slice_threaded_video(container, path, threads)
                _decode_in_order(decoded_from_first_keyframe(container, stream), indices, out)
    except (av.FFmpegError, OSError) as e:
        raise VideoDecodeError(f"{path}: decoding failed ({e})") from e
    if out.filled < len(indices):
        raise VideoDecodeError(f"{path}: ended before frame {indices[-1]} "
                               f"(decoded {out.filled} of {len(indices)} wanted)")
    return out.result()


def video_stream(container, path: str):
    """The video: the first video stream that is not a picture attached to the file (cover art, which
    some files list first), as FFmpeg's players choose."""
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            if stream.codec_context is None:  # PyAV's sign of a codec this FFmpeg cannot decode (or a broken header)
                raise VideoDecodeError(f"{path}: no decoder for its video stream in this FFmpeg (an unknown or "
                                       "unsupported codec, or a damaged header)")
            return stream
    cover_only = " (only a cover picture)" if container.streams.video else ""
    raise VideoDecodeError(f"{path}: no video stream{cover_only}")


def _slice_threaded_video(container, path: str, threads: int):
    stream = video_stream(container, path)
    stream.thread_type = "SLICE"
    stream.codec_context.thread_count = threads
    return stream


class _Planes:
    def __init__(self, path: str, count: int):
        self.path, self.count, self.filled, self.planes = path, count, 0, None

    def put(self, slot: int, frame) -> None:
        frame = limited_range_yuv420(frame)
        if self.planes is None:
            self.planes = [np.empty((self.count, p.height, p.width), np.uint8) for p in frame.planes]
        elif (frame.height, frame.width) != self.planes[0].shape[1:]:
            # an error rather than a resize: the metadata (crop boxes) and DALI know one size,
            # and `prepare` re-encodes such a video at one size
            first_h, first_w = self.planes[0].shape[1:]
            raise VideoDecodeError(f"{self.path}: frame size changes within the video, from {first_w}x{first_h} "
                                   f"to {frame.width}x{frame.height} (re-encode it with `vitaclip prepare`)")
        for dst, plane in zip(self.planes, frame.planes):
            dst[slot] = plane_pixels(plane)
        self.filled += 1

    def result(self) -> Yuv420:
        return Yuv420(*(torch.from_numpy(p) for p in self.planes))


def plane_pixels(plane) -> np.ndarray:
    """A uint8 plane of a decoded frame as [height, width] (a view: rows without their padding)."""
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]


def limited_range_yuv420(frame, **resize):
    """The frame as limited-range yuv420p, what yuv420_to_rgb converts (resized by swscale with
    `resize`: width, height, interpolation). Full-range frames (MJPEG's yuvj formats, H.264/VP9
    tagged full range) are rescaled, so that Yuv420 keeps one meaning everywhere (at the cost of
    under a level of rounding). swscale must be told both ranges: left unset it copies full-range
    levels unchanged."""
    full_range = frame.format.name.startswith("yuvj") or frame.color_range == ColorRange.JPEG
    if frame.format.name == "yuv420p" and not full_range and not resize:
        return frame
    return frame.reformat(format="yuv420p", src_color_range=ColorRange.JPEG if full_range else None,
                          dst_color_range=ColorRange.MPEG, **resize)


def _decode_in_order(frames, indices, out: _Planes) -> None:
    """Frame i = i-th decoded frame (streams without timestamps)."""
    wanted = {i: slot for slot, i in enumerate(indices)}
    for position, frame in enumerate(frames):
        if position in wanted:
            out.put(wanted[position], frame)
        if position >= indices[-1]:
            return


class _SeekMissed(Exception):
    """Decoding after a seek did not reach the frame's timestamp."""


def _guessed_timestamps(stream, packets) -> bool:
    """Whether the presentation times may be guesses: a codec that reorders frames (B-frames) whose
    packets' times still only rise in decoding order, as AVI gives H.264 with B-frames (it stores
    none: each packet's decoding time plus one), also once remuxed into MKV or MP4. Seeking by them
    finds the wrong frames. A codec may report reordering without doing any (MPEG-2 always does):
    such streams are decoded from the start too, correct but slower."""
    return bool(stream.codec_context.has_b_frames) and all(a[0] < b[0] for a, b in zip(packets, packets[1:]))


def _decode_seeking(container, stream, packets, indices, out: _Planes) -> None:
    """Raises _SeekMissed where the decoder gives other timestamps than the demux pass, or ends
    early, after a seek."""
    # presentation order: frame i has timestamps[i]
    timestamps = sorted(pts for pts, _, _, shown in packets if shown)
    # keyframes by presentation time, with their decoding time: demuxers whose index holds
    # decoding times (AVI) land on a later keyframe when given a presentation time past it
    # (B-frames); others (Matroska) land a keyframe early when given a decoding time
    keyframes = sorted((pts, pts if dts is None else min(pts, dts)) for pts, dts, key, _ in packets
                       if key and pts is not None)
    keyframe_pts = [pts for pts, _ in keyframes]
    keyframe_set = frozenset(keyframe_pts)
    shown_keyframes = frozenset(pts for pts, _, key, shown in packets if key and shown)
    landing = None  # the shown keyframe just sought: the first frame decoded at or past its time is at it
    position = None  # timestamp of the last frame decoded
    same = 0  # frames decoded with that timestamp before the last one (badly muxed files repeat timestamps)
    frames = None
    for slot, index in enumerate(indices):
        target = timestamps[index]
        # which of the frames with this timestamp it is
        rank = index - int(np.searchsorted(timestamps, target, side="left"))
        # the last keyframe at or before the target; seek if it lies ahead of where we are
        k = np.searchsorted(keyframe_pts, target, side="right") - 1
        if frames is None or (k >= 0 and position is not None and keyframe_pts[k] > position):
            sought = keyframes[max(k, 0)]
            frames = _seek(container, stream, *sought, target, keyframe_set)
            landing = sought[0] if sought[0] in shown_keyframes else None
        for frame in frames:
            if frame.pts is None:  # cannot be placed: not the frame wanted
                continue
            if landing is not None and frame.pts >= landing:
                # past it: the decoder started after the keyframe (MPEG-PS), and the frames it gives
                # depend on frames it never decoded
                if frame.pts != landing:
                    raise _SeekMissed(f"frame {index}: the seek to keyframe {landing} decoded {frame.pts} first")
                landing = None
            same = same + 1 if frame.pts == position else 0
            position = frame.pts
            if frame.pts > target or (frame.pts == target and same >= rank):
                break
        else:
            raise _SeekMissed(f"frame {index}: the stream ended before timestamp {target}")
        if position != target:
            raise _SeekMissed(f"frame {index}: decoder gave timestamp {position}, expected {target}")
        out.put(slot, frame)


def _seek(container, stream, pts: int, dts: int, target: int, keyframe_pts: frozenset):
    """Decoded frames from the keyframe (pts, dts) on: sought by its presentation time, and again
    by its decoding time where that landed past the target. Raises _SeekMissed where the first
    frame is a keyframe at a time the demux pass has no keyframe: MPEG-PS gives the keyframe a seek
    lands on a later frame's timestamp, and every frame after it too, all frames early."""
    container.seek(pts, stream=stream, backward=True)
    frames = container.decode(stream)
    first = next(frames, None)
    if first is not None and first.pts is not None and first.pts > target and dts < pts:
        container.seek(dts, stream=stream, backward=True)
        frames = container.decode(stream)
        first = next(frames, None)
    if first is not None and first.key_frame and first.pts is not None and first.pts not in keyframe_pts:
        raise _SeekMissed(f"the seek to timestamp {pts} gave a keyframe at {first.pts}, where the stream has none")
    return itertools.chain([] if first is None else [first], frames)


def _shown(packet) -> bool:
    return packet.size > 0 and not packet.is_discard


def _require_av():
    if av is None:
        raise ImportError("PyAV is not installed: pip install av (or use the DALI backend)")
