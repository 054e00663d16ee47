"""NVIDIA DALI decoding of frames chosen by index: NVDEC on the GPU ("mixed"), or DALI's
CPU decoder (VP8, VP9, MJPEG). File bytes and frame indices come from Python through an
external source, so the sampling (sampling.py) is the same as on every other backend;
DALI prefetches `prefetch` batches ahead of the consumer."""
from __future__ import annotations

import collections
from typing import Iterable, Iterator, List, Sequence, Tuple

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

Task = Tuple[str, np.ndarray]  # (path, sorted unique frame indices)


def available() -> bool:
    return fn is not None


class DaliDecoder:
    """Decodes batches of tasks; yields, per batch, one item per task: uint8 frames
    [F, H, W, 3] (on the GPU for device="gpu") or the VideoDecodeError of that task."""

    def __init__(self, device: str = "gpu", batch_size: int = 8, num_threads: int = 4,
                 device_id: int = 0, prefetch: int = 2):
        if fn is None:
            raise ImportError("NVIDIA DALI is not installed: pip install nvidia-dali-cuda130")
        if device not in ("gpu", "cpu"):
            raise ValueError(f"device must be 'gpu' or 'cpu', got {device!r}")
        self.device = device
        self.device_id = device_id if device == "gpu" else None
        self._in_flight: collections.deque = collections.deque()
        self._tasks: Iterator[List[Task]] = iter(())
        self._pipe = self._build(batch_size, num_threads, prefetch, source=self._next_batch)
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
            return fn.decoders.video(encoded, frames=frames, device=decoder_device, pad_mode="none")

        pipe = pipeline()
        pipe.build()
        return pipe

    def _next_batch(self):
        tasks = next(self._tasks)  # StopIteration ends the epoch for DALI as well
        self._in_flight.append(tasks)
        return _encode(tasks)

    def decode(self, batches: Iterable[List[Task]]) -> Iterator[List]:
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
            except RuntimeError as e:
                self._single = self._build(1, 1, 1)  # a failed DALI pipeline cannot run again
                results.append(VideoDecodeError(f"{path}: DALI could not decode frames "
                                                f"{indices.tolist()} ({_first_line(e)})"))
        return results

    def _to_torch(self, tensor) -> torch.Tensor:
        if self.device == "cpu":
            return torch.from_numpy(np.array(tensor))
        out = torch.empty(tensor.shape(), dtype=torch.uint8, device=f"cuda:{self.device_id}")
        feed_ndarray(tensor, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out


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
