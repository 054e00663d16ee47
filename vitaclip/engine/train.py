"""The training loop: DDP, mixed precision, gradient accumulation, AdamW + cosine schedule,
periodic evaluation, atomic checkpoints and exact resumption.

Defaults are the paper's recipe (SPEC: "Data protocol of the paper"): 30k steps of 256 clips,
AdamW lr 4e-4, weight decay 0.05, cosine decay.
"""
from __future__ import annotations

import collections.abc
import contextlib
import csv
import dataclasses
import functools
import inspect
import itertools
import logging
import math
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from ..backends import resolve_backend
from ..choices import WEIGHT_DECAY_ON
from ..files import atomic_write, sole_writer
from ..model import VitaCLIP, is_trainable
from . import checkpoint as ckpt
from .distributed import (DistEnv, all_gather_objects, broadcast_object, check_same_on_every_rank,
                          init_distributed, on_every_rank, sum_across_ranks)
from .evaluate import EvalConfig, EvalResult, EvaluationStopped, evaluate
from .loader import (EpochLoader, ShardedTrainLoader, check_labels, derived_seed, rng_states, seed_everything,
                     set_rng_states, split_views, whole_data_description)
from .precision import autocast, check_precision, grad_scaler
from .settings import check_count, check_number, is_path
from .stopping import DEFAULT_STOP_SIGNALS, StopRequest, parse_signal

NONFINITE_POLICIES = ("stop", "skip")
FINAL_MODEL = "model"  # the folder in output_dir that a finished run saves its model to
LOG_FIELDS = ("step", "loss", "lr", "clips_per_s", "elapsed_s", "skipped")
TENSORBOARD_DIR = "tensorboard"
RUN_LOCK = "train.lock"  # in output_dir: held by rank 0 while a run writes there
EVAL_FIELDS = ("step", "top1", "top5", "mean_class_accuracy")
# what a resumed run must share with its checkpoint to be the same run from there on (the schedule
# and the optimiser; the training data too, see `data_description`): other values are refused unless
# resume_with_changes, which goes on with them
RUN_SETTINGS = ("steps", "lr", "min_lr", "warmup_steps", "weight_decay", "weight_decay_on", "betas", "adam_eps",
                "grad_clip")
# what every rank must be given alike: the run's settings, and those that decide when the ranks meet
# in a collective (a rank that steps, accumulates, evaluates or checkpoints otherwise waits on the
# others until the collective timeout, then fails saying nothing of why)
RANK_SETTINGS = RUN_SETTINGS + ("batch_size", "micro_batch_size", "precision", "eval_every", "checkpoint_every",
                                "stop_after", "on_nonfinite")
logger = logging.getLogger(__name__)  # (`log` is a run's RunLog)


