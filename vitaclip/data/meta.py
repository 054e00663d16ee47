"""Per-video metadata (frame count, size, codec) that sampling needs before decoding.

Kept in a sidecar next to the list (`<list>.meta`, JSON lines keyed by the list's path),
written by `prepare` (exact counts) or by probing with PyAV on first use; the DALI-only
machine then needs no PyAV at all."""
from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterable, List, Tuple

from . import pyav
from .lists import VideoEntry, write_atomically
from .pyav import VideoDecodeError, VideoInfo


def meta_path(list_file: str) -> str:
    return list_file + ".meta"


def read_meta(path: str) -> Dict[str, VideoInfo]:
    infos = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                    infos[row["path"]] = VideoInfo(int(row["frames"]), int(row["height"]),
                                                   int(row["width"]), str(row["codec"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{line_no}: bad metadata line ({e})") from e
    return infos


def write_meta(path: str, infos: Iterable[Tuple[str, VideoInfo]]) -> None:
    write_atomically(path, "".join(
        json.dumps({"path": key, "frames": info.frames, "height": info.height,
                    "width": info.width, "codec": info.codec}) + "\n" for key, info in infos))


def video_infos(entries: List[VideoEntry], list_file: str, data_root: str,
                threads: int = 16) -> List:
    """One VideoInfo, or the VideoDecodeError explaining why not, per entry. Uses the
    sidecar where it covers an entry, probes the rest (and adds them to the sidecar)."""
    sidecar = meta_path(list_file)
    known = read_meta(sidecar) if os.path.exists(sidecar) else {}
    keys = [os.path.relpath(e.path, data_root) if data_root else e.path for e in entries]
    missing = [(k, e) for k, e in zip(keys, entries) if k not in known]
    if missing:
        if not pyav.available():
            raise ImportError(f"{len(missing)} videos of {list_file} are not in {sidecar}: "
                              "install PyAV to probe them, or write the list with `vitaclip prepare`")
        with ThreadPoolExecutor(threads) as pool:
            probed = list(pool.map(lambda ke: _probe(ke[1]), missing))
        found = {k: info for (k, _), info in zip(missing, probed) if isinstance(info, VideoInfo)}
        if found:
            known.update(found)
            try:
                write_meta(sidecar, known.items())
            except OSError:
                pass  # read-only dataset folder: probe again next time
        known.update({k: info for (k, _), info in zip(missing, probed)})
    return [known[k] for k in keys]


def _probe(entry: VideoEntry):
    if not os.path.isfile(entry.path):
        return VideoDecodeError(f"{entry.where()}: file not found")
    if os.path.getsize(entry.path) == 0:
        return VideoDecodeError(f"{entry.where()}: empty file")
    try:
        return pyav.probe(entry.path)
    except VideoDecodeError as e:
        return VideoDecodeError(f"{entry.list_file}:{entry.line}: {e}")
