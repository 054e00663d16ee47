"""The engine's view of data: batches `(video, labels, video_ids)`.

video is [B, 3, T, H, W] (or [B, V, 3, T, H, W] with V views per item), labels [B] int64,
video_ids a list (or tensor) of B ids; the views of one video share its id.

Training draws from a map-style dataset (`len(ds)`, `ds[i] -> (video, label, video_id)`) through
`ShardedTrainLoader`: every batch is a pure function of (seed, epoch, position), each item gets
its own seed, so a resumed run sees exactly the batches (and augmentations) an uninterrupted run
would, whatever the number of workers. Any other object with `__iter__`, `state_dict()` and
`load_state_dict()` (e.g. a GPU loader) can stand in for it.
"""
from __future__ import annotations

import inspect
import multiprocessing
import random
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..data.sampling import seed_sequence
from .stopping import shield_workers

Batch = Tuple[Tensor, Tensor, Sequence]


def seed_differs(saved: int, seed: int) -> str:
    return (f"the data order's seed is {saved} in the checkpoint, {seed} in this run: resume with the checkpoint's "
            f"(--seed {saved}); the same position under another seed would be other videos")


def derived_seed(*key: int) -> int:
    """A seed for what `key` names, e.g. (seed, epoch, position): an item of an epoch."""
    return int(seed_sequence(*key).generate_state(1)[0])


class SeededItems(Dataset):
    """`items[(index, seed)]`: the dataset's item drawn under its own seed: python's, numpy's and
    torch's CPU streams seeded for it (the caller's states restored afterwards), and a dataset with a
    `get(index, rng)` method given a numpy Generator too. Not torch.manual_seed, which would reseed
    the GPUs' streams of a main process loading its own data."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        states = random.getstate(), np.random.get_state(), torch.random.default_generator.get_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            torch.random.default_generator.manual_seed(seed)
            if hasattr(self.dataset, "get"):  # (one that draws from the global streams as well)
                return self.dataset.get(index, np.random.default_rng(seed))
            return self.dataset[index]
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.random.default_generator.set_state(states[2])


def own_generator(*key: int) -> torch.Generator:
    """A DataLoader's generator, seeded by `key` (seed, epoch, rank: each rank's workers their own
    stream): the loader draws its workers' base seed from it, not from the process's stream, which
    would then differ after a resume (one draw more where a loader was made anew)."""
    return torch.Generator().manual_seed(derived_seed(*key))


def workers_context(num_workers: int):
    """The start method of a DataLoader's workers: the default one, except the fork server (the
    default from Python 3.14 on Linux), which is the package's (data.workers.fork_server_context):
    one that DataLoader started itself would not ignore the job's stop signals, and a SIGTERM to the
    job would end it and the rank's workers with it."""
    if num_workers and multiprocessing.get_start_method() == "forkserver":
        from ..data.workers import fork_server_context

        return fork_server_context()
    return None


def seeded_loader(dataset, batch_sampler, num_workers: int, generator: torch.Generator,
                  pin_memory: bool = False) -> DataLoader:
    """A DataLoader of the dataset's items drawn under their own seeds (`SeededItems`: the sampler's
    batches of (index, seed)), in workers shielded from the job's stop signals."""
    context = workers_context(num_workers)  # (before shield_workers: it starts the fork server)
    return DataLoader(SeededItems(dataset), batch_sampler=batch_sampler, num_workers=num_workers,
                      pin_memory=pin_memory, multiprocessing_context=context, worker_init_fn=shield_workers(),
                      generator=generator)


def check_dataset(dataset, name: str) -> None:
    if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise TypeError(f"{name} must be a map-style dataset (len(ds), ds[i] -> (video, label, video_id)) "
                        f"or a loader object, got {type(dataset).__name__}")


def check_labels(data, num_classes: int, what: str) -> None:
    """Labels a dataset declares (a `labels` sequence) must index the class list (an empty one is
    refused where the classes are set, in its own words)."""
    labels = getattr(data, "labels", None)
    if labels is None or not num_classes:
        return
    bad = [(i, int(y)) for i, y in enumerate(labels) if not 0 <= int(y) < num_classes]
    if bad:
        raise ValueError(f"{what}: {len(bad)} label(s) outside the {num_classes} classes, e.g. item {bad[0][0]} has "
                         f"label {bad[0][1]}")