@dataclass
class TrainConfig:
    output_dir: str = "runs/vitaclip"
    steps: int = 30_000
    batch_size: int = 256  # global: all processes, all accumulation steps
    micro_batch_size: Optional[int] = None  # clips per process per forward; default batch_size / processes
    lr: float = 4e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.05
    # which trainable tensors it decays: "all" (the public code's AdamW over every parameter) or
    # "matrices" (none of the vectors and scalars: biases, norms, the logit scale)
    weight_decay_on: str = "all"
    betas: Tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: Optional[float] = None  # max global gradient norm
    precision: str = "bf16"  # bf16 autocast | fp16 autocast with a grad scaler | fp32
    # the data order and augmentation of map-style training data (a loader object, e.g. VideoLoader,
    # has its own seed and workers: the command line gives both the same), and the RNG states
    seed: int = 0
    num_workers: int = 4
    device: Optional[str] = None  # default: this process's GPU, else the CPU
    eval_every: int = 0  # steps between evaluations (0: only at the end, when eval data is given)
    eval_batch_size: int = 16  # for map-style evaluation data (a loader object has its own)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # newest checkpoints kept (0: all)
    log_every: int = 10
    resume: Optional[str] = None  # "auto" (latest checkpoint in output_dir, if any) or a checkpoint path
    overwrite: bool = False  # a fresh run first deletes an earlier run's checkpoints and final model
    # resuming with other RUN_SETTINGS, training data, process count or micro-batch than the checkpoint's
    # goes on with the new ones from its step (the learning rate jumps to the new schedule's); without it
    # they are refused
    resume_with_changes: bool = False
    on_nonfinite: str = "stop"  # on a NaN/inf loss or gradient, "stop": raise naming the step; "skip": drop its update
    stop_after: Optional[int] = None  # leave after this step (checkpointed) as if interrupted
    # on one of these (on any rank), leave after the current step, checkpointed (engine/stopping.py)
    stop_signals: Tuple[str, ...] = DEFAULT_STOP_SIGNALS
    progress: bool = True
    tensorboard: bool = True
    save_final: bool = True  # save_pretrained(output_dir/FINAL_MODEL) after the last step

    def validate(self) -> None:
        check_precision(self.precision)
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        # 0: eval_every at the end only, keep_checkpoints all
        for name, least in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 1), ("log_every", 1),
                            ("eval_batch_size", 1), ("eval_every", 0), ("keep_checkpoints", 0),
                            ("warmup_steps", 0), ("seed", 0), ("num_workers", 0)):
            check_count(name, getattr(self, name), least)
        for name in ("micro_batch_size", "stop_after"):
            if getattr(self, name) is not None:
                check_count(name, getattr(self, name), 1)
        if self.weight_decay_on not in WEIGHT_DECAY_ON:
            raise ValueError(f"weight_decay_on must be one of {WEIGHT_DECAY_ON}, got {self.weight_decay_on!r}")
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps], got {self.warmup_steps}")
        # lr 0 trains nothing; a negative min_lr, weight decay or clipping norm turns the update around
        check_number("lr", self.lr, above=0)
        check_number("min_lr", self.min_lr, least=0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be in [0, lr] (the end of the decay from lr), got {self.min_lr}")
        check_number("weight_decay", self.weight_decay, least=0)
        check_number("adam_eps", self.adam_eps, above=0)
        if not (isinstance(self.betas, (tuple, list)) and len(self.betas) == 2):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {self.betas!r}")
        for beta in self.betas:
            check_number("betas", beta, least=0, below=1)
        if self.grad_clip is not None:
            check_number("grad_clip", self.grad_clip, above=0)
        # a str from a settings file is true, whatever it says: overwrite="False" deleted the earlier run's files
        for name in ("overwrite", "resume_with_changes", "progress", "tensorboard", "save_final"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not is_path(self.output_dir):
            raise ValueError(f"output_dir must be a folder's path, got {self.output_dir!r}")
        if self.resume is not None and not is_path(self.resume):
            raise ValueError(f"resume must be 'auto' or a checkpoint's path, got {self.resume!r}")
        if self.resume_with_changes and self.resume is None:
            raise ValueError("resume_with_changes applies to a resumed run: give resume too")
        if self.overwrite and self.resume is not None:
            raise ValueError("overwrite starts a fresh run: it cannot be combined with resume")
        if isinstance(self.stop_signals, str):  # its letters would be taken for signal names
            raise ValueError(f"stop_signals must be a tuple of signal names, e.g. ({self.stop_signals!r},)")
        if not isinstance(self.stop_signals, (tuple, list)):
            raise ValueError(f"stop_signals must be a tuple of signal names (() for none), got {self.stop_signals!r}")
        for name in self.stop_signals:
            parse_signal(name)

    def micro_batch(self, world_size: int) -> int:
        """Clips per process per forward among `world_size` processes: micro_batch_size, else the
        global batch's share of a process; one that does not split the global batch is refused."""
        if self.micro_batch_size is None and self.batch_size % world_size:
            raise ValueError(f"global batch {self.batch_size} does not divide among {world_size} processes: give "
                             f"a multiple of {world_size}")
        micro = self.micro_batch_size or self.batch_size // world_size
        if self.batch_size % (micro * world_size):
            raise ValueError(f"global batch {self.batch_size} cannot be split into micro-batches of {micro} "
                             f"over {world_size} process(es)")
        return micro


@dataclass
class TrainResult:
    step: int  # last completed step
    losses: Dict[int, float] = field(default_factory=dict)  # step -> mean loss of this run's steps
    evals: Dict[int, EvalResult] = field(default_factory=dict)
    last_checkpoint: Optional[str] = None
    finished: bool = False
    stopped_by: Optional[str] = None  # the signal that stopped the run early ("another rank's" if not this one's)


def lr_lambda(config: TrainConfig):
    """Linear warmup to lr, then cosine decay to min_lr at `steps` (a factor of lr)."""
    floor = config.min_lr / config.lr if config.lr else 0.0

    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: VitaCLIP, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable tensors, matrices and the rest (vectors and scalars) in two groups,
    the second decayed only with weight_decay_on="all"."""
    matrices, rest = [], []
    for _, p in model.named_trainable_parameters():
        (matrices if p.dim() >= 2 else rest).append(p)
    groups = [{"params": matrices, "weight_decay": config.weight_decay},
              {"params": rest, "weight_decay": config.weight_decay if config.weight_decay_on == "all" else 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                             eps=config.adam_eps)


def check_trainable_set(model: VitaCLIP) -> None:
    """train() steps the model's trainable set (`trainable_parameters()`) alone. Refuses a model whose
    other parameters require gradients (after model.requires_grad_(True): computed, all-reduced and
    never applied) or none of whose trainable ones does (after requires_grad_(False): autograd's
    'element 0 of tensors does not require grad'). A part of the trainable set frozen by hand stays so."""
    requiring = [name for name, p in model.named_parameters() if p.requires_grad]
    extra = [name for name in requiring if not is_trainable(name, model.config.train_cls_proj)]
    if extra:
        raise ValueError(f"train() updates only the model's trainable parameters (model.trainable_parameters()), "
                         f"but {len(extra)} others require gradients (e.g. {extra[0]}): their gradients would be "
                         f"computed and never applied; call model.freeze() first")
    if not requiring:
        raise ValueError("none of the model's trainable parameters requires gradients (after "
                         "model.requires_grad_(False)?): call model.freeze() to make them trainable again")


def check_batch_labels(labels: torch.Tensor, video_ids, num_classes: int, step: int) -> None:
    bad = ((labels < 0) | (labels >= num_classes)).nonzero().flatten().tolist()
    if bad:
        ids = list(video_ids)
        raise ValueError(f"step {step}: label {int(labels[bad[0]])} of video {ids[bad[0]]!r} is outside the "
                         f"{num_classes} classes")


class RunLog:
    """CSV files (train_log.csv, eval_log.csv) and TensorBoard events of rank 0; a resumed run first
    drops rows after its checkpoint (and its step's evaluation row, when `evaluation_pending`: it is
    made again) so that the files read like one uninterrupted run. A fresh run keeps the rows of an
    earlier one that left no checkpoint (it stopped or crashed before its first) as
    <name>.earlier-<n>.csv, unless told to start over (`keep_earlier` False: overwrite)."""

    def __init__(self, directory: Path, start_step: int, tensorboard: bool, evaluation_pending: bool = False,
                 keep_earlier: bool = True):
        self.directory = directory
        self.files = {"train": directory / "train_log.csv", "eval": directory / "eval_log.csv"}
        for kind, fields in (("train", LOG_FIELDS), ("eval", EVAL_FIELDS)):
            path = self.files[kind]
            for leftover in directory.glob(f".{path.name}.*"):  # atomic_write's, of a run killed while writing
                leftover.unlink(missing_ok=True)
            if start_step == 0 and keep_earlier and _has_rows(path):  # the log of a crash, say: kept
                kept = _unused_earlier_name(path)
                path.replace(kept)
                warnings.warn(f"{path} held rows of an earlier run that left no checkpoint: kept as {kept.name}")
            rows = []
            last = start_step - 1 if kind == "eval" and evaluation_pending else start_step
            if path.is_file() and start_step > 0:
                with path.open(newline="") as f:
                    rows = [r for r in csv.DictReader(f) if int(r["step"]) <= last]
            # through a new file: a write that fails (a full disk) leaves the run's log as it was, not emptied
            atomic_write(path, functools.partial(_write_csv, fields=fields, rows=rows), what="log")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install tensorboard): logging to CSV only")
            else:
                self.writer = SummaryWriter(str(directory / TENSORBOARD_DIR), purge_step=start_step + 1)

    def row(self, kind: str, values: Dict[str, Any]) -> None:
        fields = LOG_FIELDS if kind == "train" else EVAL_FIELDS
        with self.files[kind].open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=fields).writerow({k: values.get(k, "") for k in fields})
        if self.writer is not None:
            for k, v in values.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{kind}/{k}", v, values["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _write_csv(path: str, fields, rows) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _has_rows(path: Path) -> bool:
    """Whether a CSV log holds a row past its header."""
    if not path.is_file():
        return False
    with path.open(newline="") as f:
        rows = csv.reader(f)
        return next(rows, None) is not None and next(rows, None) is not None


def _unused_earlier_name(path: Path) -> Path:
    """<name>.earlier-<n>.csv beside `path`, with the first n not taken."""
    for n in itertools.count(1):
        kept = path.with_name(f"{path.stem}.earlier-{n}.csv")
        if not kept.exists():
            return kept


def train(model: VitaCLIP, train_data, config: Optional[TrainConfig] = None, eval_data=None,
          backbone: Optional[Dict[str, Any]] = None, **overrides) -> TrainResult:
    """Train the prompts of `model` on `train_data`.

    train_data: a map-style dataset (`ds[i] -> (video [3, T, H, W], label, video_id)`), an epoch
    loader with set_epoch() yielding this process's micro-batches (vitaclip.data.VideoLoader), or
    an endless loader with state_dict()/load_state_dict().
    eval_data: optional, for periodic evaluation (see `evaluate`).
    backbone: where the frozen weights came from ({"kind": "clip", "name", "pretrained"}, ...), so
    that checkpoints need not hold them; None stores the whole model in every checkpoint.
    Run with torchrun for several processes; every process calls train() with the same arguments.
    Rank 0 holds the output folder's lock while the run lasts: a second run into it (a requeued job
    while the first one's ranks still run) is refused.
    """
    config = dataclasses.replace(config or TrainConfig(), **overrides)
    # as plain values: the checkpoints hold them (and the optimiser's state its numbers), read back with weights_only
    config = TrainConfig(**ckpt.plain_values(dataclasses.asdict(config)))
    with contextlib.ExitStack() as run_folder:
        return _train(model, train_data, config, eval_data, backbone, run_folder)


def _train(model: VitaCLIP, train_data, config: TrainConfig, eval_data, backbone: Optional[Dict[str, Any]],
           run_folder: contextlib.ExitStack) -> TrainResult:
    config.validate()
    if backbone is not None:
        backbone = ckpt.recorded_backbone_source(backbone)
    env = init_distributed(config.device)
    check_precision(config.precision, env.device)  # before loading anything
    out = Path(config.output_dir)
    if not model.classnames:
        raise ValueError("the model has no classes: pass classnames to the model before training")
    if model.zero_shot_templates is not None:  # its text side would not train, nor its checkpoints say so
        raise ValueError("the model scores its classes with templates (zero-shot): give it learned prompts to "
                         "train with set_classes(classnames) first")
    check_trainable_set(model)
    num_classes = len(model.classnames)
    check_labels(train_data, num_classes, "training data")
    check_labels(eval_data, num_classes, "evaluation data")  # not at the first evaluation, steps later
    if isinstance(eval_data, collections.abc.Iterator) and 0 < config.eval_every < config.steps:
        # the first evaluation would use it up, the next fail mid-run as 'evaluation data is empty'
        raise ValueError(f"eval_data is an iterator ({type(eval_data).__name__}), which one evaluation uses up, and "
                         f"eval_every={config.eval_every} asks for several: give a list of batches, a map-style "
                         f"dataset or a loader")

    micro = config.micro_batch(env.world_size)
    accum = config.batch_size // (micro * env.world_size)
    settings = {name: getattr(config, name) for name in RANK_SETTINGS}
    settings["micro_batch_size"] = micro  # as each rank resolved it: None (the default) and its value are alike
    check_same_on_every_rank(env, settings, "the training settings")
    # (DDP would only find a parameter of another shape, by its index)
    check_same_on_every_rank(env, model.config.to_dict(), "the model architectures")
    check_same_on_every_rank(env, list(model.classnames), "the class names")
    check_same_on_every_rank(env, whole_data_description(train_data), "the training data")
    loader = make_train_loader(train_data, config, micro, env)

    model.to(env.device)
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    scaler = grad_scaler(env.device, config.precision)
    seed_everything(derived_seed(config.seed, env.rank))  # (seed + rank gave seed 1's rank 0 seed 0's rank 1)

    start_step = 0
    resume_path, payload = resume_point(config, out, env, run_folder)
    # the frozen weights never change: their fingerprint is taken once (seconds for ViT-B/16 on a CPU)
    fingerprint = None if backbone is None else ckpt.backbone_fingerprint(model)
    data = data_description(train_data)
    if resume_path is not None:
        restore(payload, str(resume_path), model, optimizer, scheduler, scaler, loader, config, micro, env,
                fingerprint, data)
        start_step = int(payload["step"])
    model.training_data = data  # kept with the model: scoring it samples clips as this does
    eval_config = EvalConfig(batch_size=config.eval_batch_size, precision=config.precision,
                             num_workers=config.num_workers, device=str(env.device), progress=False)
    # the checkpoint's step was not evaluated to the end: done first
    evaluation_due_first = eval_data is not None and payload is not None and payload["evaluation_pending"]
    log = None
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        log = RunLog(out, start_step, config.tensorboard, evaluation_due_first, keep_earlier=not config.overwrite)
    result = TrainResult(start_step, last_checkpoint=str(resume_path) if resume_path else None)
    progress = None
    stop_request = StopRequest(config.stop_signals).install()

    def checkpoint(step: int, evaluation_pending: bool = False) -> str:
        """Writes the step's checkpoint; its write id."""
        path, write_id = write_checkpoint(out, step, config, model, optimizer, scheduler, scaler, loader, env,
                                          backbone, fingerprint, data, evaluation_pending)
        result.last_checkpoint = str(path)
        return write_id

    def evaluated(step: int, write_id: Optional[str]) -> bool:
        """The step's evaluation, after its checkpoint (written marked pending: an evaluation can
        take minutes, a stop signalled during it gets seconds), then marked done: by a marker beside
        the checkpoint this run wrote with `write_id`, or (None: the one it resumed from, maybe
        elsewhere) by writing it again. False if a stop signal ended it (resuming the run evaluates
        it). The evaluation leaves the RNG states as it found them, as the checkpoint holds them."""
        states = rng_states()
        try:
            evaluate_and_log(model, eval_data, eval_config, env, log, step, result,
                             stop=lambda: stop_request.received is not None)
        except EvaluationStopped:
            if env.is_main:
                warnings.warn(f"step {step}: evaluation stopped, the run is stopping (resuming the run evaluates it)")
            return False
        finally:
            set_rng_states(states)
        if write_id is None:
            checkpoint(step)
        elif env.is_main:
            ckpt.mark_evaluated(result.last_checkpoint, write_id)
        return True

    try:
        if evaluation_due_first and not evaluated(start_step, None):
            return stopped(result, stop_request, env)
        if start_step >= config.steps:  # stopped after the last step's checkpoint, before the final model
            save_final_model(model, out, config, env)
            result.finished = True
            return result
        net = distributed_model(model, env) if env.is_distributed else model
        progress = make_progress(config, env, start_step)
        batches = iter(loader)
        last_step = config.steps if config.stop_after is None else min(config.steps, config.stop_after)
        step_time = time.perf_counter()
        started = step_time
        for step in range(start_step + 1, last_step + 1):
            net.train()
            loss_sum = torch.zeros((), device=env.device)
            clips = 0
            for m in range(accum):
                video, labels, video_ids = split_views(*next(batches))
                check_batch_labels(labels, video_ids, num_classes, step)  # on the host if they are there: no sync
                video = video.to(env.device, non_blocking=True)
                labels = labels.to(env.device, non_blocking=True)
                sync = contextlib.nullcontext() if m == accum - 1 or not env.is_distributed else net.no_sync()
                with sync:
                    with autocast(env.device, config.precision):
                        # summed over the clips, over the clips a rank's step should have
                        loss = F.cross_entropy(net(video), labels, reduction="sum") / (micro * accum)
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
                clips += len(labels)
            # the ranks agree on the loss, the clips and on stopping in one all-reduce (a signal
            # may reach them at different steps)
            loss_total, stop_votes, clips_total = sum_across_ranks(
                env, [loss_sum.item(), float(stop_request.received is not None), float(clips)])
            # the mean over the clips the step had: fewer than the global batch where the loader
            # left out videos it could not decode (skip mode)
            shortfall = config.batch_size / clips_total
            loss_value = loss_total / env.world_size * shortfall
            if shortfall != 1:
                for p in model.trainable_parameters():
                    if p.grad is not None:
                        p.grad.mul_(shortfall)
            at_end = step == config.steps
            eval_due = eval_data is not None and ((config.eval_every and step % config.eval_every == 0) or at_end)
            # in the last step a stop matters only if an evaluation would delay the checkpoint
            stopping = stop_votes > 0 and (not at_end or eval_due)
            problem = None if math.isfinite(loss_value) else f"non-finite loss {loss_value}"
            if problem is None:
                scaler.unscale_(optimizer)  # the norm and clipping see the true gradients
                grad_norm = clip_gradients(model, config.grad_clip)
                # in fp16 the scaler skips steps whose gradients overflowed itself (and lowers its scale)
                if not (scaler.is_enabled() or math.isfinite(grad_norm)):
                    problem = f"non-finite gradient norm {grad_norm}"
            skipped = problem is not None
            if skipped and config.on_nonfinite == "stop":
                raise FloatingPointError(f"{problem} at step {step}; stopping (the last checkpoint is "
                                         f"{result.last_checkpoint}); on_nonfinite='skip' drops such steps instead")
            lr = optimizer.param_groups[0]["lr"]
            if not skipped:
                scale = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                # fp16: the scaler skipped the update (an overflow) when it lowered its scale
                skipped = scale is not None and scaler.get_scale() < scale
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped step is a step of the schedule all the same
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                scheduler.step()
            result.step = step
            result.losses[step] = loss_value

            now = time.perf_counter()
            clips_per_s = clips_total / max(now - step_time, 1e-9)
            step_time = now
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_per_s:.1f}",
                                     refresh=False)
            if log is not None and (step % config.log_every == 0 or skipped or step == last_step):
                log.row("train", {"step": step, "loss": loss_value, "lr": lr, "clips_per_s": clips_per_s,
                                  "elapsed_s": now - started, "skipped": int(skipped)})
            if eval_due and stopping and env.is_main:  # a stop is given seconds: the checkpoint comes first
                warnings.warn(f"step {step}: evaluation skipped, the run is stopping (resuming the run evaluates it)")
            write_id = None
            if step % config.checkpoint_every == 0 or step == last_step or stopping or eval_due:
                write_id = checkpoint(step, evaluation_pending=eval_due)
            if stopping or (eval_due and not evaluated(step, write_id)):
                return stopped(result, stop_request, env)
            step_time = time.perf_counter()  # checkpoint and evaluation time is not training throughput
        result.finished = result.step == config.steps
        if result.finished:  # still under the stop handler: a stop signal now is one more of the same
            save_final_model(model, out, config, env)
    finally:
        stop_request.uninstall()
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()
    return result


