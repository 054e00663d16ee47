"""Re-encode a video data set into a form that decodes fast: short side 256 (configurable),
H.264 without B-frames, tuned for fast decoding, a keyframe every `gop` frames (seeks stay
short), every source frame kept (frame i stays frame i, so sampling is unchanged).

Parallel (processes), resumable (each output is written to a temporary name and renamed
when complete; one made from the same source file, as OUT_DIR/prepare-sources.jsonl records,
is not made again), with a progress bar. A video goes to OUT_DIR/videos/<its path under the
data root>, its extension replaced by .mp4 (one outside the data root under its absolute path),
once however often the list names it. Writes OUT_DIR/<list name> in the original `path,label` format (paths relative to
OUT_DIR) and its `.meta` sidecar (exact frame counts, so the loader needs no probing); OUT_DIR
cannot be the list's own folder. Stops at the first bad list line or video; `--on-error skip`
leaves them out of the new list and exits with status 1.

    vitaclip prepare SRC_LIST OUT_DIR [--data-root DIR] [--short-side 256]
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import functools
import json
import logging
import os
import sys
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ..choices import PREPARE_TIMEOUT, X264_PRESETS, usable_cores
from ..files import atomic_write_text, fsync_file, fsync_folder, publish, sole_writer
from . import pyav
from .lists import read_video_list, write_video_list
from .meta import meta_path, read_meta, write_meta
from .pyav import VideoDecodeError, VideoInfo
from .workers import abandon, as_completed, check_workers_start, run_alone, within, worker_pool

# a full disk or quota: no video can be written, so it stops the run in skip mode too (skipping it
# left every later video out; a rerun once there is space goes on where it stopped)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
PARTIAL = ".partial.mp4"  # an output being encoded: dst + PARTIAL, renamed to dst once whole

log = logging.getLogger(__name__)
SETTINGS_FILE = "prepare.json"
LOCK_FILE = "prepare.lock"
SOURCES_FILE = "prepare-sources.jsonl"  # per output: the source file (path, size, mtime) it was made from
LISTS_FILE = "prepare-lists.json"  # per prepared list in OUT_DIR: the list it was prepared from
# what the outputs are, recorded with each source: 3, upright (display rotation applied), in square pixels
# and tagged with the source's colour matrix. Outputs of format 2 (pixels as the source's) are reused
# where the source's pixels are square; older ones (recorded without a format) are made again.
OUTPUT_FORMAT = 3
# FFmpeg's AVColorSpace values: an RGB source's tag (GBR), and BT.601's, which its output gets instead
AVCOL_SPC_RGB, AVCOL_SPC_SMPTE170M = 0, 6


@dataclass(frozen=True)
class EncodeSettings:
    short_side: int = 256
    gop: int = 16
    crf: int = 23
    preset: str = "veryfast"

    def __post_init__(self):
        # checked before any video: a bad value would fail (or shrink) every one of them
        problems = [f"{name} must be >= {low}, got {value}" for name, value, low in
                    (("short_side", self.short_side, 2), ("gop", self.gop, 1)) if value < low]
        if not 0 <= self.crf <= 51:
            problems.append(f"crf must be in [0, 51] (x264's range), got {self.crf}")
        if self.preset not in X264_PRESETS:
            problems.append(f"preset must be one of {X264_PRESETS}, got {self.preset!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class PrepareResult:
    list_file: str
    written: int
    reused: int
    failed: List[str]


def output_size(height: int, width: int, short_side: int):
    """(h, w) with the short side = short_side (never upscaled), both even for 4:2:0: an odd side
    kept at its size loses a row or column (rounded up, it was enlarged by one)."""
    scale = min(1.0, short_side / min(height, width))
    return tuple(2 * max(1, min(side // 2, round(side * scale / 2))) for side in (height, width))


def transcode(src: str, dst: str, settings: EncodeSettings = EncodeSettings()) -> VideoInfo:
    """Re-encode src into dst (mp4, H.264) atomically; returns the output's VideoInfo."""
    av = pyav.av
    pyav._require_av()
    tmp = dst + PARTIAL
    frames = 0
    try:
        with av.open(src) as source, av.open(tmp, "w") as out:
            in_stream = pyav.video_stream(source, src)
            in_stream.thread_type = "AUTO"
            if in_stream.codec_context.height <= 0 or in_stream.codec_context.width <= 0:
                raise VideoDecodeError(f"{src}: video of unknown size")
            rate = in_stream.average_rate or in_stream.guessed_rate or Fraction(25)
            # square pixels: an anamorphic source is stretched to the width it is shown at
            square_width = max(1, round(in_stream.codec_context.width * pyav.pixel_aspect(in_stream)))
            coded = output_size(in_stream.codec_context.height, square_width, settings.short_side)
            # the pixels keep their YCbCr matrix (scaling does not convert it): so does the tag, as the
            # file's headers give it (decoders may report another once decoding, e.g. VP8)
            matrix, stream = pyav.matrix_of(in_stream), None
            tags = {tag: getattr(in_stream.codec_context, tag)
                    for tag in ("colorspace", "color_primaries", "color_trc")}
            if tags["colorspace"] == AVCOL_SPC_RGB:  # RGB pixels, made YCbCr here with BT.601 (matrix_of's)
                tags["colorspace"] = AVCOL_SPC_SMPTE170M
            for frame in pyav.decoded_from_first_keyframe(source, in_stream):
                if stream is None:  # the first frame tells how the video is shown (a phone's display rotation)
                    turns = pyav.quarter_turns(frame)
                    height, width = coded[::-1] if turns % 2 else coded
                    stream = _h264_stream(out, rate, height, width, tags, settings)
                frame = pyav.limited_range_yuv420(frame, height=coded[0], width=coded[1], interpolation="AREA")
                if turns:  # upright in the file, which then needs no turn when read
                    frame = _turned(frame, turns)
                frame.pts, frame.time_base = frames, Fraction(1) / rate  # constant rate: frame i stays i
                # untyped: the encoder makes a frame typed I (every frame of an intra-only source) a keyframe
                frame.pict_type = av.video.frame.PictureType.NONE
                out.mux(stream.encode(frame))
                frames += 1
            if stream is not None:
                out.mux(stream.encode(None))
    except VideoDecodeError:
        _remove(tmp)
        raise
    except (av.FFmpegError, OSError) as e:
        _remove(tmp)
        if getattr(e, "errno", None) in NO_SPACE:  # (as a plain OSError: it crosses the worker's pipe)
            raise OSError(e.errno, f"{os.strerror(e.errno)}: writing {dst}") from e
        raise VideoDecodeError(f"{src}: cannot transcode ({e})") from e
    if frames == 0:
        _remove(tmp)
        raise VideoDecodeError(f"{src}: no frames decoded")
    publish(tmp, dst)  # whole, where it counts as done
    return VideoInfo(frames, height, width, "h264", pyav.file_stamp(dst), matrix)


