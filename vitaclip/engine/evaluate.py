"""Supervised multi-view evaluation: the softmax of every view (temporal x spatial) of a video is
averaged per video id (SPEC: test protocol), then top-1/top-5, per-class accuracy and the
confusion matrix are computed over videos."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import numpy as np
import torch

from ..model import VitaCLIP
from ..files import atomic_write, atomic_write_text, save_safetensors
from .distributed import (DistEnv, all_gather_objects, broadcast_object, check_same_on_every_rank, init_distributed,
                          skipped_on_any_rank, sum_across_ranks, weights_digest)
from .loader import check_labels, eval_batches, optional_len, split_views, whole_data_description
from .precision import autocast, check_precision
from .settings import check_count


@dataclass
class EvalConfig:
    batch_size: int = 16  # batch_size and num_workers: for map-style data (a loader object has its own)
    precision: str = "bf16"
    num_workers: int = 4
    device: Optional[str] = None
    progress: bool = True
    confusion_png: Optional[str] = None  # write the confusion matrix as an image here
    json_path: Optional[str] = None  # write the results as JSON here
    scores_path: Optional[str] = None  # write every video's class probabilities here (`write_video_scores`)

    def validate(self) -> None:
        check_count("batch_size", self.batch_size, 1)
        check_count("num_workers", self.num_workers, 0)
        check_precision(self.precision)


@dataclass
class EvalResult:
    top1: float
    top5: float
    mean_class_accuracy: float
    num_videos: int
    num_views: int
    classnames: List[str]
    per_class: Dict[str, float] = field(default_factory=dict)  # classes with videos only
    confusion: List[List[int]] = field(default_factory=list)  # [true][predicted] video counts
    # list lines and videos the data left out (VideoLoader's on_error="skip"): not in the accuracies
    num_skipped: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def accumulate(sums: Dict, probs: torch.Tensor, labels: torch.Tensor, video_ids) -> None:
    """Add each view's class probabilities to its video's running sum (sum, count, label)."""
    if isinstance(video_ids, torch.Tensor):  # (a GPU loader's: one copy, not a wait for every view)
        video_ids = video_ids.tolist()
    for p, y, vid in zip(probs, labels.tolist(), video_ids):
        # (a tensor's or NumPy array's elements as Python numbers: keys the scores file's JSON can hold)
        key = vid.item() if isinstance(vid, (torch.Tensor, np.generic)) else vid
        if key in sums:
            total, count, label = sums[key]
            if label != y:
                raise ValueError(f"video {key!r} has views with different labels ({label} and {y})")
            sums[key] = (total + p, count + 1, label)
        else:
            sums[key] = (p.clone(), 1, y)


def pack(sums: Dict) -> tuple:
    """`sums` as (video ids, [N, C] probability sums, view counts, labels), for sending between ranks:
    pickled as one tensor, not one per video (a dict of 20,000 tensors of 400 classes took 12 s to
    gather over two gloo ranks; every rank unpickles every rank's)."""
    ids = list(sums)
    totals = torch.stack([sums[k][0] for k in ids]) if ids else torch.empty(0)
    return ids, totals, [sums[k][1] for k in ids], [sums[k][2] for k in ids]


def unpack(packed: tuple) -> Dict:
    """`pack`'s inverse."""
    ids, totals, counts, labels = packed
    return {k: (totals[i], counts[i], labels[i]) for i, k in enumerate(ids)}


def merge(parts: List[Dict]) -> Dict:
    merged: Dict = {}
    for part in parts:
        for key, (total, count, label) in part.items():
            if key in merged:
                t, c, y = merged[key]
                if y != label:
                    raise ValueError(f"video {key!r} has views with different labels ({y} and {label})")
                merged[key] = (t + total, c + count, y)
            else:
                merged[key] = (total, count, label)
    return merged


def refuse_non_finite(probs: torch.Tensor, videos: List[Any]) -> None:
    """Raise if a row of `probs` ([N, C], one per video of `videos`) is not finite: topk ranks NaN
    first, so a NaN row (logits that overflowed, e.g. in fp16) gave the first classes as its top,
    counted right for videos of those classes, without a word."""
    bad = [video for video, finite in zip(videos, probs.isfinite().all(dim=1).tolist()) if not finite]
    if bad:
        raise ValueError(f"{len(bad)} of {len(videos)} videos have non-finite class probabilities (e.g. video "
                         f"{bad[0]!r}): the model's logits overflowed or its weights hold NaN/inf (with "
                         f"--precision fp16, try bf16 or fp32)")


def scores(sums: Dict, classnames: List[str]) -> EvalResult:
    """Metrics over videos from per-video probability sums."""
    if not sums:
        raise ValueError("evaluation data is empty")
    n = len(classnames)
    probs = torch.stack([total / count for total, count, _ in sums.values()])
    refuse_non_finite(probs, list(sums))
    labels = torch.tensor([label for _, _, label in sums.values()])
    if labels.min() < 0 or labels.max() >= n:
        raise ValueError(f"label {int(labels.max() if labels.max() >= n else labels.min())} is outside the "
                         f"{n} classes")
    k = min(5, n)
    top = probs.topk(k, dim=1).indices
    top1 = (top[:, 0] == labels).float().mean().item()
    top5 = (top == labels[:, None]).any(dim=1).float().mean().item()
    confusion = torch.zeros(n, n, dtype=torch.long)
    confusion.index_put_((labels, top[:, 0]), torch.ones_like(labels), accumulate=True)
    per_class = {classnames[c]: (confusion[c, c] / confusion[c].sum()).item()
                 for c in range(n) if confusion[c].sum() > 0}
    return EvalResult(top1=top1, top5=top5, mean_class_accuracy=sum(per_class.values()) / len(per_class),
                      num_videos=len(sums), num_views=sum(c for _, c, _ in sums.values()),
                      classnames=list(classnames), per_class=per_class, confusion=confusion.tolist())


class EvaluationStopped(Exception):
    """An evaluation ended early: its `stop` said so, on this rank or another."""


@torch.no_grad()
def evaluate(model: VitaCLIP, data, config: Optional[EvalConfig] = None, env: Optional[DistEnv] = None, *,
             stop: Optional[Callable[[], bool]] = None, **overrides) -> EvalResult:
    """Evaluate `model` on `data`: a map-style dataset (`ds[i] -> (video, label, video_id)`, video
    [3, T, H, W] or [V, 3, T, H, W]) split across processes, or an iterable of this process's
    batches. Every process gets the full result.

    `stop` (e.g. whether a stop signal came) is asked before each batch, and if it says so on any
    rank, every rank raises EvaluationStopped at the same batch: under torch.distributed the ranks
    vote in one all-reduce per batch, those out of batches voting on until all are (a loader may
    yield fewer batches than it counts)."""
    config = dataclasses.replace(config or EvalConfig(), **overrides)
    config.validate()
    env = env or init_distributed(config.device)
    check_distributed_sampler(data, env)
    check_outputs(env, config.json_path, config.confusion_png, config.scores_path)
    check_same_on_every_rank(env, list(model.classnames), "the class names")
    # nodes loading their own copies of a model file: their results would be merged into one
    check_same_on_every_rank(env, model.config.to_dict(), "the model architectures")
    if env.is_distributed:  # (reading every weight costs a second or two for a large model)
        check_same_on_every_rank(env, {"weights": weights_digest(model), "templates": model.zero_shot_templates},
                                 "the models")
    check_same_on_every_rank(env, whole_data_description(data), "the evaluation data")
    # (not in the data's description, which a resumed training run compares): merged per video, views
    # drawn otherwise or computed at another precision on one rank give a result no single run gives
    views = {name: getattr(data, name, None) for name in ("temporal_views", "spatial_crops")}
    check_same_on_every_rank(env, {"precision": config.precision, **views}, "the evaluation settings")
    check_labels(data, len(model.classnames), "evaluation data")  # not after the whole pass
    was_training = model.training
    model.eval().to(env.device)
    batches = eval_batches(data, config.batch_size, env.rank, env.world_size, config.num_workers)
    progress = None
    if config.progress and env.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=optional_len(batches), desc="eval", unit="batch", dynamic_ncols=True)
    sums: Dict = {}
    try:
        for batch in batches_until_stopped(env, batches, stop):
            video, labels, video_ids = split_views(*batch)
            with autocast(env.device, config.precision):
                logits = model(video.to(env.device, non_blocking=True))
            accumulate(sums, logits.float().softmax(dim=-1).cpu(), labels.cpu(), video_ids)
            if progress is not None:
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        model.train(was_training)
    sums = merge([unpack(part) for part in all_gather_objects(env, pack(sums))])
    result = scores(sums, model.classnames)
    result.num_skipped = len(skipped_on_any_rank(env, [data]))
    if env.is_main:
        if config.json_path:
            write_json(config.json_path, result.to_dict())
        if config.scores_path:
            paths = data.video_paths() if hasattr(data, "video_paths") else {}
            write_video_scores(config.scores_path, sums, model.classnames, paths)
        if config.confusion_png:
            save_confusion_png(result, config.confusion_png)
    return result