def stopped(result: TrainResult, stop_request: StopRequest, env: DistEnv) -> TrainResult:
    """The result of a run a stop signal ended, checkpointed (the signal another rank's where this
    one got none)."""
    result.stopped_by = stop_request.received or "another rank's signal"
    if env.is_main:
        print(f"stopped by {result.stopped_by} after step {result.step}, checkpointed in {result.last_checkpoint}: "
              "continue with resume='auto' (--resume auto)", flush=True)
    return result


def evaluate_and_log(model: VitaCLIP, eval_data, eval_config: EvalConfig, env: DistEnv, log: Optional[RunLog],
                     step: int, result: TrainResult, stop: Optional[Callable[[], bool]] = None) -> None:
    res = evaluate(model, eval_data, eval_config, env=env, stop=stop)
    result.evals[step] = res
    if log is not None:
        log.row("eval", {"step": step, "top1": res.top1, "top5": res.top5,
                         "mean_class_accuracy": res.mean_class_accuracy})


def distributed_model(model: VitaCLIP, env: DistEnv) -> DistributedDataParallel:
    """The model under DDP, for the backend it runs."""
    if resolve_backend(model.backend, env.device).compile_modules:
        # DDP's graph splitting (to overlap all-reduce with the backward) would cut the compiled layer
        # at bucket boundaries and lose its fusions; a graphed backward hands over all its gradients
        # at its end anyway
        torch._dynamo.config.optimize_ddp = False
    # buffers (token ids) never change: no need to broadcast them before every forward (the
    # argument's name since torch 2.14; broadcast_buffers before)
    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None,
                                   **no_buffer_sync)