def _h264_stream(out, rate, height: int, width: int, tags: dict, settings: EncodeSettings):
    stream = out.add_stream("libx264", rate=rate)
    stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
    for tag, value in tags.items():
        setattr(stream.codec_context, tag, value)
    stream.options = {"crf": str(settings.crf), "preset": settings.preset, "tune": "fastdecode",
                      "g": str(settings.gop), "keyint_min": str(settings.gop), "bf": "0", "sc_threshold": "0"}
    return stream


def _turned(frame, turns: int):
    """A yuv420p frame turned anticlockwise by `turns` quarter turns (even sizes: output_size's)."""
    av = pyav.av
    planes = [np.rot90(pyav.plane_pixels(plane), turns) for plane in frame.planes]
    height, width = planes[0].shape
    packed = np.concatenate([plane.reshape(-1) for plane in planes]).reshape(height * 3 // 2, width)
    return av.VideoFrame.from_ndarray(packed, format="yuv420p")


def output_name(source: str, data_root: str) -> str:
    """The prepared video's path in OUT_DIR: videos/<source's path under data_root>, or, for a
    source outside data_root (an absolute path, or one climbing out with ..), videos/<its
    absolute path>; either with its extension replaced by .mp4 (a/x.avi: videos/a/x.mp4)."""
    rel = os.path.normpath(os.path.relpath(source, data_root) if data_root else source)
    if os.path.isabs(rel) or rel.split(os.sep)[0] == os.pardir:
        rel = os.path.abspath(source).lstrip(os.sep)
    return os.path.join("videos", os.path.splitext(rel)[0] + ".mp4")


def source_record(src: str) -> dict:
    """What identifies the source file an output is made from: its path as listed (a data set of
    links re-pointed to new versions of its videos has them encoded again) and its stamp."""
    size, mtime_ns = pyav.file_stamp(src)
    return {"source": os.path.abspath(src), "size": size, "mtime_ns": mtime_ns, "format": OUTPUT_FORMAT}


def read_sources(out_dir: str) -> Dict[str, dict]:
    """OUT_DIR's record of sources, by output name (the last row of each wins; a row cut short
    by a killed run is ignored, and its output made again)."""
    rows = {}
    path = os.path.join(out_dir, SOURCES_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    row = json.loads(line)
                    rows[row.pop("output")] = row
                except (json.JSONDecodeError, KeyError, AttributeError):
                    continue
    return rows


def may_reuse(src: str, dst: str, recorded: Optional[dict], source: dict) -> bool:
    """Whether the existing output `dst` holds the video `src` (whose `source_record` is `source`),
    by `recorded`, the source it was made from: the same file unchanged, or, where the data set
    moved (the recorded file is gone), a file of the same size and time. Another existing file of
    the same name (e.g. another list's root) is a ValueError, as is a source where its output goes."""
    exists = os.path.exists(dst)
    if exists and os.path.samefile(src, dst):
        raise ValueError(f"{src} is where its prepared video would go: choose an OUT_DIR outside the data root")
    if recorded is None:
        return False  # (made by an older version: made again)
    same_stamp = (recorded["size"], recorded["mtime_ns"]) == (source["size"], source["mtime_ns"])
    if recorded["source"] != source["source"]:
        if os.path.exists(recorded["source"]):
            another = not os.path.samefile(recorded["source"], src)
        else:  # the data set moved, or another root's video was made here: the same video if unchanged
            another = not same_stamp
        if another:
            raise ValueError(f"{dst} was prepared from {recorded['source']}, another video of the same name: "
                             f"prepare this list into another OUT_DIR")
    if not (exists and same_stamp):
        return False
    # an older version's output: format 2 differs only for a source of non-square pixels
    return recorded.get("format") == OUTPUT_FORMAT or (recorded.get("format") == 2 and _square_pixels(src))


def _square_pixels(src: str) -> bool:
    try:
        with pyav.av.open(src) as container:
            return pyav.pixel_aspect(pyav.video_stream(container, src)) == 1
    except (pyav.av.FFmpegError, OSError, UnicodeDecodeError, VideoDecodeError):
        return False  # made again, which names what is wrong with it


def _job(src: str, dst: str, settings: EncodeSettings, reuse: bool) -> Tuple[VideoInfo, bool]:
    """(info, reused) for one video: the existing output when `reuse` and it can be read, else a new one
    (an output damaged since it was finished, say by a copy of OUT_DIR stopped midway, is made again)."""
    if reuse:
        try:
            return pyav.probe(dst), True
        except VideoDecodeError as e:
            log.warning("%s: made again: %s", dst, e)
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    return transcode(src, dst, settings), False


def record_settings(out_dir: str, settings: EncodeSettings) -> None:
    """OUT_DIR/prepare.json says how its videos were encoded: finished outputs are reused, so
    another run into it must use the same settings."""
    path = os.path.join(out_dir, SETTINGS_FILE)
    wanted = dataclasses.asdict(settings)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            found = json.load(f)
        if found == wanted:
            return
        # a video is recorded before it is encoded: only one whose output exists was finished (a first run
        # stopped early, by a wrong --data-root, Ctrl-C or a bad video, may have none: none to mix with)
        if any(os.path.exists(os.path.join(out_dir, name)) for name in read_sources(out_dir)):
            raise ValueError(f"{out_dir} holds videos prepared with {found}, which these settings ({wanted}) would "
                             f"mix with: choose another OUT_DIR")
    atomic_write_text(path, json.dumps(wanted, indent=1))


def prepare(src_list: str, out_dir: str, data_root: str = "", settings: EncodeSettings = EncodeSettings(),
            workers: Optional[int] = None, on_error: str = "raise", progress: bool = True,
            timeout: Optional[float] = PREPARE_TIMEOUT, *, job: Callable = _job) -> PrepareResult:
    """`job` encodes one video in a worker process (tests give one that crashes or hangs as FFmpeg
    might); a video that takes more than `timeout` seconds is taken for a hung encoder (its worker
    is ended, as if it had crashed)."""
    workers = usable_cores() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if timeout is not None and not timeout > 0:  # (NaN too; inf: no limit)
        raise ValueError(f"timeout must be positive, got {timeout}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"OUT_DIR {out_dir} is a file, not a folder")
    # before samefile(), which answers a missing list with a bare "[Errno 2]"
    entries = read_video_list(src_list, data_root, on_error=on_error)
    out_list = os.path.join(out_dir, os.path.basename(src_list))
    if os.path.exists(out_list) and os.path.samefile(out_list, src_list):
        raise ValueError(f"{src_list}: OUT_DIR {out_dir} is the list's own folder, where the prepared list would "
                         "overwrite it: choose another OUT_DIR")
    os.makedirs(out_dir, exist_ok=True)
    # another `prepare` into it (say of a list sharing videos with this one's) would write the same files
    with sole_writer(os.path.join(out_dir, LOCK_FILE), f"{out_dir} is being written by another `vitaclip prepare`: "
                     "wait for it to end, or prepare into another OUT_DIR"):
        return _prepare_into(out_dir, src_list, out_list, entries, data_root, settings, workers, on_error, progress,
                             timeout, job)


def record_list(out_dir: str, src_list: str) -> None:
    """OUT_DIR/prepare-lists.json says which list each prepared list was made from: another list of the
    same file name (say l1/val.txt, then l2/val.txt) would replace it, and is refused instead."""
    path, name = os.path.join(out_dir, LISTS_FILE), os.path.basename(src_list)
    lists = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lists = json.load(f)
    earlier = lists.get(name)
    written = os.path.exists(os.path.join(out_dir, name))  # else the earlier run stopped before it: nothing to replace
    if written and earlier is not None and os.path.exists(earlier) and not os.path.samefile(earlier, src_list):
        raise ValueError(f"{os.path.join(out_dir, name)} was prepared from {earlier}, which {src_list} would replace: "
                         f"prepare this list under another file name, or into another OUT_DIR")
    if earlier != os.path.abspath(src_list):  # (a list moved since is taken for the same)
        lists[name] = os.path.abspath(src_list)
        atomic_write_text(path, json.dumps(lists, indent=1))


def recorded_infos(out_list: str) -> Dict[str, VideoInfo]:
    """The rows of the prepared list's sidecar (an earlier run's), by output name; none where it is
    missing or unreadable. A finished output that a row still describes is reused without probing it
    again, which reads the whole file (hours for a data set of Kinetics' size)."""
    path = meta_path(out_list)
    try:
        return read_meta(path) if os.path.exists(path) else {}
    except (OSError, ValueError):
        return {}


def _describes_output(info: VideoInfo, dst: str) -> bool:
    """Whether a sidecar row holds all a probe of `dst` would say (rows of older versions lack the
    stamp, colour matrix or display), and still describes the file as it is."""
    if info.stamp is None or info.matrix is None or info.turns is None:
        return False
    try:
        return info.stamp == pyav.file_stamp(dst)
    except OSError:
        return False


def _prepare_into(out_dir: str, src_list: str, out_list: str, entries, data_root: str, settings: EncodeSettings,
                  workers: int, on_error: str, progress: bool, timeout: Optional[float],
                  job: Callable) -> PrepareResult:
    """`prepare`'s work, OUT_DIR made and held."""
    record_settings(out_dir, settings)
    record_list(out_dir, src_list)
    failed = list(entries.skipped)

    def fail(entry, problem: str, error: Exception) -> None:
        message = f"{entry.list_file}:{entry.line}: {problem}"
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            raise error
        if on_error == "raise":
            raise VideoDecodeError(message) from error
        log.warning("skipping: %s", message)
        failed.append(message)

    names, first_of = {}, {}  # entry -> output name; output name -> the first entry with it
    for entry in entries:
        name = output_name(entry.path, data_root)
        first = first_of.setdefault(name, entry)
        if first is not entry and os.path.normpath(first.path) != os.path.normpath(entry.path):
            fail(entry, f"{entry.path} would be prepared as {name}, as line {first.line}'s {first.path} is",
                 ValueError("two sources, one output"))
        else:
            names[entry] = name  # a video listed again (e.g. under another label) is encoded once
    known = read_sources(out_dir)
    described = recorded_infos(out_list)
    results = {}

    encode = functools.partial(within, timeout, job)
    died = "the encoder crashed" + (f" or ran past {timeout:g} s" if timeout is not None else "")

    def finish(name: str, future) -> None:
        try:
            results[name] = future.result()
        except BrokenProcessPool:
            raise
        except Exception as e:  # noqa: BLE001 - named with its list line, raised or skipped there
            fail(first_of[name], str(e) if isinstance(e, VideoDecodeError) else f"{type(e).__name__}: {e}", e)

    def after_crash(lost: List[Tuple[str, tuple]]) -> None:
        """A worker died (FFmpeg crashed) on one of the videos in flight, which all failed with it:
        in raise mode an error naming them, else each again alone, to leave out the one at fault. Their
        partial outputs go (an encoder ended midway leaves its own: a video left out kept it for good)."""
        for name, _ in lost:
            _remove(os.path.join(out_dir, name) + PARTIAL)
        if on_error == "raise":
            where = "; ".join(first_of[name].where() for name, _ in lost)
            raise VideoDecodeError(f"a worker process died ({died}) on one of: {where}; "
                                   f"--on-error skip finds and leaves it out")
        for name, args in lost:
            try:
                finish(name, run_alone(encode, args))
            except BrokenProcessPool as crash:
                _remove(os.path.join(out_dir, name) + PARTIAL)
                fail(first_of[name], f"{died} on it (its worker process died)", crash)
            bar.update()

    bar = tqdm(total=len(set(names.values())), disable=not progress, desc="prepare", unit="video")
    pool = worker_pool(workers)

    def calls(sources):
        """(name, job arguments) of each video to prepare, its source recorded before its output can
        exist (a killed run leaves no output without a record); checked as the pool asks for more."""
        for name, entry in first_of.items():
            if entry not in names:
                continue
            dst = os.path.join(out_dir, name)
            try:
                source = source_record(entry.path)
                reuse = may_reuse(entry.path, dst, known.get(name), source)
            except (OSError, ValueError) as e:
                fail(entry, str(e), e)
                continue
            if not reuse and os.path.exists(dst):  # another version's: gone before the record says this one's
                os.remove(dst)
                fsync_folder(os.path.dirname(dst))
            if known.get(name) != source:
                sources.write(json.dumps({"output": name, **source}) + "\n")
                sources.flush()
            info = described.get(name) if reuse else None
            if info is not None and _describes_output(info, dst):  # no need to read the output again
                results[name] = (info, True)
                bar.update()
                continue
            yield name, (entry.path, dst, settings, reuse)

    try:
        with open(os.path.join(out_dir, SOURCES_FILE), "a+", encoding="utf-8") as sources:
            if sources.tell() and not _ends_with_newline(sources.name):  # a row cut short: do not extend it
                sources.write("\n")
            pending = calls(sources)
            while True:
                running, current = {}, None
                try:
                    for name, args, future in as_completed(pool, encode, pending, workers, running):
                        current = (name, args)
                        finish(name, future)
                        current = None
                        bar.update()
                    break
                except BrokenProcessPool:
                    abandon(pool)
                    check_workers_start()  # (else every video in flight is blamed)
                    after_crash(([current] if current else []) + list(running.values()))
                    pool = worker_pool(workers)
            fsync_file(sources.name)
    except BaseException:  # an error in raise mode, or Ctrl-C (which the workers get too)
        abandon(pool)
        raise
    finally:
        bar.close()
    pool.shutdown()
    done = [e for e in entries if names.get(e) in results]  # list order kept
    for entry in entries:  # the other entries of a video that failed
        if entry in names and names[entry] not in results and first_of[names[entry]] is not entry:
            failed.append(f"{entry.list_file}:{entry.line}: the same video as line {first_of[names[entry]].line}")
    write_video_list(out_list, [(names[e], e.label) for e in done])
    write_meta(meta_path(out_list), [(name, info) for name, (info, _) in results.items()])
    reused = sum(reused for _, reused in results.values())
    if failed:
        log.warning("prepare: %d of %d entries failed", len(failed), len(entries) + len(entries.skipped))
    return PrepareResult(out_list, len(results) - reused, reused, failed)


def run(args: argparse.Namespace) -> int:
    """Runs `vitaclip prepare`'s parsed arguments; the exit status is 1 when entries failed (skip
    mode), 0 otherwise."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = prepare(args.src_list, args.out_dir, args.data_root,
                     EncodeSettings(args.short_side, args.gop, args.crf, args.preset),
                     args.workers, args.on_error, progress=not args.no_progress, timeout=args.timeout)
    print(f"wrote {result.list_file}: {result.written} encoded, {result.reused} already done, "
          f"{len(result.failed)} failed")
    for message in result.failed:
        print(f"  failed: {message}", file=sys.stderr)
    return 1 if result.failed else 0


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass



if __name__ == "__main__":  # the form earlier releases documented: `vitaclip prepare` is the same
    from ..cli import main

    sys.exit(main(["prepare", *sys.argv[1:]]))