class ShardedTrainLoader:
    """Endless micro-batches of one rank: each step takes `global_batch` items of a per-epoch
    permutation (the last incomplete step of an epoch is dropped) and splits them into
    `accum_steps * world_size` micro-batches; this rank gets micro-batches rank, rank + world, ...

    state_dict() is the position after the micro-batches consumed so far.
    """

    def __init__(self, dataset, global_batch: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 0, pin_memory: bool = False):
        check_dataset(dataset, "training data")
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro-batch {micro_batch} x "
                             f"{world_size} processes")
        self.dataset = dataset
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.rank, self.world_size = rank, world_size
        self.accum_steps = global_batch // (micro_batch * world_size)
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.steps_per_epoch = len(dataset) // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"training data has {len(dataset)} items, fewer than one global batch of "
                             f"{global_batch}")
        self.epoch, self.micro_in_epoch = 0, 0  # position: micro-batches of this rank consumed

    def state_dict(self) -> Dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(seed_differs(state["seed"], self.seed))
        self.epoch, self.micro_in_epoch = int(state["epoch"]), int(state["micro_in_epoch"])

    def _keys(self, epoch: int, start_micro: int) -> Iterator[List[Tuple[int, int]]]:
        # a generator seed of its own per (seed, epoch): seed + epoch gave seed s + 1 the orders of seed s
        # one epoch late. Seed 0, the default, keeps its orders (epoch), in which its runs in flight resume
        order_seed = derived_seed(self.seed, epoch) if self.seed else epoch
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(order_seed)).tolist()
        for micro in range(start_micro, self.steps_per_epoch * self.accum_steps):
            step, m = divmod(micro, self.accum_steps)
            first = step * self.global_batch + (m * self.world_size + self.rank) * self.micro_batch
            yield [(order[p], derived_seed(self.seed, epoch, p)) for p in range(first, first + self.micro_batch)]

    def __iter__(self) -> Iterator[Batch]:
        while True:
            # drawn as the loader asks for them, not the epoch's all at once (a seed per item: 10 s
            # for 240,000 items at each epoch's start)
            keys = _EpochKeys(self, self.epoch, self.micro_in_epoch)
            generator = own_generator(self.seed, self.epoch, self.rank)
            loader = seeded_loader(self.dataset, keys, self.num_workers, generator, pin_memory=self.pin_memory)
            for batch in loader:
                self.micro_in_epoch += 1
                yield batch
            self.epoch, self.micro_in_epoch = self.epoch + 1, 0


class _EpochKeys:
    """The (index, seed) micro-batches of an epoch from `start_micro` on, made as they are iterated."""

    def __init__(self, loader: ShardedTrainLoader, epoch: int, start_micro: int):
        self.loader, self.epoch, self.start_micro = loader, epoch, start_micro

    def __len__(self) -> int:
        return max(0, self.loader.steps_per_epoch * self.loader.accum_steps - self.start_micro)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        return self.loader._keys(self.epoch, self.start_micro)


def eval_batches(data, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 seed: int = 0) -> Iterable[Batch]:
    """This rank's share of evaluation data: a map-style dataset is split item by item across
    ranks (item i on rank i % world_size); anything else is taken to be this rank's batches."""
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")) or isinstance(data, (list, tuple)):
        return data
    keys = [(i, derived_seed(seed, 0, i)) for i in range(rank, len(data), world_size)]
    sampler = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    return seeded_loader(data, sampler, num_workers, own_generator(seed, rank))