def save_final_model(model: VitaCLIP, out: Path, config: TrainConfig, env: DistEnv) -> None:
    def save() -> None:
        if config.save_final and env.is_main:
            model.save_pretrained(out / FINAL_MODEL)

    on_every_rank(env, save, f"saving the model in {out / FINAL_MODEL}")  # no rank returns before it exists


def clip_gradients(model: VitaCLIP, max_norm: Optional[float]) -> float:
    """The global norm of the trainable tensors' gradients, which are then clipped to `max_norm`
    (None: not clipped)."""
    params = model.trainable_parameters()
    if max_norm is None:
        return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]).item()
    return torch.nn.utils.clip_grad_norm_(params, max_norm).item()


def make_train_loader(train_data, config: TrainConfig, micro: int, env: DistEnv):
    """An endless, resumable source of this process's micro-batches (see `train`)."""
    resumable = hasattr(train_data, "state_dict") and hasattr(train_data, "load_state_dict")
    epochs = hasattr(train_data, "set_epoch") and not hasattr(train_data, "__getitem__")  # e.g. VideoLoader
    if not (resumable or epochs):
        return ShardedTrainLoader(train_data, config.batch_size, micro, env.rank, env.world_size, config.seed,
                                  config.num_workers, pin_memory=env.device.type == "cuda")
    given = getattr(train_data, "batch_size", micro)
    if given != micro:
        raise ValueError(f"the training loader yields batches of {given} clips, but a global batch of "
                         f"{config.batch_size} over {env.world_size} process(es) needs micro-batches of {micro}: "
                         f"set micro_batch_size={given} or the loader's batch size to {micro}")
    return train_data if resumable else EpochLoader(train_data, config.batch_size // (micro * env.world_size))


def resume_point(config: TrainConfig, out: Path, env: DistEnv,
                 run_folder: contextlib.ExitStack) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The checkpoint to resume from (None: a fresh run) and its contents. Rank 0 takes the run
    folder's lock (held by `run_folder`), readies the folder, chooses and reads; the other ranks get
    its choice and contents, or raise its error, so that no two ranks can start from different
    points, and the run folder need not be on a file system every node sees (only rank 0 writes
    there)."""
    path, payload, error = None, None, None
    if env.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            run_folder.enter_context(sole_writer(out / RUN_LOCK, f"{out} is being written by another training run "
                                                                 f"(or its ranks, still running): wait for it to end, "
                                                                 f"or train into another output directory"))
            path, payload = choose_checkpoint(config, out)
            if payload is not None:  # (its marker, where ended, is only in the run folder rank 0 sees)
                payload["evaluation_pending"] = ckpt.evaluation_pending(path, payload)
        except Exception as err:  # noqa: BLE001 - raised on every rank below: none is left waiting
            error = err
    path, payload, error = broadcast_object(env, (path, payload, error))
    if error is not None:
        raise error
    return path, payload


def choose_checkpoint(config: TrainConfig, out: Path) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """Rank 0's part of `resume_point`."""
    ckpt.remove_temporary_files(out)
    if config.resume is None:
        clear_earlier_run(config, out)
        return None, None
    if config.resume == "auto":
        path, payload = ckpt.load_latest_checkpoint(out)
        if path is None:  # a requeue script's first run, or a mistyped --output-dir: said, not silent
            check_no_final_model(config, out)
            logger.info("resume='auto' (--resume auto) found no checkpoint in %s: a fresh run starts", out)
        return path, payload
    path = Path(config.resume)
    if path.is_dir():  # a run folder or saved model: "does not exist" would send the user looking for it
        raise ValueError(f"checkpoint to resume from, {path}, is a folder: give a checkpoint file in it, "
                         f"resume='auto' (--resume auto) for the latest in the output directory, or start a new "
                         f"run from a saved model (--init)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint to resume from, {path}, does not exist")
    payload = ckpt.load_checkpoint(path)
    later = [p for p in ckpt.list_checkpoints(out) if ckpt.checkpoint_step(p) > int(payload["step"])]
    if later:  # pruning keeps the highest steps and resume='auto' takes the highest: they would win over this run's
        raise ValueError(f"{out} holds checkpoints after step {payload['step']} of {path} ({', '.join(p.name for p in later)}), "
                         f"from the run that went on from there: move them away or resume into another output "
                         f"directory")
    return path, payload


def clear_earlier_run(config: TrainConfig, out: Path) -> None:
    """A fresh run cannot share its folder with an earlier run's checkpoints: pruning keeps the
    highest steps, so theirs would replace its own and be the ones resumed and loaded."""
    earlier = ckpt.list_checkpoints(out)
    if config.overwrite:
        for path in earlier:
            ckpt.remove_checkpoint(path)
        shutil.rmtree(out / FINAL_MODEL, ignore_errors=True)
        shutil.rmtree(out / TENSORBOARD_DIR, ignore_errors=True)  # (the CSV logs start afresh anyway)
    elif earlier:
        raise ValueError(f"{out} holds checkpoints of an earlier run (the newest: {earlier[-1].name}): continue "
                         f"it with resume='auto' (--resume auto), start afresh with overwrite=True (--overwrite, "
                         f"which deletes them, its final model and its TensorBoard logs) or choose another output "
                         f"directory")
    else:
        check_no_final_model(config, out)


def check_no_final_model(config: TrainConfig, out: Path) -> None:
    """A run that starts afresh refuses a folder holding an earlier run's final model without its
    checkpoints (deleted to save space): its own would replace it at the end, unasked."""
    if config.save_final and (out / FINAL_MODEL).exists():
        raise ValueError(f"{out} holds the final model of an earlier run ({out / FINAL_MODEL}) and none of its "
                         f"checkpoints: this run's would replace it. Move it away, start afresh with overwrite=True "
                         f"(--overwrite, which deletes it) or choose another output directory")


def restore(payload: Dict[str, Any], source: str, model: VitaCLIP, optimizer, scheduler, scaler, loader,
            config: TrainConfig, micro: int, env: DistEnv, fingerprint: Optional[Dict[str, Any]],
            data: Dict[str, Any]) -> None:
    """Put a run back exactly where the checkpoint left it (model, optimizer, schedule, scaler,
    RNG states of this rank, data position); refuse checkpoints of another model, class list or
    global batch, or trained on other frozen weights; refuse other RUN_SETTINGS, training data,
    process count or micro-batch unless config.resume_with_changes, which goes on with the new ones
    (from the same place in the data)."""
    layout_changes = check_batch_layout(payload, source, config, micro, env)
    ckpt.check_saved_architecture(model, payload, source)
    if payload["classnames"] != model.classnames:
        raise ValueError(f"{source} was trained on {len(payload['classnames'])} classes "
                         f"{payload['classnames'][:5]}..., the model has {len(model.classnames)} "
                         f"{model.classnames[:5]}...")
    # a checkpoint holding the whole model (a run without a backbone source) is compared by its own
    # frozen tensors when this run has a source; a run without one takes the checkpoint's
    if fingerprint is not None or not payload["model_is_full"]:
        ckpt.check_backbone_fingerprint(fingerprint or ckpt.backbone_fingerprint(model), payload, source)
    if config.steps < int(payload["step"]):  # it would end at once, as if finished, without its evaluation
        raise ValueError(f"{source} is at step {payload['step']}, past this run's {config.steps} steps: resume with "
                         f"at least as many, or from an earlier checkpoint into another output directory")
    changes = run_changes(payload, config, data) + layout_changes
    if changes and not config.resume_with_changes:
        raise ValueError(f"{source} was trained with other settings than this run's ({'; '.join(changes)}): "
                         f"resume with the checkpoint's, or with resume_with_changes=True (--resume-with-changes) "
                         f"to go on with the new ones from its step {payload['step']}")
    if layout_changes and not ranks_take_turns(loader, env):
        given = type(getattr(loader, "loader", loader)).__name__
        raise ValueError(f"{source} was written by another number of processes or micro-batch size, and the "
                         f"position of this run's {given} in its data cannot be carried over: resume with the "
                         f"checkpoint's")
    if changes and env.is_main:
        warnings.warn(f"resuming {source} with changed settings, from its step {payload['step']} on: "
                      f"{'; '.join(changes)}{reshuffled_epoch_note(payload, data)}")
    if payload["model_is_full"]:
        ckpt.load_state_exactly(model, payload["model"], source=source)
    else:
        ckpt.load_own_state(model, payload["model"], source)
    # the optimiser's hyperparameters are in its state: this run's, if changed, are put back after it
    settings = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    if changes:
        factor = lr_lambda(config)(scheduler.last_epoch)
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own, lr=own["initial_lr"] * factor)
        scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    saved_precision = payload["train_config"]["precision"]
    if saved_precision == config.precision:
        scaler.load_state_dict(payload["scaler"])
    elif env.is_main:  # legitimate, e.g. bf16 -> fp16 on GPUs without bf16; a scaler is tuned to its precision
        warnings.warn(f"a run trained in {saved_precision} resumes in {config.precision}"
                      + (": the fp16 loss scaler starts afresh" if scaler.is_enabled() else ""))
    loaders = payload["loader"]  # one per rank (a single one in checkpoints before that)
    if layout_changes:
        saved_processes = len(payload["rng"])
        position = moved_data_position(loaders, saved_micro_batch(payload) * saved_processes, micro * env.world_size,
                                       source)
    else:
        position = loaders[env.rank] if isinstance(loaders, list) else loaders
    try:
        loader.load_state_dict(position)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    if env.rank < len(payload["rng"]):
        set_rng_states(payload["rng"][env.rank])
    # (a rank the checkpoint had not keeps the fresh streams of its seed, derived from config.seed and its rank)


