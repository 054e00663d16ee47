"""The training loop against a plain hand-written one, gradient accumulation under DDP (no_sync on
all but the last micro-batch), and a run resumed several times with its options combined."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine_helpers import one_thread, tiny_data, tiny_model, tiny_train_config, trainable  # noqa: F401
from ranks import rank_of_two, run_ranks
from vitaclip.engine.loader import ShardedTrainLoader
from vitaclip.engine.train import train


# clipped, or not; an Adam eps so large that the update follows the gradient's scale (and not the float
# noise of gradients that are zero in theory, e.g. of key biases)
@pytest.mark.parametrize("decay_on,clip,eps", [("all", 0.05, 1e-2), ("matrices", None, 1.0)])
def test_a_run_takes_the_steps_of_a_hand_written_loop(tmp_path, decay_on, clip, eps):
    """Warmup, cosine to min_lr, the decay groups, clipping and accumulation of 2 micro-batches:
    each step as one batch of 4 through plain AdamW at the hand-computed rate."""
    steps, warmup, lr, min_lr, decay = 5, 2, 1e-2, 1e-3, 0.3
    model = tiny_model()
    start = trainable(model)
    train(model, tiny_data(), tiny_train_config(tmp_path, steps=steps, warmup_steps=warmup, lr=lr, min_lr=min_lr,
                                                grad_clip=clip, weight_decay=decay, weight_decay_on=decay_on,
                                                adam_eps=eps, micro_batch_size=2))
    reference = tiny_model().train()
    params = list(reference.trainable_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
                                   {"params": [p for p in params if p.dim() < 2],
                                    "weight_decay": decay if decay_on == "all" else 0.0}], lr=lr, eps=eps)
    batches = iter(ShardedTrainLoader(tiny_data(), 4, 4))
    for step in range(1, steps + 1):  # counted from 1: warmup reaches lr at its last step
        video, labels, _ = next(batches)
        F.cross_entropy(reference(video), labels).backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        progress = (step - 1 - warmup) / (steps - warmup)  # the cosine starts at lr in the step after warmup
        cosine = min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        rate = lr * step / warmup if step <= warmup else cosine
        for group in optimizer.param_groups:
            group["lr"] = rate
        optimizer.step()
        optimizer.zero_grad()
    for name, value in trainable(reference).items():  # the updates, which are small beside the values
        torch.testing.assert_close(trainable(model)[name] - start[name], value - start[name], rtol=1e-3, atol=1e-7,
                                   msg=name)


ACCUMULATING = dict(steps=3, adam_eps=1e-2, micro_batch_size=1)  # 2 micro-batches per rank and step


def accumulating_rank(rank: int, world_size: int, port: int, out: str) -> None:
    with rank_of_two(rank, world_size, port):
        model = tiny_model()
        result = train(model, tiny_data(), tiny_train_config(out, **ACCUMULATING))
        torch.save({"params": trainable(model), "losses": result.losses}, os.path.join(out, f"rank{rank}.pt"))


def test_two_ranks_accumulating_micro_batches_train_as_one_process(tmp_path):
    out = str(tmp_path / "ddp")
    run_ranks(accumulating_rank, out)
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1)]
    single = tiny_model()
    result = train(single, tiny_data(), tiny_train_config(tmp_path / "single", **ACCUMULATING))
    for saved in ranks:
        assert saved["losses"] == pytest.approx(result.losses, abs=1e-5)
        for name, value in trainable(single).items():
            torch.testing.assert_close(saved["params"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_a_run_resumed_again_and_again_across_epochs_is_the_uninterrupted_run(tmp_path):
    """fp16 with clipping, accumulation, a data worker, evaluations and one checkpoint kept, over
    epochs of 3 steps (12 clips, global batch 4): stopped after steps 2, 3 and 5."""
    config = dict(steps=7, warmup_steps=2, precision="fp16", grad_clip=0.5, micro_batch_size=1, num_workers=1,
                  eval_every=3, eval_batch_size=3, keep_checkpoints=1)
    full = train(tiny_model(), tiny_data(12), tiny_train_config(tmp_path / "full", **config),
                 eval_data=tiny_data(6, seed=3))
    losses, evals = {}, {}
    for stop, resume, seed in ((2, None, 0), (3, "auto", 7), (5, "auto", 7), (None, "auto", 7)):
        part = train(tiny_model(seed), tiny_data(12), tiny_train_config(tmp_path / "part", stop_after=stop,
                                                                          resume=resume, **config),
                     eval_data=tiny_data(6, seed=3))
        losses.update(part.losses)
        evals.update({step: r.to_dict() for step, r in part.evals.items()})
    assert part.finished and losses == full.losses
    assert evals == {step: r.to_dict() for step, r in full.evals.items()}


def test_a_resume_that_cannot_rewrite_its_logs_leaves_them_as_they_were(tmp_path, monkeypatch):
    """A resumed run rewrites its CSV logs without the rows after its checkpoint: on a full disk (a
    quota, a requeued job) that write fails, and it must not have emptied them first."""
    import csv
    import errno

    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, stop_after=2))
    log = tmp_path / "train_log.csv"
    before = log.read_bytes()

    def full_disk(self, rows):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume="auto"))
    assert log.read_bytes() == before


def test_a_resume_removes_the_temporary_files_of_log_writes_a_kill_cut_short(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, stop_after=2))
    for leftover in (".train_log.csv.k2x_9qaz", ".eval_log.csv.0abc1def"):  # atomic_write's, of a SIGKILL
        (tmp_path / leftover).write_text("step,loss\n")
    (tmp_path / ".notes").write_text("a user's")
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume="auto"))
    assert sorted(p.name for p in tmp_path.glob(".*")) == [".notes"]


class GlobalStreamsToo:
    """A `get(index, rng)` dataset that draws from torch's and numpy's global streams as well as from `rng`."""

    def __len__(self):
        return 4

    def get(self, index, rng):
        return torch.rand(1).item(), float(np.random.rand()), float(rng.random())


def test_an_items_draws_depend_on_its_seed_alone_not_on_the_streams_before_it():
    """A DataLoader worker's global streams stand elsewhere after a resume: an item of a `get` dataset that
    drew from them was another after a resume with workers. The caller's streams are kept, the GPUs' not
    touched (torch.manual_seed would reseed them)."""
    from vitaclip.engine.loader import SeededItems

    items = SeededItems(GlobalStreamsToo())
    first = items[(2, 1234)]
    torch.rand(5), np.random.rand(5)  # streams elsewhere, as in a resumed worker
    before = torch.get_rng_state(), np.random.get_state()[1].copy()
    assert items[(2, 1234)] == first
    assert torch.equal(torch.get_rng_state(), before[0]) and np.array_equal(np.random.get_state()[1], before[1])
    assert items[(2, 1235)] != first
