"""List files (`path,label` per line, paths relative to a data root) and class names.

Errors name the file and the 1-based line, so a bad line in a 240k-line list is found at once.
"""
from __future__ import annotations

import codecs
import csv
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from ..files import atomic_write_text


@dataclass(frozen=True)
class VideoEntry:
    path: str  # absolute (data root joined)
    label: int
    line: int  # 1-based line in the list file, for error messages
    list_file: str = ""

    def where(self) -> str:
        return f"{self.list_file}:{self.line} ({self.path})"


def listed_path(path: str, data_root: str) -> str:
    """A video's path as a list gives it, relative to the data root: what sidecar rows and list
    digests key videos by, so that the same list under another root stays the same list."""
    if not data_root:
        return path
    # the common case, a path joined under the root, without relpath's two abspath calls (it took half
    # of a 240,000-video list's start-up, called for each video by the sidecar and the list's digest)
    prefix = data_root if data_root.endswith(os.sep) else data_root + os.sep
    if path.startswith(prefix):
        rest = os.path.normpath(path[len(prefix):])
        if not os.path.isabs(rest) and rest != os.pardir and not rest.startswith(os.pardir + os.sep):
            return rest
    return os.path.relpath(path, data_root)


def check_list_file(list_file: str) -> None:
    """A missing list named as one (not open()'s bare "[Errno 2] No such file or directory")."""
    if not os.path.exists(list_file):
        raise FileNotFoundError(f"list file {list_file} does not exist")


def read_video_list(list_file: str, data_root: str = "", num_classes: Optional[int] = None,
                    on_error: str = "raise") -> List[VideoEntry]:
    """Parse a `path,label` list. Blank lines are ignored; anything else that is not
    `path,int` with 0 <= label < num_classes raises ValueError naming file and line, or,
    with on_error="skip", is dropped (see `skipped` on the returned list)."""
    check_error_policy(on_error)
    check_list_file(list_file)
    entries = VideoList()
    for line_no, text in text_lines(list_file):
        line = text.strip()
        if not line:
            continue
        try:
            entries.append(_parse_line(line, line_no, list_file, data_root, num_classes))
        except ValueError as e:
            if on_error == "raise":
                raise
            entries.skipped.append(str(e))
    return entries


def text_lines(path: str) -> Iterator[Tuple[int, str]]:
    """(1-based number, text) of each line of a UTF-8 file, split where text mode splits (LF, CR,
    CRLF), without a leading byte order mark (Windows editors write one). A file that is not
    UTF-8 (a whole-file problem: skipping its lines would drop data) raises ValueError naming
    file and line; a folder is refused as what it is."""
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a list file")
    with open(path, "rb") as f:
        data = f.read()
    for line_no, raw in enumerate(data.removeprefix(codecs.BOM_UTF8).splitlines(), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{line_no}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                             f"{e.start + 1}): save the file as UTF-8") from None
        yield line_no, text


class VideoList(list):
    """A list of VideoEntry that also remembers what was skipped and why."""

    def __init__(self, *args):
        super().__init__(*args)
        self.skipped: List[str] = []


_INTEGER = re.compile(r"[+-]?[0-9]+")


def is_list_line(text: str) -> bool:
    """Whether `text` reads as a list file's `path,label` line (the label an integer)."""
    path, comma, label = text.rpartition(",")
    return bool(comma and path.strip() and _INTEGER.fullmatch(label.strip()))


def _parse_line(line, line_no, list_file, data_root, num_classes) -> VideoEntry:
    # rsplit: paths may contain commas, labels never do
    parts = line.rsplit(",", 1)
    where = f"{list_file}:{line_no}"
    if len(parts) != 2 or not parts[0].strip():
        raise ValueError(f"{where}: expected 'path,label', got {line!r}")
    path, label_text = parts[0].strip(), parts[1].strip()
    # not int(): it also takes "1_0" and non-ASCII digits
    if not _INTEGER.fullmatch(label_text):
        raise ValueError(f"{where}: label {label_text!r} is not an integer")
    label = int(label_text)
    if label < 0 and num_classes is None:  # (no range to name)
        raise ValueError(f"{where}: label {label} is negative (labels count from 0)")
    if label < 0 or (num_classes is not None and label >= num_classes):
        names = "1 name" if num_classes == 1 else f"{num_classes} names"
        classes = f" (the class list has {names}: too short, or a wrong label?)" if label > 0 else ""
        raise ValueError(f"{where}: label {label} out of range [0, {num_classes}){classes}")
    return VideoEntry(os.path.join(data_root, path), label, line_no, list_file)


def write_video_list(list_file: str, rows: Sequence[tuple]) -> None:
    """Write `(relative_path, label)` rows in the original format, atomically."""
    atomic_write_text(list_file, "".join(f"{path},{int(label)}\n" for path, label in rows))