def batches_until_stopped(env: DistEnv, batches, stop: Optional[Callable[[], bool]]):
    """`batches`, ending in EvaluationStopped at the first batch before which `stop()` is true on any
    rank (see `evaluate`)."""
    if stop is None:
        yield from batches
        return
    batches, index = iter(batches), 0
    while True:
        batch = next(batches, None)
        stops, going_on = sum_across_ranks(env, [float(stop()), float(batch is not None)])
        if stops > 0:
            raise EvaluationStopped(f"evaluation stopped before its batch {index}")
        if not going_on:
            return
        if batch is not None:
            yield batch
            index += 1


def check_distributed_sampler(data, env: DistEnv) -> None:
    """Refuses a DataLoader over a DistributedSampler that does not give each item once over the
    ranks: its padding repeats items on the last ranks (merged by video id as further views), its
    drop_last, or replicas other than the ranks, leave items out. Every rank's sampler says the same,
    so every rank raises; a sampler made for another rank is refused where it is given (torchrun
    then stops the others)."""
    from torch.utils.data.distributed import DistributedSampler

    samplers = (getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None))
    sampler = next((s for s in samplers if isinstance(s, DistributedSampler)), None)
    if sampler is None:
        return
    items = len(sampler.dataset)
    world_size = env.world_size
    if sampler.num_replicas != world_size:
        problem = (f"splits its {items} items among {sampler.num_replicas} replicas, but {world_size} process(es) "
                   f"evaluate")
    elif sampler.rank != env.rank:
        problem = (f"is made for rank {sampler.rank}, but this process is rank {env.rank} (ranks would score "
                   f"the same items, others none)")
    elif sampler.total_size > items:
        problem = (f"repeats {sampler.total_size - items} of its {items} items (padding them to a multiple of the "
                   f"{world_size} ranks), each then counted twice")
    elif sampler.total_size < items:
        problem = f"leaves out {items - sampler.total_size} of its {items} items (drop_last)"
    else:
        return
    raise ValueError(f"evaluation data: a DataLoader whose DistributedSampler {problem}: give evaluate() its dataset "
                     f"instead, which it shares among the ranks, each item once")


