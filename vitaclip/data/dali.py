"""NVIDIA DALI decoding of frames chosen by index: NVDEC on the GPU, or DALI's CPU decoder
(VP8, VP9, MJPEG). The indices always come from sampling.py, so every backend decodes the
same frames; DALI prefetches `prefetch` batches ahead of the consumer. Two modes:

- "decoder": file bytes and frame indices through an external source into
  `fn.decoders.video`. Works for any indices, but DALI 2.4 builds no frame index for it, so
  every sample decodes from frame 0 up to its last frame (cost grows with the clip's start),
  and without an index the GPU path colour-converts and syncs after every decoded frame.
- "reader": `fn.experimental.readers.video` reading a per-epoch file list, one line
  `path label start end` per clip (two for an evaluation clip that stops at the end of a
  short video). It indexes each file once (cached for the process) and seeks to the keyframe
  before each wanted frame. It takes clips whose unique frames are
  `min(start + stride * k, last)` for k < sequence_length (fixed-stride training clips,
  single-view evaluation, short videos); an epoch with other tasks (TSN, several temporal
  views) or paths with whitespace falls back to "decoder". A clip past the end of its video
  (as DALI counts its frames) is an error, as in the other modes and PyAV.
"""
from __future__ import annotations

import collections
import logging
import os
import tempfile
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .pyav import VideoDecodeError

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray
except ImportError:  # DALI is optional (pip install nvidia-dali-cuda130)
    fn = None

CPU_CODECS = ("vp8", "vp9", "mjpeg")  # what DALI's CPU video decoder supports
GPU_CODECS = CPU_CODECS + ("h264", "hevc", "av1", "mpeg4")  # and its mixed (NVDEC) decoder

MODES = ("decoder", "reader")
DEFAULT_MODE = "decoder"

Task = Tuple[str, np.ndarray]  # (path, sorted unique frame indices)

log = logging.getLogger(__name__)


def available() -> bool:
    return fn is not None


class DaliDecoder:
    """Decodes batches of tasks; yields, per batch, one item per task: uint8 frames
    [F, H, W, 3] (on the GPU for device="gpu") or the VideoDecodeError of that task."""

    def __init__(self, device: str = "gpu", batch_size: int = 8, num_threads: int = 4,
                 device_id: int = 0, prefetch: int = 2, mode: Optional[str] = None,
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
        self._single = None  # batch-1 pipeline that finds the bad file of a failed batch
        self._pending: collections.deque = collections.deque()

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
        if self.mode == "reader":
            ranges = reader_ranges([t for b in batches for t in b], self.sequence_length, self.stride)
            if ranges is not None:
                yield from self._decode_with_reader(batches, ranges)
                return
            log.info("DALI reader mode cannot take this epoch's clips; decoding with fn.decoders.video")
        yield from self._decode_with_decoder(batches)

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
        if self._pipe is None:
            self._pipe = self._build(self.batch_size, self.num_threads, self.prefetch, source=self._next_batch)
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
                except RuntimeError:
                    yield self._decode_one_by_one(self._in_flight.popleft())
                    continue
                tasks = self._in_flight.popleft()
                yield [self._to_torch(out[i]) for i in range(len(tasks))]
                self._keep_alive(out)
        finally:
            if not finished:  # the consumer stopped early: run out what DALI already prefetched
                self._tasks = iter(())
                self._drain()
            self._pipe.reset()

    def _decode_with_reader(self, batches: List[List[Task]], ranges: List[Tuple[int, int]]) -> Iterator[List]:
        """One reader pipeline per epoch over file lists of this epoch's frame ranges (one or two
        per clip, `reader_lines`); the label of each sample is its line's position, which puts
        the samples of the parallel readers back in order and checks that DALI kept every line.

        Reader r reads lines r, r + K, r + 2K, ... (its own list, so each file is opened by
        one reader only), padded to equal lengths with positions past the end: each run then
        decodes consecutive lines, and all readers wrap around together."""
        tasks = [t for b in batches for t in b]
        if not tasks:
            return
        lines = [(position, start, end) for position, (first, last) in enumerate(ranges)
                 for start, end in reader_lines(first, last, self.stride)]
        lines_of_task = collections.Counter(position for position, _, _ in lines)
        k = self.readers
        rows = []
        for i in range(-(-len(lines) // k) * k):
            position, start, end = lines[min(i, len(lines) - 1)]
            rows.append(f"{os.path.abspath(tasks[position][0])} {i} {start} {end}\n")
        with tempfile.TemporaryDirectory(prefix="vitaclip_dali_") as tmp:
            file_lists = [os.path.join(tmp, f"clips{r}.txt") for r in range(k)]
            for r, file_list in enumerate(file_lists):
                with open(file_list, "w") as f:
                    f.writelines(rows[r::k])
            try:
                pipe = self._build_reader(file_lists)
            except RuntimeError as e:  # e.g. a missing file
                log.warning("DALI reader could not open this epoch's files (%s); decoding with "
                            "fn.decoders.video", _first_line(e))
                yield from self._decode_with_decoder(batches)
                return
        decoded: collections.deque = collections.deque()  # (line, frames, timestamps)
        last = -1  # line of the last sample taken; the readers wrap around past the end
        done = 0  # lines handed out
        position = 0  # of the next task
        for b, batch in enumerate(batches):
            batch_lines = sum(lines_of_task[p] for p in range(position, position + len(batch)))
            failed = False
            try:
                while len(decoded) < batch_lines and not failed:
                    outputs = pipe.run()  # (frames, labels, timestamps) per reader, on the GPU for NVDEC
                    samples = sorted(((int(np.array(labels[i]).reshape(-1)[0]), out, timestamps, i)
                                      for out, labels, timestamps in _per_reader(outputs)
                                      for i in range(len(out))), key=lambda sample: sample[0])
                    new = [sample for sample in samples if last < sample[0] < len(lines)]
                    for line, out, timestamps, i in new:
                        frames = len(range(lines[line][1], lines[line][2], self.stride))
                        decoded.append((line, self._to_torch(out[i], frames), np.array(timestamps[i])[:frames]))
                        last = line
                    self._keep_alive(outputs)
                    failed = not new  # a reader that dropped a file has wrapped around early
                if not failed:
                    items = [decoded.popleft() for _ in range(batch_lines)]
                    failed = [line for line, _, _ in items] != list(range(done, done + batch_lines))
            except RuntimeError as e:
                log.warning("DALI reader failed (%s)", _first_line(e))
                failed = True
            if failed:  # a file DALI could not read: find it, and finish without the reader
                del pipe
                yield self._decode_one_by_one(batch)
                yield from self._decode_with_decoder(batches[b + 1:])
                return
            clips = [[] for _ in batch]
            for line, frames, timestamps in items:
                clips[lines[line][0] - position].append((frames, timestamps))
            yield [_clip(task, parts) for task, parts in zip(batch, clips)]
            done += batch_lines
            position += len(batch)

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
        while True:
            try:
                self._pipe.run()
            except StopIteration:
                return
            except RuntimeError:
                pass

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
    some task has other frames or a path the file list cannot hold."""
    ranges = []
    steps = np.arange(sequence_length) * stride
    for path, frames in tasks:
        frames = np.asarray(frames)
        if len(frames) == 0 or any(c.isspace() for c in path):
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
