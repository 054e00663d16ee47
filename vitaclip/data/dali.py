"""NVIDIA DALI decoding of frames chosen by index: NVDEC on the GPU, or DALI's CPU decoder
(VP8, VP9, MJPEG). The indices always come from sampling.py, so every backend decodes the
same frames; DALI prefetches `prefetch` batches ahead of the consumer. Two modes ("reader" by
default):

- "decoder": file bytes and frame indices through an external source into
  `fn.decoders.video`. Works for any indices, but each sample arrives as fresh bytes, whose
  frame index (`build_index`, on by default) is built anew for every clip; it ran at 17 clips/s
  on an H100 (benchmarks/RESULTS.md, run 1).
- "reader": `fn.experimental.readers.video` reading a per-epoch file list, one line
  `path label start end` per clip (two for an evaluation clip that stops at the end of a
  short video). It indexes each file of its list when it is built (once per epoch) and seeks
  to the keyframe before each wanted frame. It takes clips whose unique frames are
  `min(start + stride * k, last)` for k < sequence_length (fixed-stride training clips,
  single-view evaluation, short videos); an epoch with other clips (TSN, several temporal
  views) falls back to "decoder", counted in `DaliDecoder.fallbacks` and logged as a warning.
  A clip past the end of its video (as DALI counts its frames) is an error, as in the other
  modes and PyAV.
"""
from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import os
import tempfile
import weakref
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from .meta import threaded_map
from .pyav import VideoDecodeError, stamp_or_none

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError:  # DALI is optional (pip install nvidia-dali-cuda130)
    fn = None

CPU_CODECS = ("vp8", "vp9", "mjpeg")  # what DALI's CPU video decoder supports
GPU_CODECS = CPU_CODECS + ("h264", "hevc", "av1", "mpeg4")  # and its mixed (NVDEC) decoder

MODES = ("decoder", "reader")
DEFAULT_MODE = "reader"  # seeks instead of decoding from frame 0; falls back to "decoder" where it must
MAX_FILES_TRIED_ALONE = 16  # when a reader fails naming no file, each of so few files is tried alone

Task = Tuple[str, np.ndarray]  # (path, sorted unique frame indices)
STAT_THREADS = 16  # threads stating an epoch's files
_WRAPPED = 2 ** 31  # progress of a reader through its whole list: above every label (int32)
# DALI's reader keeps the frame index of each file it read, by the name it read it by, for the life of
# the process (new pipelines too): the (size, mtime) each absolute path had when first listed for one
_INDEXED: Dict[str, Optional[Tuple[int, int]]] = {}

log = logging.getLogger(__name__)


def available() -> bool:
    return fn is not None


def _raise_if_out_of_memory(error: Exception) -> None:
    """A failed DALI run is taken for a bad file and the file left out for good, unless the
    device or host ran out of memory: that error is raised as it is."""
    text = str(error).lower()
    if isinstance(error, torch.cuda.OutOfMemoryError) or any(
            words in text for words in ("out of memory", "allocation failed", "bad_alloc")):
        raise error