def data_description(train_data) -> Dict[str, Any]:
    """What a checkpoint records of the training data, for a resumed run to compare: the loader's
    own description (VideoLoader: the list's entries, sampling and augmentation), else its length."""
    described = whole_data_description(train_data)
    if described is not None:
        return described
    return {"videos": len(train_data)} if hasattr(train_data, "__len__") else {}


def run_changes(payload: Dict[str, Any], config: TrainConfig, data: Dict[str, Any]) -> list:
    """The RUN_SETTINGS and training data this run has other than the checkpoint's, as
    'name: then -> now' (checkpoints without a data description compare settings alone)."""
    saved = {"weight_decay_on": "matrices", **payload["train_config"]}  # (what runs did before it was a setting)
    now = dataclasses.asdict(config)
    changes = [f"{name}: {saved[name]!r} -> {now[name]!r}" for name in RUN_SETTINGS
               if name in saved and _plain(saved[name]) != _plain(now[name])]
    # what the checkpoint recorded: a key added to the descriptions since is no change
    saved_data = payload.get("train_data") or {}
    changes += [f"training data {key}: {value!r} -> {data.get(key)!r}" for key, value in sorted(saved_data.items())
                if _plain(value) != _plain(data.get(key))]
    return changes


def reshuffled_epoch_note(payload: Dict[str, Any], data: Dict[str, Any]) -> str:
    """What a run resumed mid-epoch over another list of videos does, said: another list shuffles to
    another order, and the rest of the epoch is taken from it at the same position."""
    saved = payload.get("train_data") or {}
    if all(_plain(saved[key]) == _plain(data.get(key)) for key in ("videos", "list") if key in saved):
        return ""
    state = payload["loader"][0] if isinstance(payload["loader"], list) else payload["loader"]
    if not state.get("micro_in_epoch", state.get("batch_in_epoch")):
        return ""
    return (f" (the rest of epoch {state['epoch']} comes from the new list's order at the same position: until "
            f"epoch {state['epoch'] + 1} some videos may come twice and others not at all)")