def read_class_names(path: str) -> List[str]:
    """One class name per line (blank lines ignored); or an index file whose every line is
    `INDEX NAME` or `INDEX,NAME`, indices counting up from 0 or 1 (UCF101's `classInd.txt`, CSVs
    with an `id,name` header; `NAME,INDEX` under a `name,id` one), names turned into words as
    folder names are; or, for a directory, its sub-folder names turned into words (one folder per
    class), in plain `sorted()` order of the folder names (by code point: `Zumba` before
    `abseiling`), as torchvision's ImageFolder numbers classes. Folders starting with `.` or `_`
    (`.ipynb_checkpoints`, `__pycache__`) are not classes. None at all is an error: a model or an
    evaluation over no classes is no use."""
    if os.path.isdir(path):
        folders = [d for d in sorted(os.listdir(path)) if os.path.isdir(os.path.join(path, d))
                   and not d.startswith((".", "_"))]
        if not folders:
            raise ValueError(f"{path} names no classes: it holds no class folders")
        names = [folder_to_class_name(d) for d in folders]
        first: Dict[str, str] = {}
        for folder, name in zip(folders, names):  # two classes of one name: which of them is a video's?
            other = first.setdefault(name, folder)
            if other != folder:
                raise ValueError(f"{path}: class folders {other!r} and {folder!r} both read as the class {name!r}: "
                                 "rename one")
        return names
    lines = [(line_no, text.strip()) for line_no, text in text_lines(path) if text.strip()]
    if not lines:
        raise ValueError(f"{path} names no classes: it holds no lines")
    if len(lines) == 1 and _id_name_columns(lines[0][1]) is not None:  # not one class called "id,name"
        raise ValueError(f"{path} names no classes: it holds only a header line, {lines[0][1]!r}")
    numbered = _index_file_names(path, lines)
    if numbered is None and all(is_list_line(text) for _, text in lines):  # zero-shot would score its lines
        raise ValueError(f"{path} holds 'path,label' lines (the first: {lines[0][1]!r}), a video list, not class "
                         "names: give the class list (one name per line)")
    return numbered if numbered is not None else [text for _, text in lines]


_INDEXED_NAME = re.compile(r"(\d+)\s*[,\t ]\s*(\S.*)")
_CSV_HEADER = re.compile(r"[^\d,][^,]*,[^,]+")  # "id,name": two fields, the first not a number
_CSV_ROW = re.compile(r"\d+,.+")


def _index_file_names(path: str, lines: List[Tuple[int, str]]) -> Optional[List[str]]:
    """The names of an index file (every line numbered; a CSV's may follow a header line), or None
    for a plain list. Indices out of order are an error: the labels would shift."""
    columns = _id_name_columns(lines[0][1])
    if len(lines) > 1 and columns is not None:
        lines = [(line_no, _id_first(path, line_no, text, columns)) for line_no, text in lines[1:]]
    elif len(lines) > 1 and _CSV_HEADER.fullmatch(lines[0][1]) and all(_CSV_ROW.fullmatch(t) for _, t in lines[1:]):
        lines = lines[1:]  # a CSV header such as "index,class"
    matches = [_INDEXED_NAME.fullmatch(text) for _, text in lines]
    if not matches or not all(matches):
        return None
    first = int(matches[0].group(1))
    if first not in (0, 1):
        raise ValueError(f"{path}:{lines[0][0]}: a numbered class list starts at 0 or 1, not {first}")
    for expected, (line_no, _), match in zip(range(first, first + len(lines)), lines, matches):
        if int(match.group(1)) != expected:
            raise ValueError(f"{path}:{line_no}: class index {match.group(1)} where {expected} was expected: "
                             "the lines of a numbered class list count up one by one")
    return [folder_to_class_name(_unquoted(match.group(2))) for match in matches]


_CSV_ROWS = {("id", "name"): re.compile(r"(?P<id>\d+)\s*,\s*(?P<name>.+)"),
             ("name", "id"): re.compile(r"(?P<name>.+?)\s*,\s*(?P<id>\d+)")}


def _id_name_columns(header: str) -> Optional[Tuple[str, str]]:
    """The columns of a CSV header naming `id` and `name` in either order (any case, spaces and
    quotes around them ignored), or None for another line."""
    columns = tuple(_unquoted(column.strip()).strip().lower() for column in header.split(","))
    return columns if columns in _CSV_ROWS else None


def _id_first(path: str, line_no: int, text: str, columns: Tuple[str, str]) -> str:
    """A row of a CSV with an id/name header as `ID,NAME`. The header says the file is such a CSV:
    a row that does not fit it is an error, not a reason to read every line as a name."""
    row = _CSV_ROWS[columns].fullmatch(text)
    if row is None:
        raise ValueError(f"{path}:{line_no}: expected '{','.join(columns)}' as the header line says, got {text!r}")
    return f"{row['id']},{row['name']}"


def _unquoted(name: str) -> str:
    """A CSV field as written quoted (`0,"tying bow tie"`, `""` for a quote inside) without its quotes."""
    if len(name) >= 2 and name[0] == name[-1] == '"':
        return next(csv.reader([name]))[0]
    return name


# a digit ends a word only before a capitalised one: `Top10Shots`, but `Skiing3D` keeps its "3d"
_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[0-9])(?=[A-Z][a-z])|(?<=[A-Z])(?=[A-Z][a-z])")


def folder_to_class_name(folder: str) -> str:
    """`ApplyEyeMakeup` -> `apply eye makeup`, `brush_hair` -> `brush hair`,
    `YoYo` -> `yo yo`, `PlayingDhol` -> `playing dhol`."""
    words = _CAMEL_BOUNDARY.sub(" ", folder.replace("_", " "))
    return " ".join(words.lower().split())


def check_error_policy(on_error: str) -> None:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