def split_views(video: Tensor, labels: Tensor, video_ids: Any) -> Batch:
    """[B, V, 3, T, H, W] -> [B*V, 3, T, H, W] with labels and ids repeated per view. A batch must
    have a label and an id per video: evaluation pairs them up with zip, which dropped the videos
    past the shorter without a word."""
    if not (isinstance(labels, Tensor) and labels.dim() == 1 and not labels.is_floating_point()):
        raise ValueError(f"a batch's labels must be a 1-D tensor of class indices, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__} "
                         f"{getattr(labels, 'dtype', '')}")
    if not len(video) == len(labels) == len(video_ids):
        raise ValueError(f"a batch of {len(video)} videos has {len(labels)} labels and {len(video_ids)} video ids: "
                         f"give one of each per video")
    if video.dim() != 6:
        return video, labels, video_ids
    b, v = video.shape[:2]
    ids = list(video_ids.tolist() if isinstance(video_ids, Tensor) else video_ids)
    return video.flatten(0, 1), labels.repeat_interleave(v), [i for i in ids for _ in range(v)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_states() -> Dict[str, Any]:
    """This process's RNG states, in types that torch.load(weights_only=True) reads back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # this process's device only: a resume may see other devices (one per task under SLURM,
        # all of the node's under torchrun)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def whole_data_description(data) -> Optional[Dict[str, Any]]:
    """What a loader says of its whole data set (VideoLoader.description: the list's entries,
    sampling, augmentation), the same on every rank that loads the same list; None for data that
    says nothing (its length may be a rank's share)."""
    describe = getattr(data, "description", None)
    return describe() if callable(describe) else None


def optional_len(data) -> Optional[int]:
    try:
        return len(data)
    except TypeError:
        return None


class EpochLoader:
    """Endless, resumable iteration over a loader that yields one epoch per `iter()` and takes
    `set_epoch(e)` (e.g. vitaclip.data.VideoLoader, whose batches depend only on seed and epoch).
    Resuming mid-epoch starts at the first batch not yet consumed: without decoding the used
    ones where the loader takes `set_epoch(e, start_batch=b)`, else by replaying and dropping them.
    An epoch ends after a whole number of steps of `accum_steps` batches, as ShardedTrainLoader's:
    a step across two epochs could hold a video twice, and every layout of the same global batch
    then ends its epochs at the same videos (where a run resumed on another layout goes on)."""

    def __init__(self, loader, accum_steps: int = 1):
        if not hasattr(loader, "set_epoch"):
            raise TypeError(f"{type(loader).__name__} has no set_epoch(): cannot resume it exactly")
        self.loader, self.accum_steps = loader, accum_steps
        self.epoch, self.batch_in_epoch = 0, 0

    def _epoch_end(self) -> Optional[int]:
        """The batch an epoch ends before (None: a loader of unknown length, at its end)."""
        n = optional_len(self.loader)
        return None if n is None else n // self.accum_steps * self.accum_steps

    def state_dict(self) -> Dict[str, int]:
        # the loader's seed with its position: the same position under another seed is other data
        seed = {"seed": self.loader.seed} if hasattr(self.loader, "seed") else {}
        if self.batch_in_epoch and self.batch_in_epoch == self._epoch_end():  # epoch done
            return {"epoch": self.epoch + 1, "batch_in_epoch": 0, **seed}
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, **seed}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if "seed" in state and state["seed"] != getattr(self.loader, "seed", state["seed"]):
            raise ValueError(seed_differs(state["seed"], self.loader.seed))
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])

    def _start_epoch(self, end: Optional[int]) -> int:
        """Set the loader's epoch; returns the batch it starts at. A loader that can start
        mid-epoch (VideoLoader) skips the used batches without decoding them, and one that can end
        early plans none after `end`."""
        parameters = inspect.signature(self.loader.set_epoch).parameters
        bounds = {"end_batch": end} if "end_batch" in parameters else {}
        if "start_batch" in parameters:
            self.loader.set_epoch(self.epoch, start_batch=self.batch_in_epoch, **bounds)
            return self.batch_in_epoch
        self.loader.set_epoch(self.epoch, **bounds)
        return 0

    def __iter__(self) -> Iterator[Batch]:
        while True:
            end = self._epoch_end()
            first = self._start_epoch(end)
            yielded = False
            for i, batch in enumerate(self.loader, start=first):
                # a loader that leaves batches out (VideoLoader: none of their videos decoded) says
                # where it is: counting the batches it yields would fall behind its position
                position = getattr(self.loader, "next_batch", i + 1)
                if end is not None and position > end:  # part of a step
                    break
                if position <= self.batch_in_epoch:  # replayed, used before the resume
                    continue
                yielded = True
                self.batch_in_epoch = position
                yield batch
            if not yielded and self.batch_in_epoch == 0:
                skipped = getattr(self.loader, "skipped", None)  # (VideoLoader: this rank's share may be all unusable)
                detail = f" ({len(skipped)} videos left out as unusable, e.g. {skipped[0]})" if skipped else ""
                if end == 0 and optional_len(self.loader):
                    detail = f" (its {optional_len(self.loader)} per epoch do not fill a step of {self.accum_steps})"
                raise ValueError(f"the training loader yields no batches in epoch {self.epoch}{detail}")
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