def _plain(value):
    """Tuples and lists alike (a checkpoint may hold either), for comparison."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def saved_micro_batch(payload: Dict[str, Any]) -> int:
    saved = payload["train_config"]
    return saved["micro_batch_size"] or saved["batch_size"] // len(payload["rng"])


def check_batch_layout(payload: Dict[str, Any], source: str, config: TrainConfig, micro: int,
                       env: DistEnv) -> List[str]:
    """The global batch must be the checkpoint's (the schedule and the data's steps count it); another
    process count or micro-batch is a change, as 'name: then -> now' (restore refuses it without
    resume_with_changes: the run goes on from the same place in the data, but not bit for bit as
    it would have)."""
    saved = payload["train_config"]
    if saved["batch_size"] != config.batch_size:
        raise ValueError(f"{source} was written with a global batch of {saved['batch_size']}, this run's is "
                         f"{config.batch_size}: resume with the checkpoint's (the processes and micro-batches "
                         f"may differ, with --resume-with-changes)")
    settings = {"processes": (len(payload["rng"]), env.world_size), "micro_batch_size": (saved_micro_batch(payload),
                                                                                           micro)}
    return [f"{name}: {then} -> {now}" for name, (then, now) in settings.items() if then != now]


def ranks_take_turns(loader, env: DistEnv) -> bool:
    """Whether the ranks' micro-batches take an epoch's shuffled videos in turns (vitaclip's own
    loaders, a VideoLoader sharded by rank), as `moved_data_position` needs."""
    from ..data import VideoLoader  # (the data package imports the decoders: only here)

    return isinstance(loader, ShardedTrainLoader) or (isinstance(loader, EpochLoader)
                                                      and isinstance(loader.loader, VideoLoader)
                                                      and loader.loader.shard == (env.rank, env.world_size))


def moved_data_position(saved_states, saved_batch_clips: int, batch_clips: int, source: str) -> Dict[str, int]:
    """The data loader state of a resumed run with another layout, from the checkpoint's (one per
    rank, all at the same place): the ranks' micro-batches take an epoch's shuffled videos in turns
    (vitaclip.data.VideoLoader, ShardedTrainLoader), so after k micro-batches of every rank the first
    k * saved_batch_clips of the epoch are used, whatever the layout; the new position is that many
    videos in new micro-batches of all ranks (batch_clips)."""
    states = saved_states if isinstance(saved_states, list) else [saved_states]
    key = "micro_in_epoch" if "micro_in_epoch" in states[0] else "batch_in_epoch"
    if any(state != states[0] for state in states):
        places = ", ".join(f"rank {rank}: epoch {state['epoch']} batch {state[key]}" for rank, state in enumerate(states))
        raise ValueError(f"{source}: its ranks stopped at other places in the data ({places}; a rank leaves out a "
                         f"batch of videos it cannot read): resume with its {len(states)} processes and micro-batch "
                         f"size")
    state = dict(states[0])
    used = state[key] * saved_batch_clips
    if used % batch_clips:
        raise ValueError(f"{source} stopped {used} videos into epoch {state['epoch']}, not a whole number of this "
                         f"run's {batch_clips} per micro-batch of every process: pick a micro-batch size and process "
                         f"count whose product divides {used}, or resume with the checkpoint's")
    state[key] = used // batch_clips
    return state


def write_checkpoint(out: Path, step: int, config: TrainConfig, model: VitaCLIP, optimizer, scheduler, scaler,
                     loader, env: DistEnv, backbone, fingerprint, data: Dict[str, Any],
                     evaluation_pending: bool = False) -> Tuple[Path, str]:
    """(its path, the id of this write). data: `data_description` of the training data.
    evaluation_pending: the step's evaluation has not ended (it comes next, or a stop came first),
    which resuming the run does first unless the checkpoint is marked evaluated since."""
    write_id = uuid.uuid4().hex
    # each rank's RNG states and data position (a loader that leaves out batches a rank could not
    # decode is at another place on each rank), in one gather
    states, positions = zip(*all_gather_objects(env, (rng_states(), loader.state_dict())))
    path = ckpt.checkpoint_path(out, step)

    def save() -> None:
        if env.is_main:
            payload = {**ckpt.model_payload(model, backbone, fingerprint), "step": step,
                       "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                       "scaler": scaler.state_dict(), "loader": list(positions), "rng": list(states),
                       "train_config": dataclasses.asdict(config), "train_data": data,
                       "evaluation_pending": evaluation_pending, "write_id": write_id}
            ckpt.save_checkpoint(out, step, payload, keep=config.keep_checkpoints)

    # the other ranks wait for the write, and hear of its failure (a full disk) rather than of a lost rank
    on_every_rank(env, save, f"writing {path}")
    return path, write_id


def make_progress(config: TrainConfig, env: DistEnv, start_step: int):
    if not (config.progress and env.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