class DaliDecoder:
    """Decodes batches of tasks; yields, per batch, one item per task: uint8 frames
    [F, H, W, 3] (on the GPU for device="gpu") or the VideoDecodeError of that task.
    `fallbacks` counts the epochs "reader" mode left to fn.decoders.video (`fallback_reason`:
    why, the last time); `unreadable` holds the files whose clips it decodes one by one."""

    def __init__(self, device: str = "gpu", batch_size: int = 8, num_threads: int = 4,
                 device_id: Optional[int] = 0, prefetch: int = 2, mode: Optional[str] = None,
                 sequence_length: int = 8, stride: int = 1, readers: Optional[int] = None):
        """mode: "decoder" or "reader" (default: $VITACLIP_DALI_MODE, else DEFAULT_MODE);
        sequence_length and stride describe the clips the "reader" mode can take; `readers`
        reader operators (default $VITACLIP_DALI_READERS, else 4) decode in parallel, since
        each decodes its samples one after another on one thread."""
        if fn is None:
            raise ImportError("NVIDIA DALI is not installed: pip install nvidia-dali-cuda130")
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        mode = mode or os.environ.get("VITACLIP_DALI_MODE") or DEFAULT_MODE
        if mode not in MODES:
            raise ValueError(f"DALI mode must be one of {MODES}, got {mode!r}")
        if sequence_length < 1 or stride < 1:
            raise ValueError(f"sequence_length and stride must be >= 1, got {sequence_length}, {stride}")
        readers = readers or int(os.environ.get("VITACLIP_DALI_READERS", "4"))
        if readers < 1:
            raise ValueError(f"readers must be >= 1, got {readers}")
        self.readers = readers
        self.device, self.mode = device, mode
        self.device_id = device_id if device == "gpu" else None
        self.batch_size, self.num_threads, self.prefetch = batch_size, num_threads, prefetch
        self.sequence_length, self.stride = sequence_length, stride
        self._in_flight: collections.deque = collections.deque()
        self._tasks: Iterator[List[Task]] = iter(())
        self._pipe = None  # the "decoder" pipeline, built when first needed
        self._decoding = False  # an epoch's iterator is running the decoder pipeline
        self._single = None  # batch-1 pipeline that finds the bad file of a failed batch
        self._pending: collections.deque = collections.deque()
        self.unreadable: Set[str] = set()  # files "reader" mode could not read: decoded one by one
        self._links: Optional[tempfile.TemporaryDirectory] = None  # of paths with whitespace, of changed files
        self._names: dict = {}  # path -> its name in this epoch's file lists (_list_path)
        self._stamps: dict = {}  # absolute path -> its file's (size, mtime) at this epoch's start
        self.fallbacks = 0  # epochs (or their rests) that "reader" mode decoded with fn.decoders.video
        self.fallback_reason: Optional[str] = None  # why, the last time

    def _build(self, batch_size, num_threads, prefetch, source=None):
        decoder_device = "mixed" if self.device == "gpu" else "cpu"

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=self.device_id,
                      prefetch_queue_depth=prefetch, exec_dynamic=True)
        def pipeline():
            if source is None:  # fed with feed_input
                encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
                frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            else:
                encoded, frames = fn.external_source(source=source, num_outputs=2, batch=True,
                                                     dtype=[types.UINT8, types.INT32])
            # affine=False: the mixed decoder would pin its threads to cores, the same cores in
            # every process of a node (DDP ranks); the CPU decoder ignores it
            return fn.decoders.video(encoded, frames=frames, device=decoder_device, pad_mode="none", affine=False)

        pipe = pipeline()
        pipe.build()
        return pipe

    def _next_batch(self):
        tasks = next(self._tasks)  # StopIteration ends the epoch for DALI as well
        self._in_flight.append(tasks)
        return _encode(tasks)

    def decode(self, batches: Iterable[List[Task]]) -> Iterator[List]:
        batches = list(batches)
        self._names = {}  # files are looked at again each epoch (one may have been rewritten)
        if self.mode == "reader":
            # their stamps at once, in threads (a stat each, a network file system's round trip)
            paths = list(dict.fromkeys(os.path.abspath(path) for batch in batches for path, _ in batch))
            self._stamps = dict(zip(paths, threaded_map(stamp_or_none, paths, workers=STAT_THREADS)))
            ranges = reader_ranges([t for b in batches for t in b], self.sequence_length, self.stride)
            if ranges is not None:
                yield from self._decode_with_reader(batches, ranges)
                return
            self._fall_back(f"its clips are not all {self.sequence_length} frames {self.stride} apart "
                            "(TSN or several temporal views)")
        yield from self._decode_with_decoder(batches)

    def _fall_back(self, reason: str) -> None:
        self.fallbacks += 1
        self.fallback_reason = reason
        log.warning("DALI reader mode decodes this epoch with fn.decoders.video, much slower: %s", reason)

    def _decode_with_decoder(self, batches: List[List[Task]]) -> Iterator[List]:
        """fn.decoders.video in DALI batches of at most batch_size (a pipeline fed a batch larger
        than one before fails), handed out in the consumer's batches."""
        size = self.batch_size
        parts = self._decode_parts([batch[i:i + size] for batch in batches for i in range(0, len(batch), size)])
        results = (item for part in parts for item in part)
        try:
            for batch in batches:
                yield [next(results) for _ in batch]
        finally:
            parts.close()

    def _decode_parts(self, batches: List[List[Task]]) -> Iterator[List]:
        if self._decoding:  # one pipeline, fed from one task iterator: a second epoch would take the first's batches
            raise RuntimeError("a DaliDecoder decodes one epoch at a time: finish or close the previous epoch's "
                               "iterator first")
        self._decoding = True
        if self._pipe is None:
            self._pipe = self._build_decoder()
        self._tasks = iter(batches)
        self._in_flight.clear()
        finished = False
        try:
            while True:
                try:
                    (out,) = self._pipe.run()
                except StopIteration:
                    finished = True
                    return
                except RuntimeError as e:
                    _raise_if_out_of_memory(e)
                    if not self._in_flight:  # no batch to blame
                        raise
                    failed = self._in_flight.popleft()
                    # a failed pipeline may not run again: a new one takes the batches it had queued
                    self._tasks = itertools.chain(list(self._in_flight), self._tasks)
                    self._in_flight.clear()
                    self._pipe = None  # freed before its successor takes decoder memory
                    self._pipe = self._build_decoder()
                    yield self._decode_one_by_one(failed)
                    continue
                tasks = self._in_flight.popleft()
                results = [self._to_torch(out[i]) for i in range(len(tasks))]
                self._keep_alive(out)  # before handing them out: the consumer may stop at the yield
                yield results
        finally:
            self._decoding = False
            if not finished and self._pipe is not None:  # stopped early: run out what DALI prefetched
                self._tasks = iter(())
                self._drain()
            if self._pipe is not None:
                self._pipe.reset()

    def _build_decoder(self):
        # fed through a weak reference: a pipeline holding this decoder would make a cycle, which only the
        # cyclic GC frees, and a DataLoader worker forked before it did could run it, hanging in DALI's shutdown
        next_batch = weakref.WeakMethod(self._next_batch)
        return self._build(self.batch_size, self.num_threads, self.prefetch, source=lambda: next_batch()())

    def _decode_with_reader(self, batches: List[List[Task]], ranges: List[Tuple[int, int]]) -> Iterator[List]:
        """Reader pipelines over this epoch's clips: one, rebuilt for the rest of the epoch
        after a run fails (a failed DALI pipeline cannot run again). Files the reader cannot
        read (DALI leaves out their lines, or names them in its error) are remembered: from
        then on their clips go to fn.decoders.video one by one, which names a bad file's error,
        and the reader takes the others."""
        done = 0  # batches handed out
        while done < len(batches):
            rest = batches[done:]
            tasks = [t for b in rest for t in b]
            self._set_unreadable({path for path, _ in tasks if self._list_path(path) is None},
                                 "whitespace in its path and in the temporary folder for a link to it")
            lines = [(position, start, end)
                     for position, ((path, _), (first, last)) in enumerate(zip(tasks, ranges[-len(tasks):]))
                     if path not in self.unreadable for start, end in reader_lines(first, last, self.stride)]
            try:
                pipe = self._open_reader(tasks, lines) if lines else None
            except RuntimeError as e:
                _raise_if_out_of_memory(e)
                named = self._named_in(e, tasks) or self._unopenable(tasks, lines)
                if not named:
                    self._fall_back(f"the reader could not open this epoch's files ({_first_line(e)})")
                    yield from self._decode_with_decoder(rest)
                    return
                self._set_unreadable(named, _first_line(e))
                continue
            try:
                for results in self._read(pipe, rest, lines):
                    yield results
                    done += 1
            except RuntimeError as e:  # the batch a run failed on goes one by one, the rest to a new reader
                _raise_if_out_of_memory(e)
                batch = batches[done]
                results = self._decode_one_by_one(batch)
                failed = {path for (path, _), r in zip(batch, results) if isinstance(r, Exception)}
                self._set_unreadable(self._named_in(e, tasks) | failed, _first_line(e))
                yield results
                done += 1

    def _unopenable(self, tasks: List[Task], lines: List[Tuple[int, int, int]]) -> Set[str]:
        """The files a reader of their own lines cannot open, found by trying each, when there are
        few (an error that names no file: e.g. a reader whose every file DALI left out, which
        happens to short lists such as an epoch's rebuilt remainder); none when there are many."""
        paths = sorted({tasks[position][0] for position, _, _ in lines})
        if len(paths) > MAX_FILES_TRIED_ALONE:
            return set()
        bad = set()
        for path in paths:
            own = [line for line in lines if tasks[line[0]][0] == path]
            try:
                self._open_reader(tasks, own)
            except RuntimeError as e:
                _raise_if_out_of_memory(e)
                bad.add(path)
        return bad

    def _named_in(self, error: Exception, tasks: List[Task]) -> Set[str]:
        """The paths of `tasks` in the reader's lists that DALI's error message names."""
        message = str(error)
        return {path for path, _ in tasks if path not in self.unreadable and self._list_path(path) in message}

    def _set_unreadable(self, paths: Set[str], reason: str) -> None:
        for path in sorted(paths - self.unreadable):
            log.warning("DALI reader cannot read %s (%s); its clips go to fn.decoders.video one by one",
                        path, reason)
        self.unreadable |= paths

    def _open_reader(self, tasks: List[Task], lines: List[Tuple[int, int, int]]):
        """A reader pipeline over `lines` (task position, start, end); the label of each sample
        is its line's position. Reader r reads lines r, r + K, r + 2K, ... (its own list; the two
        lines of a clip that reaches the end of its video may go to two readers), padded to equal
        lengths with positions past the end (a reader with an empty list fails to build)."""
        k = self.readers
        rows = []
        for i in range(-(-len(lines) // k) * k):
            position, start, end = lines[min(i, len(lines) - 1)]
            rows.append(f"{self._list_path(tasks[position][0])} {i} {start} {end}\n")
        with tempfile.TemporaryDirectory(prefix="vitaclip_dali_") as tmp:
            file_lists = [os.path.join(tmp, f"clips{r}.txt") for r in range(k)]
            for r, file_list in enumerate(file_lists):
                with open(file_list, "w") as f:
                    f.writelines(rows[r::k])
            return self._build_reader(file_lists)

    def _list_path(self, path: str) -> Optional[str]:
        """The path of `path` in a file list, which splits its lines on whitespace, the same all
        epoch (`_names`): the absolute path, or a link to it named by its hash and its file's (size,
        mtime) where the path has whitespace, or the file changed since a reader of this process read
        it by its path (DALI caches each file's frame index by name for the life of the process,
        which saves indexing it again each epoch: a rewritten video read by its old index failed past
        its old length, or gave garbage past its new one); None if the link's name has whitespace
        too (in the temporary folder's path)."""
        if path in self._names:
            return self._names[path]
        absolute = os.path.abspath(path)
        stamp = self._stamps[absolute] if absolute in self._stamps else stamp_or_none(absolute)
        name = absolute
        changed = _INDEXED.setdefault(absolute, stamp) != stamp
        if changed or any(c.isspace() for c in absolute):
            if self._links is None:
                self._links = tempfile.TemporaryDirectory(prefix="vitaclip_dali_links_")
            key = f"{absolute}\0{stamp}".encode()
            name = os.path.join(self._links.name, hashlib.sha1(key).hexdigest() + os.path.splitext(path)[1])
            if any(c.isspace() for c in name):
                name = None
            elif not os.path.lexists(name):
                os.symlink(absolute, name)
        self._names[path] = name
        return name

    def _read(self, pipe, batches: List[List[Task]], lines: List[Tuple[int, int, int]]) -> Iterator[List]:
        """Per batch, its clips from the reader; those whose lines did not all come (files the
        reader left out, or unreadable ones, which have none) from fn.decoders.video."""
        lines_of_task = collections.Counter(position for position, _, _ in lines)
        received = {}  # line -> (frames, timestamps), of this batch or decoded ahead of it
        progress = [-1] * self.readers  # the last line each reader returned (_WRAPPED: its list is done)
        first = 0  # the batch's first line
        position = 0  # the batch's first task
        for batch in batches:
            end = first
            while end < len(lines) and lines[end][0] < position + len(batch):
                end += 1
            # run until each line of the batch came, or its reader went past it without it
            while any(i not in received and progress[i % self.readers] < i for i in range(first, end)):
                self._run_reader(pipe, lines, received, progress)
            parts = [[] for _ in batch]
            for i in range(first, end):
                if i in received:
                    parts[lines[i][0] - position].append(received.pop(i))
            results = [_clip(task, p) if p and len(p) == lines_of_task[position + j] else None
                       for j, (task, p) in enumerate(zip(batch, parts))]
            missing = [j for j, r in enumerate(results) if r is None]
            if missing:
                self._set_unreadable({batch[j][0] for j in missing}, "DALI left out its file list lines")
                for j, r in zip(missing, self._decode_one_by_one([batch[j] for j in missing])):
                    results[j] = r
            yield results
            first, position = end, position + len(batch)

    def _run_reader(self, pipe, lines, received, progress) -> None:
        """One run of the reader pipeline: each reader's new samples into `received`."""
        outputs = pipe.run()  # (frames, labels, timestamps) per reader, on the GPU for NVDEC
        for r, (frames, labels, timestamps) in enumerate(_per_reader(outputs)):
            for i in range(len(frames)):
                line = int(np.array(labels[i]).reshape(-1)[0])
                if line <= progress[r]:  # wrapped around to the start of its list
                    progress[r] = _WRAPPED
                    continue
                progress[r] = line
                if line < len(lines):  # not padding
                    count = len(range(lines[line][1], lines[line][2], self.stride))
                    received[line] = (self._to_torch(frames[i], count), np.array(timestamps[i])[:count])
        self._keep_alive(outputs)

    def _build_reader(self, file_lists: List[str]):
        @pipeline_def(batch_size=-(-self.batch_size // self.readers), num_threads=self.num_threads,
                      device_id=self.device_id, prefetch_queue_depth=self.prefetch, exec_dynamic=True)
        def pipeline():
            outputs = []
            for r, file_list in enumerate(file_lists):
                # frames past the end of a video come as padding with timestamp -1 (the clip is
                # then an error); "edge" padding gave the last frame with no sign of it
                outputs += fn.experimental.readers.video(
                    device=self.device, file_list=file_list, file_list_format="frames",
                    file_list_include_end=False, sequence_length=self.sequence_length, stride=self.stride,
                    step=2 ** 30, pad_mode="constant", enable_timestamps=True, random_shuffle=False,
                    name=f"reader{r}")
            return tuple(outputs)

        pipe = pipeline()
        pipe.build()
        return pipe

    def _drain(self):
        """Run out what the decoder pipeline prefetched: at most the batches in flight, then the
        end; a pipeline that does not end by then is dropped, to be built anew."""
        for _ in range(len(self._in_flight) + 1):
            try:
                self._pipe.run()
            except StopIteration:
                return
            except RuntimeError:
                pass
        self._pipe = None

    def _keep_alive(self, out):
        """GPU copies out of DALI's buffers run asynchronously on the consumer's stream; keep
        the buffers referenced until those copies have run."""
        if self.device != "gpu":
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device_id))
        self._pending.append((out, event))
        while len(self._pending) > 2:
            self._pending.popleft()[1].synchronize()

    def _decode_one_by_one(self, tasks: List[Task]) -> List:
        if self._single is None:
            self._single = self._build(1, 1, 1)
        results = []
        for path, indices in tasks:
            encoded, frames = _encode([(path, indices)])
            try:
                self._single.feed_input("encoded", encoded)
                self._single.feed_input("frames", frames)
                (out,) = self._single.run()
                results.append(self._to_torch(out[0]))
                self._keep_alive(out)
            except RuntimeError as e:
                _raise_if_out_of_memory(e)
                self._single = self._build(1, 1, 1)  # a failed DALI pipeline cannot run again
                results.append(VideoDecodeError(f"{path}: DALI could not decode frames "
                                                f"{indices.tolist()} ({_first_line(e)})"))
        return results

    def _to_torch(self, tensor, frames: Optional[int] = None) -> torch.Tensor:
        """A copy of a DALI sample; `frames` keeps only the first ones (the reader pads)."""
        if self.device == "cpu":
            return torch.from_numpy(np.array(tensor)[:frames])
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out[:frames]


def reader_ranges(tasks: Sequence[Task], sequence_length: int, stride: int) -> Optional[List[Tuple[int, int]]]:
    """(start, last) per task such that the task's frames are the unique values of
    min(start + stride * k, last), k < sequence_length (what `reader_lines` reads); None if
    some task has other frames."""
    ranges = []
    steps = np.arange(sequence_length) * stride
    for path, frames in tasks:
        frames = np.asarray(frames)
        if len(frames) == 0:
            return None
        start, last = int(frames[0]), int(frames[-1])
        if not np.array_equal(np.unique(np.minimum(start + steps, last)), frames):
            return None
        ranges.append((start, last))
    return ranges


def reader_lines(start: int, last: int, stride: int) -> List[Tuple[int, int]]:
    """The file list ranges [start, end) whose first len(range(start, end, stride)) frames are
    the clip (start, last) of `reader_ranges`: its frames start + stride * k up to last, and
    where last is not one of them (an evaluation clip that stops at the end of a short video),
    a range of last alone."""
    if (last - start) % stride == 0:
        return [(start, last + 1)]
    return [(start, last + 1), (last, last + 1)]


def _clip(task: Task, parts: List[Tuple[torch.Tensor, np.ndarray]]):
    """A task's frames from its file list lines' (frames, timestamps), or the error naming the
    video when DALI padded some of them: it ended before that frame (its frame count is below
    the metadata's)."""
    path, frames = task
    if any((timestamps < 0).any() for _, timestamps in parts):
        return VideoDecodeError(f"{path}: ended before frame {frames[-1]} (DALI's reader counts fewer frames)")
    return parts[0][0] if len(parts) == 1 else torch.cat([f for f, _ in parts])


def _per_reader(outputs) -> Iterator[tuple]:
    """(frames, labels, timestamps) of each reader of a run, labels and timestamps on the CPU."""
    for r in range(0, len(outputs), 3):
        frames, labels, timestamps = outputs[r:r + 3]
        yield frames, labels.as_cpu(), timestamps.as_cpu()


def _encode(tasks: Sequence[Task]):
    encoded, frames = [], []
    for path, indices in tasks:
        try:
            encoded.append(np.fromfile(path, dtype=np.uint8))
        except OSError:
            encoded.append(np.zeros(0, np.uint8))  # DALI then fails; the batch is retried one by one
        frames.append(np.asarray(indices, dtype=np.int32))
    return encoded, frames


def _first_line(e: Exception) -> str:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    return " ".join(lines)[-300:] if lines else type(e).__name__