def check_outputs(env: DistEnv, *paths) -> None:
    """Before an evaluation, not after it (minutes, lost): each output path (None: not asked for)
    names a file whose folder exists or can be made, where the main process writes it; every rank
    raises if not."""
    problem = None
    given = [Path(p).resolve() for p in paths if p is not None]
    if len(set(given)) < len(given):  # the last written would be all that is left
        problem = f"evaluation outputs must be different files: {[str(p) for p in paths if p is not None]}"
    elif env.is_main:
        for path in (p for p in paths if p is not None):
            if Path(path).is_dir():
                problem = f"evaluation output {path} is a folder: give a file name"
                break
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                problem = f"evaluation output {path}: its folder cannot be made ({error})"
                break
    problem = broadcast_object(env, problem)
    if problem:
        raise ValueError(problem)


def write_json(path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1))


class VideoScores(NamedTuple):
    """An evaluation's per-video results (`write_video_scores`), one row per video."""
    probs: torch.Tensor  # [N, C] float32: the mean of the softmax over the video's views
    labels: torch.Tensor  # [N] int64
    views: torch.Tensor  # [N] int64: views averaged
    video_ids: List[Any]  # the data's ids (VideoLoader: the entry's index in its list)
    paths: List[Optional[str]]  # the video files, where the data knows them
    classnames: List[str]


def write_video_scores(path, sums: Dict, classnames: List[str], paths: Dict[Any, str]) -> None:
    """Each video's mean class probabilities, label and view count as a safetensors file (tensors
    `probs`, `labels`, `views`; the class names, video ids and paths as JSON in its metadata), rows
    in video id order: what ensembling models or views, or error analysis, needs. Read it with
    `read_video_scores`."""
    ids = sorted(sums)
    tensors = {"probs": torch.stack([sums[i][0] / sums[i][1] for i in ids]).float().contiguous(),
               "labels": torch.tensor([sums[i][2] for i in ids], dtype=torch.long),
               "views": torch.tensor([sums[i][1] for i in ids], dtype=torch.long)}
    metadata = {"classnames": json.dumps(list(classnames)), "video_ids": json.dumps(ids),
                "paths": json.dumps([paths.get(i) for i in ids])}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, metadata=metadata)


def read_video_scores(path) -> VideoScores:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        missing = {"probs", "labels", "views"} - set(f.keys()) or {"classnames", "video_ids", "paths"} - set(meta)
        if missing:
            raise ValueError(f"{path} is not a vitaclip scores file: it lacks {sorted(missing)}")
        return VideoScores(f.get_tensor("probs"), f.get_tensor("labels"), f.get_tensor("views"),
                           json.loads(meta["video_ids"]), json.loads(meta["paths"]), json.loads(meta["classnames"]))


def save_confusion_png(result: EvalResult, path) -> None:
    """Row-normalised confusion matrix as an image: matplotlib with labels when installed, else a
    plain heat map drawn with PIL (cell (true, predicted), darker = more)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = torch.tensor(result.confusion, dtype=torch.float)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    try:
        # a Figure of its own, not pyplot's: no backend switched under a notebook, no figure left open
        from matplotlib.figure import Figure
    except ImportError:
        from PIL import Image

        n = rates.shape[0]
        cell = max(1, 512 // n)
        pixels = (255 * (1 - rates)).round().to(torch.uint8)
        image = Image.fromarray(pixels.numpy()).resize((n * cell, n * cell), Image.NEAREST)
        atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
        return
    n = rates.shape[0]
    size = max(4.0, min(40.0, 0.25 * n))
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 60:
        ax.set_xticks(range(n), result.classnames, rotation=90, fontsize=6)
        ax.set_yticks(range(n), result.classnames, fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"top-1 {100 * result.top1:.1f}%")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
