"""Per-video metadata (frame count, size, codec, how it is shown) that sampling and decoding need.

Kept in a sidecar next to the list (`<list>.meta`, JSON lines keyed by the list's path),
written by `prepare` (exact counts) or by probing with PyAV on first use; the DALI-only
machine then needs no PyAV at all. Each row also holds the size and modification time the
file had when it was probed: a row is used only while the file still has them, so the same
list under another data root, or a replaced video, is probed again (a copy that keeps both,
e.g. `rsync -a`, is taken as the same file)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import operator
import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from fractions import Fraction
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch.distributed
from tqdm import tqdm

from ..engine.distributed import gathered_on_every_rank
from ..files import atomic_write_text
from . import pyav
from .lists import VideoEntry, listed_path
from .pyav import VideoDecodeError, VideoInfo, canonical_codec, stamp_or_none
from .workers import map_in_workers

log = logging.getLogger(__name__)


def meta_path(list_file: str) -> str:
    return list_file + ".meta"


def read_meta(path: str) -> Dict[str, VideoInfo]:
    infos = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    # rows written before files were stamped have no stamp, and are never trusted; rows
                    # written before the colour matrix, or the rotation and pixel shape, were recorded have
                    # none (see video_infos)
                    stamp = (int(row["size"]), int(row["mtime_ns"])) if "mtime_ns" in row else None
                    matrix = str(row["matrix"]) if row.get("matrix") is not None else None
                    turns, pixel_aspect = ((int(row["turns"]), _fraction(row["pixel_aspect"])) if "turns" in row
                                           else (None, None))
                    infos[row["path"]] = VideoInfo(int(row["frames"]), int(row["height"]), int(row["width"]),
                                                   canonical_codec(str(row["codec"])), stamp, matrix, turns,
                                                   pixel_aspect)
                # (AttributeError: a line of JSON that is no object; ZeroDivisionError: a pixel shape of "1/0")
                except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError) as e:
                    raise ValueError(f"{path}:{line_no}: bad metadata line ({e})") from e
    return infos


# a data set's rows hold a few pixel shapes: each parsed once (Fraction's parser took a fifth of read_meta)
_fraction = functools.lru_cache(maxsize=1024)(Fraction)


def write_meta(path: str, infos: Iterable[Tuple[str, VideoInfo]]) -> None:
    atomic_write_text(path, "".join(json.dumps(_row(key, info)) + "\n" for key, info in infos))


def _row(key: str, info: VideoInfo) -> dict:
    row = {"path": key, "frames": info.frames, "height": info.height, "width": info.width, "codec": info.codec,
           "matrix": info.matrix}
    if info.turns is not None:
        row.update(turns=info.turns, pixel_aspect=str(info.pixel_aspect))
    if info.stamp is not None:
        row["size"], row["mtime_ns"] = info.stamp
    return row


def video_infos(entries: List[VideoEntry], list_file: str, data_root: str, workers: int = 16,
                timeout: float = 600.0, progress: bool = False, *, probe: Optional[Callable] = None,
                shared: bool = False) -> List:
    """One VideoInfo, or the VideoDecodeError explaining why not, per entry. Uses the
    sidecar's rows that still describe their file, probes the rest (and adds them to the
    sidecar) in up to `workers` processes (see workers.py: a decoder crashing on a damaged
    file, or hanging on it for `timeout` seconds, fails that video, not the caller), with a
    progress bar if `progress`. `probe` probes one entry in a worker (tests give one that
    crashes or hangs as FFmpeg might).

    `shared`, under torch.distributed: the processes of the default group, each calling this with
    the same list, split the probing among them and all get every result (`_read_shared`)."""
    sidecar = meta_path(list_file)
    keys = [listed_path(e.path, data_root) for e in entries]
    share = shared and _group_size() > 1
    known, current = (_agreed_rows if share else _current_rows)(list_file, keys, entries, workers)
    to_probe = [(k, e) for k, e in zip(keys, entries) if k not in current]
    # rows written before the display was recorded: it is read off the file's headers and first frame
    unknown = [(k, e) for k, e in zip(keys, entries) if k in current and known[k].turns is None]
    read = functools.partial(_read_shared, entry_of=dict(zip(keys, entries))) if share else _read_here
    probed, displays = read(probe or _probe, to_probe, unknown, list_file, workers, timeout, progress)
    found = {k: info for (k, _), info in zip(to_probe, probed) if isinstance(info, VideoInfo)}
    found.update({k: _with_display(known[k], *d) for (k, _), d in zip(unknown, displays) if d})
    if found:
        known.update(found)
        try:
            write_meta(sidecar, known.items())
        except OSError as error:  # e.g. a read-only dataset folder: every run probes them again, minutes each
            if not share or torch.distributed.get_rank() == 0:
                log.warning("the %d videos probed are probed again next time: their sidecar cannot be written "
                            "(%s); `vitaclip prepare` writes a list and its sidecar where it can", len(found), error)
    known.update({k: info for (k, _), info in zip(to_probe, probed)})
    # a display that could not be read: as coded, in the recorded matrix, else BT.601 (what FFmpeg and
    # DALI assume), but not recorded
    guessed = [k for (k, _), d in zip(unknown, displays) if not d]
    known.update({k: _with_display(known[k], known[k].matrix or "bt601", 0, Fraction(1)) for k in guessed})
    if guessed and not pyav.available():
        log.warning("%d videos of %s have no display rotation or pixel shape in %s, and PyAV is not installed to "
                    "read them: they are read as coded (phone video may come sideways)", len(guessed), list_file,
                    sidecar)
    # a failure names the line probed: a video listed twice gets each line's own (known keeps the last)
    failed = {id(e): info for (_, e), info in zip(to_probe, probed) if not isinstance(info, VideoInfo)}
    if entries and len(failed) == len(entries) and not any(os.path.exists(e.path) for e in entries):
        # a list none of whose videos is there: most likely read under another data root
        hint = (f"; none of the {len(entries)} videos of {list_file} is under the data root {data_root!r}: is it "
                "the right one (--data-root)?")
        failed = {key: VideoDecodeError(f"{error}{hint}") for key, error in failed.items()}
    return [failed.get(id(e), known[k]) for k, e in zip(keys, entries)]


Keyed = List[Tuple[str, VideoEntry]]  # (listed path, entry)


def _current_rows(list_file: str, keys: List[str], entries: List[VideoEntry], workers: int) -> Tuple[dict, set]:
    """(the sidecar's rows by key, the keys whose rows still describe their files)."""
    sidecar = meta_path(list_file)
    known = read_meta(sidecar) if os.path.exists(sidecar) else {}
    up_to_date = threaded_map(_describes, [known.get(k) for k in keys], [e.path for e in entries], workers=workers)
    return known, {k for k, ok in zip(keys, up_to_date) if ok}


def threaded_map(fn: Callable, *columns: list, workers: int) -> list:
    """[fn(*row) for row in zip(*columns)] in up to `workers` threads (stat waits on the disk, on a
    network file system most of all), a slice of the rows per thread: a task per row cost 30 us of
    the pool's own bookkeeping, more than a stat of a cached file (7 s for 240,000 videos)."""
    rows = list(zip(*columns))
    if not rows:
        return []
    per_task = -(-len(rows) // (4 * max(1, workers)))  # a few slices per thread: a slow disk region evens out

    def run(start: int) -> list:
        return [fn(*row) for row in rows[start:start + per_task]]

    with ThreadPoolExecutor(workers) as pool:
        return [result for part in pool.map(run, range(0, len(rows), per_task)) for result in part]


def _agreed_rows(list_file: str, keys: List[str], entries: List[VideoEntry], workers: int) -> Tuple[dict, set]:
    """`_current_rows` on every rank of the default group, less the rows that the ranks do not all
    hold alike (sidecars apart on each node, or one a rank lacks): those are probed again, and every
    rank takes the result, so that all get the same infos. Compared by one digest each, and only
    where those differ row by row."""
    rows = {}

    def survey() -> str:
        rows["known"], rows["current"] = _current_rows(list_file, keys, entries, workers)
        return hashlib.sha256(repr(sorted(_held(rows["known"], rows["current"]).items())).encode()).hexdigest()

    if len(set(gathered_on_every_rank(survey, f"reading the videos of {list_file}"))) == 1:
        return rows["known"], rows["current"]
    held = gathered_on_every_rank(lambda: _held(rows["known"], rows["current"]),
                                  f"reading the videos of {list_file}")
    disputed = {k for k in set().union(*held) if len({h.get(k) for h in held}) > 1}
    return rows["known"], rows["current"] - disputed


def _held(known: dict, current: set) -> dict:
    """What the current rows say of their videos, their files' stamps aside (copies on two nodes
    differ in time, not in frames), as plain tuples: quicker to make, print and send than copies of
    the rows (seconds for 240,000 videos)."""
    return {k: _HELD(known[k]) for k in current}


_HELD = operator.attrgetter(*(f.name for f in dataclasses.fields(VideoInfo) if f.name != "stamp"))


def _read_here(probe: Callable, to_probe: Keyed, to_show: Keyed, list_file: str, workers: int, timeout: float,
               progress: bool) -> Tuple[list, list]:
    """(probe results of to_probe, displays of to_show), read by this process's workers."""
    if to_probe and not pyav.available():
        raise ImportError(f"{len(to_probe)} videos of {list_file} are not in {meta_path(list_file)}, or changed "
                          "since it was written: install PyAV to probe them, or write the list with `vitaclip prepare`")
    return _read_in_workers(probe, [e for _, e in to_probe], [e for _, e in to_show], workers, timeout, progress)


def _group_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _read_shared(probe: Callable, to_probe: Keyed, to_show: Keyed, list_file: str, workers: int, timeout: float,
                 progress: bool, *, entry_of: Dict[str, VideoEntry]) -> Tuple[list, list]:
    """`_read_here` split across the default process group, every rank calling it: each reads its
    share of the videos that any rank needs read, and all get every result. A data set new to a
    job is then read once, not once per rank (a probe reads the whole file), and every rank sees
    the same infos, hence the same usable videos."""
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()
    needs: list = [None] * world
    dist.all_gather_object(needs, ([k for k, _ in to_probe], [k for k, _ in to_show]))
    probe_keys = sorted({k for keys, _ in needs for k in keys})
    show_keys = sorted({k for _, keys in needs for k in keys} - set(probe_keys))
    mine = probe_keys[rank::world], show_keys[rank::world]

    def read_mine() -> tuple:
        missing = [k for k in mine[0] + mine[1] if k not in entry_of]
        if missing:
            raise ValueError(f"{list_file}: another rank's list has {len(missing)} videos this rank's has not (e.g. "
                             f"{missing[0]}): every rank must load the same list")
        probed, displays = _read_here(probe, [(k, entry_of[k]) for k in mine[0]], [(k, entry_of[k]) for k in mine[1]],
                                      list_file, workers, timeout, progress)
        return dict(zip(mine[0], probed)), dict(zip(mine[1], displays))

    outcomes = gathered_on_every_rank(read_mine, f"reading the videos of {list_file}")
    results = {k: r for probed, _ in outcomes for k, r in probed.items()}
    probed_elsewhere = [k for k, _ in to_probe if k not in outcomes[rank][0] and isinstance(results[k], VideoInfo)]
    results.update(_stamped_here({k: results[k] for k in probed_elsewhere}, entry_of, list_file, workers))
    shown = {k: d for _, displays in outcomes for k, d in displays.items()}
    # a video this rank read from the sidecar may have been new to another: its probe holds its display
    shown.update({k: (r.matrix, r.turns, r.pixel_aspect) if isinstance(r, VideoInfo) else None
                  for k, r in results.items()})
    return [results[k] for k, _ in to_probe], [shown[k] for k, _ in to_show]


def _stamped_here(infos: Dict[str, VideoInfo], entry_of: Dict[str, VideoEntry], list_file: str,
                  workers: int) -> Dict[str, VideoInfo]:
    """Another rank's probes, stamped with this rank's files: on another node they were taken from
    that node's copy, whose modification time differs, and this node's sidecar would hold rows that
    never describe its own files (every job would probe the whole data set again). A copy of another
    size is another file: its row is not recorded here (no stamp), and the disagreement is logged."""
    stamps = dict(zip(infos, threaded_map(stamp_or_none, [entry_of[k].path for k in infos], workers=workers)))
    missing = [k for k in infos if stamps[k] is None]
    apart = [k for k, info in infos.items() if stamps[k] is not None and stamps[k][0] != info.stamp[0]]
    for keys, how in ((missing, "are missing here, unlike"), (apart, "differ in size here from")):
        if keys:
            log.warning("%d videos of %s %s the copy another rank probed (e.g. %s): their infos are that copy's, "
                        "and are not recorded in this node's %s", len(keys), list_file, how, entry_of[keys[0]].path,
                        meta_path(list_file))
    unrecorded = set(missing) | set(apart)
    return {k: dataclasses.replace(info, stamp=None if k in unrecorded else stamps[k]) for k, info in infos.items()}


def _read_in_workers(probe: Callable, to_probe: List[VideoEntry], to_show: List[VideoEntry], workers: int,
                     timeout: float, progress: bool):
    """(probe(entry) for to_probe, _display(entry.path) for to_show), read in worker processes. A
    video whose worker died reading it is a VideoDecodeError (probe) or unread, None (display), as
    are all displays without PyAV."""
    shown = to_show if pyav.available() else []
    calls = [(probe, e) for e in to_probe] + [(_display, e.path) for e in shown]
    results = []
    if calls:
        with tqdm(total=len(calls), desc="probe", unit="video", disable=not progress, dynamic_ncols=True) as bar:
            results = map_in_workers(calls, workers, timeout, bar.update)
    probed = [VideoDecodeError(f"{e.where()}: the decoder crashed on it, or hung for {timeout:g} s (its worker "
                               "process died)")
              if isinstance(r, BrokenProcessPool) else r for e, r in zip(to_probe, results)]
    displays = [None if isinstance(r, BrokenProcessPool) else r for r in results[len(to_probe):]]
    return probed, displays + [None] * (len(to_show) - len(shown))


def _with_display(info: VideoInfo, matrix: str, turns: int, pixel_aspect: Fraction) -> VideoInfo:
    return dataclasses.replace(info, matrix=matrix, turns=turns, pixel_aspect=pixel_aspect)


def _display(path: str) -> Optional[tuple]:
    """A video's (matrix, turns, pixel_aspect); None where it cannot be read (an unreadable file
    fails when decoded, and is named then). Run where PyAV is (see _read_in_workers)."""
    try:
        return pyav.file_display(path)
    except VideoDecodeError:
        return None


def _describes(info, path: str) -> bool:
    """Whether a sidecar row still holds for the file at path (a file gone: probing says so, naming
    the list line)."""
    return info is not None and info.stamp is not None and info.stamp == stamp_or_none(path)


def _probe(entry: VideoEntry):
    if not os.path.isfile(entry.path):
        return VideoDecodeError(f"{entry.where()}: " + ("a folder, not a video" if os.path.isdir(entry.path)
                                                        else "file not found"))
    if os.path.getsize(entry.path) == 0:
        return VideoDecodeError(f"{entry.where()}: empty file")
    try:
        return pyav.probe(entry.path)
    except VideoDecodeError as e:
        return VideoDecodeError(f"{entry.list_file}:{entry.line}: {e}")
