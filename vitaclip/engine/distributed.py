"""torch.distributed set-up from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT), and the few collectives the engine needs."""
from __future__ import annotations

import hashlib
import itertools
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def own_gpu(local_rank: int) -> torch.device:
    """This process's GPU: its local rank's, or the only one it sees (a launcher that gives each
    process one GPU)."""
    return torch.device("cuda", local_rank if torch.cuda.device_count() > 1 else 0)


def pick_device(device: Optional[str] = None, local_rank: int = 0) -> torch.device:
    """The given device ("cuda": this process's GPU), else this process's GPU when there is one,
    else the CPU."""
    if device is None:
        return own_gpu(local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    # others ('meta', 'mps') torch names, but the engine does not run on: they failed mid-run
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not one: cpu, cuda or cuda:N")
    if dev.type == "cuda":
        dev = own_gpu(local_rank) if dev.index is None else dev
        check_cuda_device(dev)
    return dev


def check_cuda_device(dev: torch.device) -> None:
    """A clear error for a GPU this process does not have (torch's is a driver error or an
    'invalid device ordinal' from deep inside)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if dev.index >= count:
        have = f"{count} GPU(s)" if count else "no CUDA GPU"
        raise ValueError(f"device {str(dev)!r}: this process has {have}")


TIMEOUT_ENV = "VITACLIP_DIST_TIMEOUT_S"
# Longer than torch's 10 minutes: ranks may reach a collective minutes apart when they probe an
# unprepared list or compile (first steps), and a rank whose decoder hangs should be the one to
# fail, naming the video, after the loader's worker_timeout (10 minutes by default), rather than
# its peers' collective timing out first with no word of why.
DEFAULT_TIMEOUT_S = 1800


def collective_timeout() -> timedelta:
    """How long a collective waits for the slowest rank: $VITACLIP_DIST_TIMEOUT_S seconds, else
    DEFAULT_TIMEOUT_S."""
    value = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 10 ** 9:  # (nan and inf too)
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return timedelta(seconds=seconds)


def launched_world_size() -> int:
    """How many processes the launcher (torchrun) started for this job: 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: Optional[str] = None) -> DistEnv:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on the CPU; collectives wait
    `collective_timeout()` for the slowest rank); a single process without those variables runs
    alone. Already initialised groups are reused."""
    world_size = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda" and dev != own_gpu(local_rank) and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1 \
            and not dist.is_initialized():
        raise ValueError(f"device {device!r} is not this process's GPU ({own_gpu(local_rank)}, local rank "
                         f"{local_rank}): every process of the node would share it, which NCCL refuses; give 'cuda'")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank,
                                world_size=world_size, timeout=collective_timeout())
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank, world_size, local_rank, dev)


def all_gather_objects(env: DistEnv, obj: Any) -> List[Any]:
    """Every rank's `obj`, in rank order (a one-element list when running alone)."""
    if not env.is_distributed:
        return [obj]
    out: List[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def check_same_on_every_rank(env: DistEnv, value: Any, what: str) -> None:
    """Raises, on every rank, where a rank's `value` differs from rank 0's: nodes reading their own
    copies of a list or class file that differ would otherwise train on a wrong split of the data, or
    count videos twice, and say nothing."""
    values = all_gather_objects(env, value)
    for rank, theirs in enumerate(values):
        if theirs != values[0]:
            raise ValueError(f"{what} differ between ranks: {_difference(values[0], theirs)} (rank 0 vs rank {rank}); "
                             f"every rank must load the same")


def on_every_rank(env: DistEnv, work: Callable[[], Any], what: str) -> Any:
    """work()'s value; where it raised on some rank, every rank raises (`gathered_on_every_rank`)."""
    return gathered_on_every_rank(work, what)[env.rank] if env.is_distributed else work()


def gathered_on_every_rank(work: Callable[[], Any], what: str) -> List[Any]:
    """Every rank's work(), gathered (each rank of the default group calls this): where work raised on
    some rank, every rank raises (that one its own error, the others "`what` failed on rank N: ...")
    instead of waiting for it at their next collective (a lost connection under gloo, the collective
    timeout under NCCL). The others' error is of the failing rank's kind, so that bad input there (a
    missing file, a list that differs) is bad input on every rank, not a crash."""
    try:
        outcome, failure = (True, work()), None
    except Exception as error:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
        outcome, failure = (False, (_sendable_kind(error), f"{type(error).__name__}: {error}")), error
    outcomes: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if failure is not None:
        raise failure
    for rank, (done, value) in enumerate(outcomes):
        if not done:
            kind, message = value
            raise _error_of_kind(kind, f"{what} failed on rank {rank}: {message}")
    return [value for _, value in outcomes]


def _sendable_kind(error: Exception) -> type:
    """error's class, or RuntimeError where pickle cannot send it (a local class): a rank that cannot
    send its outcome would leave the others waiting."""
    try:
        pickle.dumps(type(error))
    except Exception:  # noqa: BLE001 - whatever pickle raises
        return RuntimeError
    return type(error)


def _error_of_kind(kind: type, message: str) -> Exception:
    """kind(message), or a RuntimeError where kind takes other arguments."""
    try:
        return kind(message)
    except Exception:  # noqa: BLE001 - any constructor's complaint: the message is what matters
        return RuntimeError(message)


def weights_digest(module: torch.nn.Module) -> str:
    """A digest of every parameter and buffer of `module` (name, dtype, shape and bytes), the same on
    any device: two ranks' are equal only where they hold the same weights and class prompts' tokens."""
    digest = hashlib.sha256()  # (the fastest of hashlib's where CPUs hash SHA-256 in hardware)
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().reshape(-1).view(torch.uint8).cpu().numpy())
    return digest.hexdigest()[:32]


def _difference(ours: Any, theirs: Any) -> str:
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return "; ".join(f"{key} {ours.get(key)!r} vs {theirs.get(key)!r}" for key in sorted(set(ours) | set(theirs))
                         if ours.get(key) != theirs.get(key))
    if isinstance(ours, (list, tuple)) and isinstance(theirs, (list, tuple)):
        if len(ours) != len(theirs):
            return f"{len(ours)} vs {len(theirs)} items"
        index = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
        return f"item {index} {ours[index]!r} vs {theirs[index]!r}"
    return f"{ours!r} vs {theirs!r}"


def broadcast_object(env: DistEnv, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not env.is_distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def skipped_on_any_rank(env: DistEnv, loaders) -> set:
    """What `loaders` left out (VideoLoader's `skipped`: bad list lines and videos, named; other
    loaders leave nothing out) on any rank, each once: one skipped on several ranks counts once."""
    mine = set().union(*(getattr(loader, "skipped", ()) for loader in loaders if loader is not None))
    return set().union(*all_gather_objects(env, mine))


def sum_across_ranks(env: DistEnv, values: List[float]) -> List[float]:
    """Each of `values` summed over the ranks, in one all-reduce."""
    if not env.is_distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()

