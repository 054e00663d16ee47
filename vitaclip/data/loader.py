"""VideoLoader: list file -> batches of normalised clips on the device.

Every random choice is drawn in Python from a generator seeded by (seed, epoch, video),
so a clip is the same whichever backend decodes it, however many workers or ranks run:
  plan (sampling.py, augment.py) -> decode (dali.py | pyav.py) -> transforms on the device.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple

import numpy as np
import torch

from ..choices import default_num_workers
from ..engine.settings import check_count
from ..engine.stopping import shield_workers
from . import dali, pyav, sampling
from .augment import RandAugment
from .lists import VideoEntry, check_error_policy, listed_path, read_video_list
from .meta import video_infos
from .pyav import VideoDecodeError, VideoInfo
from .transforms import Yuv420, frame_size, normalize, resize, resized_crop, to_device, to_rgb
from .workers import check_workers_start, fork_server_context, run_alone, within

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dali-gpu", "dali-cpu", "pyav")
DEFAULT_AUGMENT = "rand-m7-n4-mstd0.5-inc1"
MAX_CLIPS_PER_TASK = 8
# the PyAV pool's DataLoader waits this long for a chunk before it checks for dead workers
# (DataLoader's own interval) and the loader checks whether the pool has hung
POOL_POLL_S = 5.0
AUGMENT_CHUNK = 8  # clips whose whole frames are augmented at once


class Batch(NamedTuple):
    video: torch.Tensor     # [N, 3, T, H, W], normalised
    label: torch.Tensor     # [N] long
    video_id: torch.Tensor  # [N] long: index of the video in the list (eval: one per view)


@dataclass
class ClipPlan:
    video_id: int
    entry: VideoEntry
    info: VideoInfo                    # what the frames must be (their size is checked after decoding)
    frames: np.ndarray                 # sorted unique frame indices to decode
    views: np.ndarray                  # [temporal views, T] positions into `frames`
    crop: Optional[tuple] = None       # train: (top, left, h, w)
    flip: bool = False
    augment: Optional[np.ndarray] = None


class VideoLoader:
    """Training (`train=True`: random clip, random resized crop, flip, RandAugment) or
    evaluation (temporal_views x spatial_crops views per video, all from one decode).

    batch_size counts videos; an eval batch holds batch_size * views clips, views of a video
    adjacent. Ranks (or shard_id of num_shards) split the list's entries, usable or not, so that
    a file one rank cannot read changes no other rank's share. In training each rank gets the
    same number of batches (the epoch's tail that does not fill a batch on every rank is
    dropped), so DDP never waits on a missing batch.
    on_error="skip" drops bad entries (bad list lines, missing/empty/corrupt/short videos)
    with a warning and counts them in `skipped`; "raise" stops at the first, naming file and
    list line. A video that fails to decode is counted once, but stays in the plan of later
    epochs (where it fails again), so that every rank and a resumed run plan the same batches;
    a batch none of whose videos decode is left out. (One whose decoding killed its process is left
    out of this loader's later plans instead, as it would fail again: its batch is a clip short
    all the same, without the cost of a new pool each epoch.)

    num_workers (by default this process's share of the cores it may run on, less one, as the CLI's
    --num-workers) sets DALI's threads and PyAV's worker processes.
    PyAV with num_workers > 0 decodes in worker processes started by a fork server (forking a
    process that runs DALI/PyAV/CUDA threads can deadlock): as with any spawn-style
    DataLoader, a script using it needs an `if __name__ == "__main__":` guard. A worker that
    dies, or sends nothing for `worker_timeout` seconds (a hung decoder), ends the epoch with a
    VideoDecodeError naming the videos awaited; the next epoch starts a new pool. In skip mode a
    worker that dies does not: the clips the pool had in hand are decoded again, each alone in a
    process of its own, the one whose decoding kills its process is left out as a bad video, and
    the epoch goes on in a new pool. Videos the
    list's sidecar lacks are probed in such processes too, whatever num_workers (so the guard is
    needed then too): one whose probe crashes, or takes more than `worker_timeout` seconds, is a
    bad video; `progress` shows a bar while they are probed.
    Under torch.distributed, a loader sharded by process (no shard_id) is made by every rank, as it
    is iterated by every rank: the ranks split the probing and exchange the results."""

    def __init__(self, list_file: str, data_root: str = "", *, train: bool, batch_size: int,
                 num_frames: int = 8, stride: int = 16, tsn: bool = False, size: int = 224,
                 eval_short_side: Optional[int] = None, temporal_views: int = 1,
                 spatial_crops: int = 1, augment: Optional[str] = DEFAULT_AUGMENT,
                 flip: bool = True, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3),
                 backend: str = "auto", device=None, dtype: torch.dtype = torch.float32,
                 num_classes: Optional[int] = None, shard_id: Optional[int] = None,
                 num_shards: Optional[int] = None, seed: int = 0, num_workers: Optional[int] = None,
                 prefetch: int = 2, on_error: str = "raise", min_frames: int = 1,
                 dali_mode: Optional[str] = None, dali_readers: Optional[int] = None,
                 worker_timeout: float = 600.0, progress: bool = False):
        list_file, data_root = os.fspath(list_file), os.fspath(data_root)  # pathlib paths too
        check_error_policy(on_error)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        # before the list is probed; a bad value would otherwise fail at the first batch, or not at all
        for name, value in (("batch_size", batch_size), ("num_frames", num_frames), ("stride", stride),
                            ("size", size), ("temporal_views", temporal_views)):
            check_count(name, value)
        check_count("seed", seed, least=0)
        if eval_short_side is not None:
            check_count("eval_short_side", eval_short_side, least=size)  # frames resized to it, then cropped
        if num_workers is not None:
            check_count("num_workers", num_workers, least=0)
        for name, (low, high) in (("crop_scale", crop_scale), ("crop_ratio", crop_ratio)):
            if not 0 < low <= high:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {(low, high)!r}")
        evaluation_only = {"temporal_views": temporal_views != 1, "spatial_crops": spatial_crops != 1,
                           "eval_short_side": eval_short_side is not None}
        if train and any(evaluation_only.values()):  # (it would be ignored: one random clip per video)
            given = ", ".join(name for name, set_ in evaluation_only.items() if set_)
            raise ValueError(f"{given}: evaluation settings, but train=True takes one random clip and crop per "
                             "video; give them to the evaluation loader")
        if tsn and not train:  # (it would be ignored: evaluation samples its views at `stride`, SPEC)
            raise ValueError("tsn: a training setting, but train=False samples evenly spaced views at the stride; "
                             "give it to the training loader")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type (the clips are normalised), got {dtype}")
        if dali_mode is not None and dali_mode not in dali.MODES:
            raise ValueError(f"dali_mode must be one of {dali.MODES}, got {dali_mode!r}")
        self.list_file, self.train, self.batch_size, self.num_frames = list_file, train, batch_size, num_frames
        self.stride, self.tsn, self.size = stride, tsn, size
        self.eval_short_side = eval_short_side or size
        self.temporal_views, self.spatial_crops = temporal_views, spatial_crops
        self.augment = RandAugment(augment) if train and augment else None
        self.flip = flip and train
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype, self.seed, self.prefetch = dtype, seed, prefetch
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.dali_mode = dali_mode  # see dali.MODES; None: $VITACLIP_DALI_MODE or dali.DEFAULT_MODE
        self.dali_readers = dali_readers  # parallel readers of the "reader" mode (dali.DaliDecoder)
        if not worker_timeout > 0:  # (NaN too)
            raise ValueError(f"worker_timeout must be positive, got {worker_timeout}")
        self.worker_timeout = worker_timeout  # seconds without a chunk from the PyAV pool: hung
        self.on_error, self.epoch, self.start_batch, self.end_batch = on_error, 0, 0, None
        self._shard_given = _checked_shard(shard_id, num_shards)
        sampling.eval_crop_offsets(self.eval_short_side, self.eval_short_side, size, self.spatial_crops)

        entries = read_video_list(list_file, data_root, num_classes, on_error)
        self.skipped: List[str] = []
        self.skipped_videos: Dict[int, str] = {}  # video id (its entry's index in the list) -> why
        self._failed_at_decode: Set[int] = set()  # video ids, so that each is counted once
        self._killed_decoder: Set[int] = set()  # video ids whose decoding killed its process (skip mode)
        # where this epoch goes on: the batch after the last one yielded (left-out batches count), or
        # set_epoch's start_batch before the first
        self.next_batch = 0
        # ranks that read one list and share its probes leave out the same entries: one names them
        named = self._shard_given is not None or _process_shard()[0] == 0
        for message in entries.skipped:
            self._bad(message, named=named)
        # sharded by process: the ranks share the probing of new videos, and all see the same infos
        infos = video_infos(entries, list_file, data_root, timeout=worker_timeout, progress=progress,
                            shared=self._shard_given is None)
        # ranks split the entries, usable or not: the shares never depend on what a rank could read
        # (probes made apart, or a file missing on one node only when decoded)
        self.num_entries = len(entries)
        self.list_digest, self.min_frames = _list_digest(entries, data_root), min_frames
        self.videos = []  # (video_id, entry, info) of the usable entries
        for video_id, (entry, info) in enumerate(zip(entries, infos)):
            problem = info if isinstance(info, Exception) else None
            if problem is None and info.frames < max(min_frames, 1):
                problem = VideoDecodeError(f"{entry.where()}: {info.frames} frames, fewer than {max(min_frames, 1)}")
            if problem is not None:
                self._bad(str(problem), video_id, named=named)
            else:
                self.videos.append((video_id, entry, info))
        if not self.videos:  # (in skip mode, the reasons were only logged)
            why = (f"{len(self.skipped)} entries left out, e.g. {self.skipped[0]}" if self.skipped
                   else "the list has no entries")
            raise NoUsableVideos(f"{list_file}: no usable videos ({why})", self.skipped_videos)
        self._usable = {video[0]: video for video in self.videos}
        self.backend = self._resolve_backend(backend)
        self.dali_decoder: Optional[dali.DaliDecoder] = None  # made by the first DALI epoch (see its `fallbacks`)
        self._workers = None
        self._pool_in_use = False  # an epoch's iterator is taking chunks from the PyAV pool

    # ---------------------------------------------------------------- planning
    @property
    def shard(self) -> Tuple[int, int]:
        """(shard_id, num_shards): as given, else this process's (rank, world size) at the time of
        asking, so that a loader made before torch.distributed starts (e.g. before `train()`)
        shards as its rank."""
        return self._shard_given or _process_shard()

    def description(self) -> Dict[str, Any]:
        """What this loader's clips are drawn from and how, for a resumed training run to compare
        with its checkpoint's: the list's videos and labels, the shortest video taken, the sampling,
        crops and augmentation. Not the decoder, workers or device, which change no clip beyond
        rounding, nor the error policy (a video that fails either stops the run or is left out)."""
        augment = dataclasses.asdict(self.augment.config) if self.augment else None
        # plain Python numbers: a checkpoint loads with weights_only, and the model saves it as JSON
        return {"videos": self.num_entries, "list": self.list_digest, "min_frames": int(self.min_frames),
                "frames": int(self.num_frames), "stride": None if self.tsn else int(self.stride),
                "tsn": bool(self.tsn), "size": int(self.size), "flip": bool(self.flip),
                "crop_scale": [float(v) for v in self.crop_scale], "crop_ratio": [float(v) for v in self.crop_ratio],
                "augment": augment}

    def video_paths(self) -> Dict[int, str]:
        """The file of each usable video, by video id (its entry's index in the list)."""
        return {video_id: entry.path for video_id, entry, _ in self.videos}

    def __len__(self) -> int:
        """Batches in the whole epoch, whatever set_epoch's start_batch and end_batch: EpochLoader
        counts an epoch's positions, and where it ends, in whole epochs. Training counts this rank's
        share of the epoch's slots without shuffling them (`_shard_videos`: the tail that does not
        divide among the ranks is dropped)."""
        n = self.num_entries // self.shard[1] if self.train else len(self._shard_videos())
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0, end_batch: Optional[int] = None) -> None:
        """Plan the next iterations for `epoch`, from its batch `start_batch` on: batches depend
        only on (seed, epoch, video), so a run resumed mid-epoch decodes nothing it already used.
        end_batch: the batch it ends before (None: the epoch's last), so that a training run takes
        whole steps of accumulated batches without decoding the rest."""
        check_count("epoch", epoch, least=0)  # (numpy's error at the first batch named none)
        check_count("start_batch", start_batch, least=0)
        if end_batch is not None:
            check_count("end_batch", end_batch, least=0)  # (-1 gave an empty epoch)
        self.epoch, self.start_batch, self.end_batch = epoch, start_batch, end_batch
        self.next_batch = start_batch  # not the last epoch's position, for a script that saves it now

    def _shard_videos(self) -> list:
        """This rank's share of the entries: evaluation, its usable videos; training, this epoch's
        shuffled slots, a video or None where the entry is unusable (so that every rank plans the
        same number of batches; an unusable entry leaves its batch a clip short, as a video that
        fails to decode does)."""
        shard_id, num_shards = self.shard
        if not self.train:
            return [self._usable[i] for i in range(shard_id, self.num_entries, num_shards) if i in self._usable]
        # (the clips' streams are keyed apart from this one by seed_sequence; this stays as it was, for
        # runs in flight to resume in their orders)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_entries)
        order = order[: len(order) // num_shards * num_shards]
        return [self._usable.get(i) for i in order[shard_id::num_shards].tolist()]

    def plan(self, video_id: int, entry: VideoEntry, info: VideoInfo, epoch: Optional[int] = None) -> ClipPlan:
        """A video's clip in training `epoch` (default: the loader's), or its evaluation views."""
        if not self.train:
            views = sampling.eval_frame_indices(info.frames, self.num_frames, self.stride, self.temporal_views)
            frames, positions = np.unique(views, return_inverse=True)
            return ClipPlan(video_id, entry, info, frames, positions.reshape(views.shape))
        rng = np.random.default_rng(sampling.seed_sequence(self.seed, self.epoch if epoch is None else epoch, video_id))
        if self.tsn:
            indices = sampling.tsn_frame_indices(info.frames, self.num_frames, rng)
        else:
            indices = sampling.train_frame_indices(info.frames, self.num_frames, self.stride, rng)
        frames, positions = np.unique(indices, return_inverse=True)
        crop = sampling.random_resized_crop_box(*info.shown_size, rng, self.crop_scale, self.crop_ratio)
        flip = self.flip and bool(rng.random() < 0.5)
        augment = self.augment.sample(rng) if self.augment else None
        return ClipPlan(video_id, entry, info, frames, positions.reshape(1, -1), crop, flip, augment)

    def _plan_batches(self) -> Iterator[List[ClipPlan]]:
        """This epoch's batches from `start_batch` on, before `end_batch` (a batch of unusable entries
        only is empty), each planned when it is asked for: an epoch's planned all at its start kept
        every rank waiting (2.3 s for 30,000 training videos, 23 s for 240,000, on a 2-core CPU). The
        epoch is the one set when the first batch is asked for, even if set_epoch comes before the last."""
        videos, epoch = self._shard_videos(), self.epoch
        n = len(videos) // self.batch_size * self.batch_size if self.train else len(videos)
        if self.end_batch is not None:
            n = min(n, self.end_batch * self.batch_size)
        for i in range(self.start_batch * self.batch_size, n, self.batch_size):
            yield [self.plan(*v, epoch=epoch) for v in videos[i:i + self.batch_size]
                   if v is not None and v[0] not in self._killed_decoder]

    # ---------------------------------------------------------------- decoding
    def _resolve_backend(self, backend: str) -> str:
        codecs = {info.codec for _, _, info in self.videos}
        if backend == "auto":
            # PyAV wherever it is installed: DALI's GPU path measured 17 clips/s against PyAV's 185
            # on an H100 (its "decoder" mode; the default "reader" mode is not measured on a GPU
            # yet), and its CPU decoder took 1.7x PyAV's CPU time per VP9 training clip (both in
            # benchmarks/RESULTS.md)
            if pyav.available():
                return "pyav"
            if dali.available() and self.device.type == "cuda" and codecs <= set(dali.GPU_CODECS):
                return "dali-gpu"
            if dali.available() and codecs <= set(dali.CPU_CODECS):
                return "dali-cpu"
            raise ImportError(f"no decoder installed reads this list's {sorted(codecs)} video on {self.device}: "
                              "pip install av (or NVIDIA DALI: VP8/VP9/MJPEG on the CPU, more on a GPU)")
        if backend.startswith("dali") and not dali.available():
            raise ImportError("backend %r needs NVIDIA DALI: pip install nvidia-dali-cuda130" % backend)
        if backend == "dali-cpu" and not codecs <= set(dali.CPU_CODECS):
            raise ValueError(f"DALI's CPU decoder reads {dali.CPU_CODECS}, this list has {sorted(codecs)}")
        if backend == "dali-gpu" and self.device.type != "cuda":
            raise ValueError("backend 'dali-gpu' needs a CUDA device")
        if backend == "dali-gpu" and not codecs <= set(dali.GPU_CODECS):
            raise ValueError(f"DALI's GPU decoder reads {dali.GPU_CODECS}, this list has {sorted(codecs)}")
        if backend == "pyav" and not pyav.available():
            raise ImportError("backend 'pyav' needs PyAV: pip install av")
        return backend

    def _decoded_batches(self, batches: Iterator[List[ClipPlan]]) -> Iterator[List]:
        """The decoded frames of each batch, its plans taken from `batches` as the decoder gets to
        them (a few batches ahead; DALI takes the epoch's all at once, its reader reads from a list
        of them)."""
        tasks = ([(p.entry.path, p.frames) for p in batch] for batch in batches)
        if self.backend.startswith("dali"):
            if self.dali_decoder is None:
                on_gpu = self.backend == "dali-gpu"
                self.dali_decoder = dali.DaliDecoder(
                    "gpu" if on_gpu else "cpu", self.batch_size, num_threads=max(2, self.num_workers),
                    device_id=_cuda_index(self.device) if on_gpu else None,
                    prefetch=self.prefetch, mode=self.dali_mode, sequence_length=self.num_frames,
                    stride=self.stride, readers=self.dali_readers)
            yield from self.dali_decoder.decode(tasks)
            return
        if self.num_workers == 0:
            yield from ([decode_with_pyav(*task) for task in batch] for batch in tasks)
            return
        if self._pool_in_use:  # one sampler and one DataLoader iterator: a second epoch would cut the first short
            raise RuntimeError("a VideoLoader decoding in PyAV worker processes reads one epoch at a time (its "
                               "iterators share the pool): finish or close the previous iterator over it first")
        per_task = self._clips_per_task()
        taken = collections.deque()  # the chunks of each batch the pool's sampler began, not yet handed out

        def chunks():  # the epoch's, cut as the pool's sampler asks for them
            for batch in tasks:
                taken.append([batch[i:i + per_task] for i in range(0, len(batch), per_task)])
                yield from taken[-1]

        self._pool_in_use, packed, finished = True, None, False
        try:
            while True:  # a new pool for the rest of the epoch after a worker died (skip mode)
                if self._workers is None:
                    self._start_pool()
                tasks_of = self._workers.dataset  # what the workers run, for the clips in hand if one dies
                # a new pool's sampler goes on with the batch after those taken (a broken pool's sampler,
                # mid-batch, is dropped: its batch's chunks are all in `taken`)
                self._epoch_tasks.tasks = chunks()
                packed = self._pool_iterator()
                packs = []  # the chunks of the batch being put together, as they come in
                try:
                    # the sampler takes a chunk before it is decoded: once a batch's first chunk is in, `taken`
                    # holds that batch's chunks
                    while (first := self._next_chunk(packed, taken[0][0] if taken else None)) is not None:
                        batch, packs = taken.popleft(), [first]
                        for chunk in batch[1:]:
                            packs.append(self._next_chunk(packed, chunk))
                        # the pool asks the sampler for a chunk as each comes in: with no batch taken and not
                        # handed out, the pool has nothing queued and this is the epoch's last batch, after which
                        # a consumer that stops itself at len(loader) batches (zip, islice) never resumes us
                        finished = not taken
                        clips, packs = [clip for pack in packs for clip in unpack_clips(*pack)], []
                        yield clips
                    finished = True
                    return
                except _WorkerDied as died:  # skip mode; the pool is ended
                    in_hand = ([(batch, packs)] if packs else []) + [(chunks_, []) for chunks_ in taken]
                    taken.clear()
                    yield from self._decode_in_hand(tasks_of, in_hand, died)
        finally:
            self._pool_in_use = False
            if not finished:  # left part-read: the next epoch's iter() would wait for its queued chunks
                self._end_pool(packed)

    def _start_pool(self) -> None:
        """The PyAV worker pool: a DataLoader of persistent processes, whose sampler each epoch sets."""
        context = fork_server_context()  # persistent processes
        self._epoch_tasks = _EpochTasks()
        self._workers = torch.utils.data.DataLoader(  # each worker keeps `prefetch` batches of clips in hand
            _PyAVTasks(), batch_size=None, sampler=self._epoch_tasks, num_workers=self.num_workers,
            prefetch_factor=max(1, self.prefetch * self.batch_size // self._clips_per_task()),
            pin_memory=self.device.type == "cuda", persistent_workers=True, multiprocessing_context=context,
            worker_init_fn=shield_workers(), timeout=POOL_POLL_S)

    def _decode_in_hand(self, tasks_of, in_hand, died: "_WorkerDied") -> Iterator[List]:
        """After a PyAV worker died (skip mode): the decoded clips of each batch in hand, given as (its
        chunks, those of them already come in) pairs, in order. The clips not in are decoded again as the
        workers decode them (`tasks_of`, the pool's dataset), each alone in a process of its own (as
        `prepare` finds the video at fault), so that only a clip whose decoding kills its process (or
        hangs it for worker_timeout seconds) fails: with a VideoDecodeError, which the epoch counts once
        and skips. (One at a time: a pool of processes for them met a race of Python 3.11's
        ProcessPoolExecutor, which closed one of its pipes twice as a worker died.)"""
        lost = [task for chunks_, got in in_hand for chunk in chunks_[len(got):] for task in chunk]
        log.warning("%s; decoding the %d clips the pool had in hand again, each alone, to leave out the one at fault",
                    died, len(lost))
        redone = iter([self._decode_alone(tasks_of, path, frames) for path, frames in lost])
        for chunks_, got in in_hand:
            clips = [clip for pack in got for clip in unpack_clips(*pack)]
            yield clips + [next(redone) for chunk in chunks_[len(got):] for _ in chunk]

    def _decode_alone(self, tasks_of, path: str, frames: np.ndarray):
        """One clip (or its error) decoded by `tasks_of` in a worker process of its own."""
        done = run_alone(within, (self.worker_timeout, decode_alone, tasks_of, path, frames))
        if isinstance(done.exception(), BrokenProcessPool):
            return _KilledDecoder(f"{path}: the decoder crashed on it, or hung for {self.worker_timeout:g} s (its "
                                  "worker process died)")
        buffer, layout = done.result()
        return unpack_clips(torch.from_numpy(buffer), layout)[0]

    def _pool_iterator(self):
        """iter() of the worker pool: a pool kept from an earlier epoch first hears from each of its
        workers, for up to worker_timeout seconds (idle workers on a stalled node can take longer than
        the pool's poll to answer), and one that died in between (e.g. killed for memory) fails the
        epoch as it would mid-epoch, ending the pool, so that a later epoch starts a new one."""
        kept = self._workers._iterator  # (DataLoader's own, with persistent workers; None before the first epoch)
        try:
            with _waiting_longer(kept, self.worker_timeout):
                return iter(self._workers)
        except (RuntimeError, OSError, EOFError) as error:
            self._end_failed_pool(kept, error)
            why = (f"they did not answer for {self.worker_timeout:g} s (worker_timeout): a worker hung?"
                   if _timed_out(error) else error)
            raise VideoDecodeError(f"a PyAV decoding worker failed before the epoch began: {why}") from error

    def _next_chunk(self, packed, chunk):
        """The next packed chunk from the worker pool (None after the epoch's last). A worker that
        died (FFmpeg crashed on a file; DataLoader notices within seconds) or a pool that sent
        nothing for worker_timeout seconds (a decoder hung) ends the pool, whatever on_error says,
        with an error naming the videos awaited (`chunk`, where the sampler has taken it); a later
        epoch starts a new pool. In skip mode a dead worker's error is a _WorkerDied, on which
        `_decoded_batches` finds the clip at fault and goes on in a new pool."""
        names = ", ".join(path for path, _ in chunk) if chunk else "the next videos"
        waited = 0.0
        while True:
            try:
                return next(packed, None)
            except (RuntimeError, OSError, EOFError) as error:  # OSError: a dead worker's shared memory
                if _timed_out(error):  # POOL_POLL_S without a chunk, every worker alive
                    waited += POOL_POLL_S
                    if waited < self.worker_timeout:
                        continue
                    problem = (f"the PyAV decoding workers sent nothing for {waited:.0f} s "
                               f"(worker_timeout) while the loader waited for {names}: a decoder hung?")
                else:
                    problem = (f"a PyAV decoding worker failed while the loader waited for {names} (if a "
                               f"worker crashed, it may have been on a video of a later batch): {error}")
                self._end_failed_pool(packed, error)
                if self.on_error == "skip" and _worker_died(error):  # the caller finds the video at fault
                    raise _WorkerDied(problem) from error
                raise VideoDecodeError(problem) from error

    def _end_failed_pool(self, packed, error: Exception) -> None:
        """Ends the pool after `error`; a worker that died where none can start at all (a script
        without a __main__ guard) raises so, instead of the caller blaming the videos awaited."""
        self._end_pool(packed)
        if not _timed_out(error):
            check_workers_start()

    def _end_pool(self, packed) -> None:
        """Drops the pool; its workers are killed, since a hung one would ignore DataLoader's
        request to stop (and, shielded from stop signals, perhaps its SIGTERM too)."""
        for worker in getattr(packed, "_workers", []):
            if worker.is_alive():
                worker.kill()
        self._workers = None

    def _clips_per_task(self) -> int:
        """Clips a worker decodes per work item: enough items for every worker in each batch, and
        no more, since the main process, which alone feeds the GPU, pays for each item it receives
        (a socket round trip and a shared-memory mapping per tensor; on the 2-core CI machine 2.0 ms
        of its CPU per clip sent as three planes, 0.6 ms in one tensor per 4 clips:
        benchmarks/test_decode_bench.py)."""
        return max(1, min(MAX_CLIPS_PER_TASK, self.batch_size // self.num_workers))

    # ---------------------------------------------------------------- batches
    def decode_epoch(self) -> Iterator[Tuple[List[ClipPlan], List]]:
        """This epoch's planned batches with their decoded frames (one tensor or error per
        plan), before any transform: what `__iter__` assembles. Batches are planned as the
        decoder asks for them, each once: `planned` keeps them until they are yielded."""
        planned = collections.deque()

        def to_decode():
            for plans in self._plan_batches():
                planned.append(plans)
                if plans:  # a batch of unusable entries only is yielded without decoding
                    yield plans

        decoded = self._decoded_batches(to_decode())
        ahead = None  # frames decoded for the first batch with plans in `planned`, before it came up
        while True:
            if not planned:
                ahead = next(decoded, None)  # the decoder plans batches up to one with plans
                if not planned:
                    return
            plans = planned.popleft()
            if not plans:
                yield plans, []
                continue
            frames = ahead if ahead is not None else next(decoded, None)
            ahead = None
            if frames is None:
                return
            yield plans, frames

    def __iter__(self) -> Iterator[Batch]:
        if self.train and len(self) == 0:  # a script's training loop would silently do nothing
            shard_id, num_shards = self.shard
            raise ValueError(f"{self.list_file}: a training epoch takes whole batches of {self.batch_size} videos, "
                             f"and this shard's {len(self._shard_videos())} list entries (shard {shard_id} of "
                             f"{num_shards}) fill none: lower batch_size (on the command line, --batch-size "
                             f"or --micro-batch-size)")
        # the epoch planned (_plan_batches), even if set_epoch comes before its last batch
        skipped_before, epoch = len(self.skipped), self.epoch
        try:
            for position, (plans, decoded) in enumerate(self.decode_epoch(), start=self.start_batch):
                good = []
                for plan, frames in zip(plans, decoded):
                    problem = frames if isinstance(frames, Exception) else _size_mismatch(plan, frames)
                    if problem is None:
                        good.append((plan, frames))
                    elif plan.video_id not in self._failed_at_decode:
                        self._bad(f"{plan.entry.list_file}:{plan.entry.line}: {problem}", plan.video_id)
                        # after _bad: in raise mode it raises, and must again at the next pass
                        self._failed_at_decode.add(plan.video_id)
                    if isinstance(problem, _KilledDecoder):
                        self._killed_decoder.add(plan.video_id)
                self.next_batch = position + 1
                if good:
                    yield self.assemble(good)
        finally:  # also for a consumer that stops itself after the last batch (zip, islice) or earlier
            if len(self.skipped) > skipped_before:
                when = f"epoch {epoch}: " if self.train else ""  # an evaluation pass has no epochs
                log.warning("%sskipped %d more videos (%d in all)", when, len(self.skipped) - skipped_before,
                            len(self.skipped))

    def assemble(self, items) -> Batch:
        """(plan, decoded frames) pairs -> a transformed, normalised batch on the device."""
        clips, labels, ids = [], [], []
        if self.train:
            clips = self._train_clips(items)
            labels = [plan.entry.label for plan, _ in items]
            ids = [plan.video_id for plan, _ in items]
        else:
            for plan, decoded in items:
                views = self._eval_views(decoded, plan)
                clips.extend(views)
                labels += [plan.entry.label] * len(views)
                ids += [plan.video_id] * len(views)
        video = torch.stack(clips)  # [N, T, 3, H, W], 0..255
        if self.train:
            flips = to_device([plan.flip for plan, _ in items], video.device)
            video = torch.where(flips.view(-1, 1, 1, 1, 1), video.flip(-1), video)
        video = normalize(video, channel_dim=2).permute(0, 2, 1, 3, 4).to(self.dtype).contiguous()
        return Batch(video, to_device(labels, self.device), to_device(ids, self.device))

    def _train_clips(self, items) -> List[torch.Tensor]:
        """Each clip's sampled frames, RandAugment on the whole frames (as the original recipe:
        the geometric ops' fill and the colour ops' statistics are the frame's), then its crop.
        Clips of one frame size are augmented together, a few at a time: whole frames of an HD
        video not prepared take hundreds of MB per clip in float."""
        by_size = {}
        for i, (plan, _) in enumerate(items):
            by_size.setdefault(plan.info.shown_size, []).append(i)
        clips = [None] * len(items)
        for group in by_size.values():
            for start in range(0, len(group), AUGMENT_CHUNK):
                chunk = group[start:start + AUGMENT_CHUNK]
                frames = torch.stack([self._shown_rgb(items[i][1], items[i][0].info)[
                                      to_device(items[i][0].views[0], self.device)] for i in chunk])
                if self.augment is not None:
                    frames = self.augment(frames.round().clamp(0, 255), np.stack([items[i][0].augment for i in chunk]))
                for i, clip in zip(chunk, frames):
                    clips[i] = resized_crop(clip, items[i][0].crop, (self.size, self.size))
        return clips

    def _shown_rgb(self, decoded, info: VideoInfo, size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Decoded frames as RGB [F, 3, H, W] on the device, as a player shows them, resized to `size`
        (height, width as shown; by default the shown size: square pixels), then turned upright
        (every backend decodes the frames as coded)."""
        rgb = to_rgb(decoded, self.device, info.matrix)
        height, width = size or info.shown_size
        rgb = resize(rgb, (width, height) if info.turns % 2 else (height, width))
        return torch.rot90(rgb, info.turns, dims=(-2, -1)) if info.turns else rgb

    def _eval_views(self, decoded, plan) -> List[torch.Tensor]:
        """The views of a video: its frames resized (short side `eval_short_side`, as shown) and cropped."""
        h, w = sampling.short_side_resize_shape(*plan.info.shown_size, self.eval_short_side)
        rgb = self._shown_rgb(decoded, plan.info, (h, w))
        s = self.size
        return [rgb[to_device(positions, self.device), :, top:top + s, left:left + s]
                for top, left in sampling.eval_crop_offsets(h, w, s, self.spatial_crops)
                for positions in plan.views]

    def _bad(self, message: str, video_id: Optional[int] = None, named: bool = True) -> None:
        """Raises, or (skip mode) counts `message`, with a warning where `named` (what a rank's decoding
        leaves out is its own to name)."""
        if self.on_error == "raise":
            raise VideoDecodeError(message)
        log.log(logging.WARNING if named else logging.DEBUG, "skipping: %s", message)
        self.skipped.append(message)
        if video_id is not None:
            self.skipped_videos[video_id] = message


class NoUsableVideos(ValueError):
    """A list none of whose videos can be used (in skip mode: all bad, `skipped_videos` says why)."""

    def __init__(self, message: str, skipped_videos: Dict[int, str]):
        super().__init__(message)
        self.skipped_videos = skipped_videos


def _cuda_index(device: torch.device) -> int:
    """The GPU a CUDA device means; "cuda" without index: the current one, which the engine sets
    for each DDP rank (taking GPU 0 made every rank decode there)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _size_mismatch(plan: ClipPlan, frames) -> Optional[VideoDecodeError]:
    """Frames of another size than the metadata's (from which crop boxes were drawn), or None."""
    height, width = frame_size(frames)
    if (height, width) == (plan.info.height, plan.info.width):
        return None
    return VideoDecodeError(f"{plan.entry.path}: decoded frames are {width}x{height}, its metadata says "
                            f"{plan.info.width}x{plan.info.height}")


def decode_with_pyav(path: str, frames: np.ndarray, threads: int = 0):
    """Decoded frames of one task, or the error (returned, to cross process boundaries)."""
    try:
        return pyav.decode_frames(path, frames, threads)
    except (VideoDecodeError, ImportError) as e:
        return VideoDecodeError(str(e))


class _PyAVTasks(torch.utils.data.Dataset):
    """Indexed by the tasks themselves: the sampler hands each worker a chunk of (path, frames)
    pairs, which it returns packed (`pack_clips`)."""

    def __getitem__(self, chunk):
        # one thread per worker: the pool fills the cores
        return pack_clips([decode_with_pyav(path, frames, threads=1) for path, frames in chunk])


def pack_clips(clips) -> Tuple[torch.Tensor, list]:
    """Decoded clips (Yuv420 or an error each) -> (every plane in one uint8 tensor, layout): one
    tensor crosses the process boundary instead of three per clip. Layout: per clip, its planes'
    shapes, or its error."""
    planes = [plane.reshape(-1) for clip in clips if isinstance(clip, Yuv420) for plane in clip]
    buffer = torch.cat(planes) if planes else torch.empty(0, dtype=torch.uint8)
    layout = [tuple(tuple(plane.shape) for plane in clip) if isinstance(clip, Yuv420) else clip for clip in clips]
    return buffer, layout


def unpack_clips(buffer: torch.Tensor, layout: list) -> list:
    """`pack_clips`'s inverse: Yuv420 views into buffer (no copy), errors as they were."""
    clips, offset = [], 0
    for entry in layout:
        if isinstance(entry, Exception):
            clips.append(entry)
            continue
        planes = []
        for shape in entry:
            size = int(np.prod(shape))
            planes.append(buffer[offset:offset + size].view(shape))
            offset += size
        clips.append(Yuv420(*planes))
    return clips


def decode_alone(tasks: "_PyAVTasks", path: str, frames: np.ndarray):
    """One clip decoded as the pool's workers decode it (`tasks`: the pool's dataset), packed, its planes
    as a numpy array (plain bytes across the process boundary, no shared memory)."""
    buffer, layout = tasks[[(path, frames)]]
    return buffer.numpy(), layout


class _WorkerDied(VideoDecodeError):
    """A PyAV decoding worker died in skip mode (its pool ended): the loader decodes the clips in
    hand again to find the one at fault."""


class _KilledDecoder(VideoDecodeError):
    """Decoding this video alone killed its process (or hung it): left out of later plans."""


def _worker_died(error: Exception) -> bool:
    """Whether the pool's DataLoader raised `error` for a worker that died (not an exception raised
    in a worker, which DataLoader raises again in the caller, naming the worker)."""
    if "exited unexpectedly" in str(error):
        return True
    return isinstance(error, (OSError, EOFError)) and "in DataLoader worker process" not in str(error)


def _timed_out(error: Exception) -> bool:
    """Whether the pool's DataLoader raised `error` for hearing nothing within its timeout."""
    return "DataLoader timed out" in str(error)


@contextlib.contextmanager
def _waiting_longer(pool_iterator, limit: float):
    """Within the block, a wait of the DataLoader iterator `pool_iterator` for its workers' next
    message goes on, past its timeout (POOL_POLL_S), for up to `limit` seconds, still looking for
    dead workers every POOL_POLL_S as DataLoader does (it raises, naming them). Without the
    DataLoader's private wait (another PyTorch), its own timeout stands."""
    wait = getattr(pool_iterator, "_try_get_data", None)
    if wait is None:
        yield
        return

    def wait_longer(timeout=None):
        waited = 0.0
        while True:
            answered, data = wait(POOL_POLL_S)
            waited += POOL_POLL_S
            if answered or waited >= limit:
                return answered, data

    pool_iterator._try_get_data = wait_longer
    try:
        yield
    finally:
        del pool_iterator._try_get_data


class _EpochTasks(torch.utils.data.Sampler):
    """The current epoch's tasks (an iterator, made as they are taken), swapped in while the worker
    processes stay up."""

    def __init__(self):
        self.tasks = iter(())

    def __iter__(self):
        return self.tasks


def _list_digest(entries: List[VideoEntry], data_root: str) -> str:
    """A digest of the list's (path, label) entries in order, paths as the list gives them (relative
    to the data root): a data set moved to another root is the same list."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(f"{listed_path(entry.path, data_root)},{entry.label}\n".encode())
    return digest.hexdigest()[:16]


def _checked_shard(shard_id, num_shards) -> Optional[Tuple[int, int]]:
    """The shard given, checked, or None for this process's (`_process_shard`)."""
    if (shard_id is None) != (num_shards is None):
        raise ValueError("give both shard_id and num_shards, or neither")
    if shard_id is None:
        return None
    check_count("num_shards", num_shards)
    check_count("shard_id", shard_id, least=0)
    if shard_id >= num_shards:
        raise ValueError(f"shard_id {shard_id} not in [0, {num_shards})")
    return shard_id, num_shards


def _process_shard() -> Tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
