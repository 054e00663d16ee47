"""DDP on the CPU: two gloo processes train like one process with the same global batch."""
import dataclasses
import os
import re
import signal
import warnings

import pytest
import torch

from engine_helpers import (CLASSES, FetchedItems, SignallingData, drawing_model, one_thread,  # noqa: F401
                            tiny_data, tiny_model, tiny_train_config, trainable)
from ranks import rank_of_two, run_ranks
from vitaclip import VitaCLIP
from vitaclip.engine import checkpoint as ckpt
from vitaclip.engine.distributed import DistEnv
from vitaclip.engine.evaluate import EvalConfig, evaluate, read_video_scores
from vitaclip.engine.train import train

STEPS = 3
EVAL = EvalConfig(batch_size=3, device="cpu", num_workers=0, progress=False, precision="fp32")


def worker(rank: int, world_size: int, port: int, out: str, seed: int) -> None:
    with rank_of_two(rank, world_size, port):
        model = tiny_model(seed=seed + rank)  # different inits: DDP must start every rank from rank 0's
        result = train(model, tiny_data(), tiny_train_config(out, steps=STEPS, adam_eps=1e-2, checkpoint_every=2))
        # 11 videos: ranks get 6 and 5
        evaluation = evaluate(model, tiny_data(11, seed=5), EVAL, scores_path=os.path.join(out, "scores.safetensors"))
        torch.save({"params": trainable(model), "losses": result.losses, "eval": evaluation.to_dict()},
                   os.path.join(out, f"rank{rank}.pt"))


def test_two_gloo_processes_match_single_process(tmp_path):
    out = str(tmp_path / "ddp")
    run_ranks(worker, out, 0)
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    for k, v in r0["params"].items():
        assert torch.equal(v, r1["params"][k]), k
    assert r0["losses"] == r1["losses"]
    assert len(ckpt.load_checkpoint(ckpt.latest_checkpoint(out))["rng"]) == 2
    # distributed evaluation: every rank gets the result over all videos, as one process computes it
    assert r0["eval"] == r1["eval"] and r0["eval"]["num_videos"] == 11
    assert r0["eval"]["num_views"] == 11  # each video evaluated on one rank only
    alone = tiny_model()
    with torch.no_grad():
        for name, p in alone.named_trainable_parameters():
            p.copy_(r0["params"][name])
    expected = evaluate(alone, tiny_data(11, seed=5), EVAL, scores_path=str(tmp_path / "alone.safetensors")).to_dict()
    assert r0["eval"]["confusion"] == expected["confusion"]
    assert r0["eval"]["top1"] == expected["top1"]
    scores, alone_scores = (read_video_scores(p) for p in (os.path.join(out, "scores.safetensors"),
                                                            tmp_path / "alone.safetensors"))
    assert scores.video_ids == alone_scores.video_ids == list(range(11))  # each video once, from both ranks
    torch.testing.assert_close(scores.probs, alone_scores.probs)
    assert torch.equal(scores.labels, alone_scores.labels)

    # one process, same global batch of 4 (2 micro-batches of 2 accumulated), rank 0's init
    single = tiny_model(seed=0)
    result = train(single, tiny_data(), tiny_train_config(tmp_path / "single", steps=STEPS, adam_eps=1e-2,
                                                           micro_batch_size=2))
    for step, loss in result.losses.items():
        assert abs(loss - r0["losses"][step]) < 1e-5, step
    for k, v in trainable(single).items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def unreadable(path):
    raise FileNotFoundError(f"{path} is on another node")


def resume_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with rank_of_two(rank, world_size, port):
        train(tiny_model(), tiny_data(), tiny_train_config(out, steps=STEPS, stop_after=2))
        if rank == 1:  # a rank whose view of the run folder lags (a network file system), or that has
            ckpt.list_checkpoints = lambda directory: []  # none (a node-local folder: rank 0 writes alone)
            ckpt.load_checkpoint = ckpt.read_torch_file = unreadable
        result = train(tiny_model(), tiny_data(), tiny_train_config(out, steps=STEPS, resume="auto"))
        try:  # a fresh run in the same folder: refused on every rank, not only where checkpoints are seen
            train(tiny_model(), tiny_data(), tiny_train_config(out, steps=STEPS))
            refusal = None
        except ValueError as err:
            refusal = str(err)
        torch.save({"losses": result.losses, "refusal": refusal}, os.path.join(out, f"rank{rank}.pt"))


def test_every_rank_follows_rank_0s_choice_of_checkpoint(tmp_path):
    out = str(tmp_path / "ddp")
    run_ranks(resume_worker, out)
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    assert list(r0["losses"]) == [3] and r0["losses"] == r1["losses"]
    assert "holds checkpoints of an earlier run" in r0["refusal"] and r1["refusal"] == r0["refusal"]


def failed_write_worker(rank: int, world_size: int, port: int, out: str, what: str) -> None:
    import errno

    from vitaclip import VitaCLIP

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with rank_of_two(rank, world_size, port):
        if rank == 0 and what == "checkpoint":
            ckpt.save_checkpoint = full_disk
        elif rank == 0:
            VitaCLIP.save_pretrained = full_disk
        try:
            train(tiny_model(), tiny_data(), tiny_train_config(out, steps=2, checkpoint_every=2, save_final=True))
            error = None
        except Exception as err:  # noqa: BLE001 - recorded for the test
            error = f"{type(err).__name__}: {err}"
        torch.save(error, os.path.join(out, f"rank{rank}.pt"))


@pytest.mark.parametrize("what", ["checkpoint", "final model"])
def test_a_write_that_fails_on_rank_0_fails_every_rank_naming_it(tmp_path, what):
    """Only rank 0 writes; the others waited at a barrier and, when its write failed (a full disk),
    died of a lost connection (gloo) or waited out the collective timeout (NCCL)."""
    out = str(tmp_path / "ddp")
    run_ranks(failed_write_worker, out, what)
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    written = "checkpoint-00000002.pt" if what == "checkpoint" else "model"
    assert r0.startswith("OSError") and "No space left on device" in r0, r0
    assert r1.startswith("OSError: writing") or r1.startswith("OSError: saving"), r1
    assert written in r1 and "failed on rank 0: OSError" in r1 and "No space left" in r1, r1


def stop_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with rank_of_two(rank, world_size, port):
        data = SignallingData(signal.SIGTERM, at=(3,), rank=1)  # rank 1 alone, in its step 2 (2 clips a step)
        result = train(tiny_model(), data, tiny_train_config(out, steps=4, checkpoint_every=4))
        torch.save({"step": result.step, "stopped_by": result.stopped_by, "losses": result.losses},
                   os.path.join(out, f"rank{rank}.pt"))


def test_a_stop_signal_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    out = str(tmp_path / "ddp")
    run_ranks(stop_worker, out)
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))
    assert r0["step"] == r1["step"] == 2 and r0["losses"] == r1["losses"]
    assert r1["stopped_by"] == "SIGTERM" and r0["stopped_by"] == "another rank's signal"
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-00000002.pt"]


class Counted:
    """A rank's evaluation batches that count `count` whatever they hold, as a VideoLoader that leaves
    out batches none of whose videos decode."""

    def __init__(self, batches, count):
        self.batches, self.count = batches, count

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return self.count


def stop_vote_worker(rank: int, world_size: int, port: int, out: str) -> None:
    from vitaclip.engine.distributed import init_distributed, sum_across_ranks
    from vitaclip.engine.evaluate import EvaluationStopped

    with rank_of_two(rank, world_size, port):
        env = init_distributed("cpu")
        asked = []

        def stop():  # rank 1's second batch, only
            asked.append(len(asked))
            return rank == 1 and len(asked) == 2

        try:
            evaluate(tiny_model(), tiny_data(11), EVAL, env=env, stop=stop)
            outcome = "finished"
        except EvaluationStopped as stopped:
            outcome = str(stopped)
        in_step = sum_across_ranks(env, [1.0])  # the ranks' next collective pairs up
        # ranks with different numbers of batches (a loader that leaves out a batch none of whose videos
        # decoded yields fewer than it counts): the one done votes on until the other is
        data = tiny_data(6)
        batches = [tuple(torch.utils.data.default_collate([data[i] for i in items]))
                   for items in ([[0, 1], [2, 3]] if rank == 0 else [[4, 5]])]
        uneven = evaluate(tiny_model(), Counted(batches, 2), EVAL, env=env, stop=lambda: False).num_videos
        torch.save({"outcome": outcome, "asked": len(asked), "in_step": in_step, "uneven": uneven},
                   os.path.join(out, f"rank{rank}.pt"))


def test_a_stop_asked_of_one_rank_ends_the_evaluation_on_every_rank_at_the_same_batch(tmp_path):
    run_ranks(stop_vote_worker, str(tmp_path))
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result == {"outcome": "evaluation stopped before its batch 1", "asked": 2, "in_step": [2.0],
                          "uneven": 6}


class RankPositions:
    """An endless, resumable loader of tiny_data micro-batches whose position is its own rank's
    (ranks that left out different batches are at different places)."""

    batch_size = 2

    def __init__(self, rank: int):
        self.data, self.position, self.restored = tiny_data(), 10 * rank, None

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = self.restored = state["position"]

    def __iter__(self):
        while True:
            items = [self.data[(self.position + i) % len(self.data)] for i in range(self.batch_size)]
            self.position += self.batch_size
            yield (torch.stack([v for v, _, _ in items]), torch.tensor([label for _, label, _ in items]),
                   torch.tensor([i for _, _, i in items]))


def position_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with rank_of_two(rank, world_size, port):
        train(tiny_model(), RankPositions(rank), tiny_train_config(out, steps=STEPS, stop_after=2))
        resumed = RankPositions(rank)
        train(tiny_model(), resumed, tiny_train_config(out, steps=STEPS, resume="auto"))
        torch.save({"restored": resumed.restored}, os.path.join(out, f"rank{rank}.pt"))


def test_each_rank_resumes_at_its_own_data_position(tmp_path):
    out = str(tmp_path / "ddp")
    run_ranks(position_worker, out)
    assert [torch.load(os.path.join(out, f"rank{r}.pt"))["restored"] for r in (0, 1)] == [4, 14]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(out, 2))["loader"] == [{"position": 4}, {"position": 14}]


def test_compiled_backends_keep_their_layer_graphs_whole_under_ddp(monkeypatch, tmp_path):
    """DDP's graph splitting would cut the compiled layer at gradient-bucket boundaries."""
    import dataclasses

    import torch.distributed as dist

    from vitaclip.engine import train as train_module
    from vitaclip.engine.distributed import DistEnv

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    # torch's own patch, not monkeypatch's: pytest >= 9.2 undoes a module attribute it did not find in the
    # module's __dict__ by deleting it, which hides a torch config entry from every later test
    try:
        with torch._dynamo.config.patch(optimize_ddp=True):
            env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
            model = tiny_model()
            train_module.distributed_model(model, env)  # the reference backend compiles nothing
            assert torch._dynamo.config.optimize_ddp
            compiled = dataclasses.replace(train_module.resolve_backend("reference", env.device), compile_modules=True)
            monkeypatch.setattr(train_module, "resolve_backend", lambda name, device: compiled)
            train_module.distributed_model(model, env)
            assert not torch._dynamo.config.optimize_ddp
    finally:
        dist.destroy_process_group()


def test_collectives_wait_longer_than_a_hung_decoder_takes_to_be_named(monkeypatch):
    """torch's 10-minute default equals the loader's worker_timeout: the healthy ranks' collective
    would time out before the rank with the hung decoder names the video."""
    from datetime import timedelta

    from vitaclip.engine import distributed

    made = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: bool(made))
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: made.append(kw))
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    env = distributed.init_distributed("cpu")
    assert (env.rank, env.world_size) == (1, 2)
    assert made[0]["timeout"] == timedelta(seconds=1800) > timedelta(seconds=600)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7200")
    assert distributed.collective_timeout() == timedelta(hours=2)
    for bad in ("0", "soon", "nan", "inf"):
        monkeypatch.setenv(distributed.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"VITACLIP_DIST_TIMEOUT_S must be a positive number.*'{bad}'"):
            distributed.collective_timeout()


def test_a_gpu_other_than_the_processes_own_is_refused_under_torchrun(monkeypatch):
    """`--device cuda:0` on every process of an 8-GPU node: NCCL's duplicate-GPU error, named first.
    Each process's own GPU is fine, given as cuda (or cuda:LOCAL_RANK), or as the only one it sees."""
    from vitaclip.engine import distributed

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(distributed, "check_cuda_device", lambda device: None)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")  # (no process group to join here)
    with pytest.raises(ValueError, match=r"'cuda:0' is not this process's GPU \(cuda:3, local rank 3\).*give 'cuda'"):
        distributed.init_distributed("cuda:0")
    assert distributed.init_distributed("cuda").device == torch.device("cuda", 3)
    assert distributed.init_distributed("cuda:3").device == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)  # a launcher gave each process one GPU
    assert distributed.init_distributed("cuda").device == torch.device("cuda", 0)
    assert distributed.init_distributed("cuda:0").device == torch.device("cuda", 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_a_device_that_is_none_or_missing_is_named():
    from vitaclip.engine import distributed

    with pytest.raises(ValueError, match="device 'cpus' is not one: cpu, cuda or cuda:N"):
        distributed.pick_device("cpus")
    # torch's, not the engine's: 'meta' failed in the first step as autocast's 'unsupported scalarType'
    for other in ("meta", "mps"):
        with pytest.raises(ValueError, match=f"device '{other}' is not one: cpu, cuda or cuda:N"):
            distributed.pick_device(other)
    with pytest.raises(ValueError, match="device 'cuda:0': this process has no CUDA GPU"):
        distributed.init_distributed("cuda")


def rng_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with rank_of_two(rank, world_size, port):
        train(drawing_model([]), tiny_data(), tiny_train_config(out, steps=4, stop_after=2))
        draws = []
        train(drawing_model(draws), tiny_data(), tiny_train_config(out, steps=4, resume="auto"))
        torch.save({"draws": draws}, os.path.join(out, f"rank{rank}.pt"))


def test_each_rank_resumes_its_own_rng_states(tmp_path):
    """restore() must put back each rank's own RNG states (each rank's are seeded of its own);
    with rank 0's everywhere, rank 1 continued rank 0's random stream."""
    out = str(tmp_path / "ddp")
    run_ranks(rng_worker, out)
    saved = ckpt.load_checkpoint(ckpt.checkpoint_path(out, 2))["rng"]
    assert len(saved) == 2
    for rank in (0, 1):
        draws = torch.load(os.path.join(out, f"rank{rank}.pt"))["draws"]
        streams = []
        for state in saved:
            generator = torch.Generator()
            generator.set_state(state["torch"])
            streams.append(torch.rand(64, generator=generator).tolist())
        assert draws and all(d in streams[rank] for d in draws), rank
        assert not any(d in streams[1 - rank] for d in draws), rank


def test_another_process_count_or_micro_batch_is_a_change_and_another_global_batch_refused():
    """The saved data position counts each rank's micro-batches: another layout resumes only as a
    change (moved to the same place in the data, see below); the global batch cannot change."""
    from vitaclip.engine.train import check_batch_layout

    config = tiny_train_config("out", batch_size=4, micro_batch_size=2)
    payload = {"train_config": dataclasses.asdict(config), "rng": [{}, {}]}  # written by 2 processes
    assert check_batch_layout(payload, "ckpt", config, 2, DistEnv(0, 1, 0, torch.device("cpu"))) == [
        "processes: 2 -> 1"]
    assert check_batch_layout(payload, "ckpt", config, 2, DistEnv(1, 2, 1, torch.device("cpu"))) == []
    assert check_batch_layout(payload, "ckpt", config, 1, DistEnv(1, 2, 1, torch.device("cpu"))) == [
        "micro_batch_size: 2 -> 1"]
    with pytest.raises(ValueError, match="global batch of 4, this run's is 8"):
        check_batch_layout(payload, "ckpt", tiny_train_config("out", batch_size=8), 4,
                           DistEnv(1, 2, 1, torch.device("cpu")))


def test_a_data_position_moves_to_another_layout_by_the_videos_used():
    from vitaclip.engine.train import moved_data_position

    saved = [{"seed": 0, "epoch": 3, "batch_in_epoch": 6}] * 2  # 2 ranks x micro-batches of 4: 48 videos used
    assert moved_data_position(saved, 8, 16, "ckpt") == {"seed": 0, "epoch": 3, "batch_in_epoch": 3}
    assert moved_data_position(saved, 8, 2, "ckpt") == {"seed": 0, "epoch": 3, "batch_in_epoch": 24}
    assert moved_data_position({"seed": 0, "epoch": 1, "micro_in_epoch": 5}, 4, 4, "ckpt")["micro_in_epoch"] == 5
    with pytest.raises(ValueError, match="stopped 48 videos into epoch 3, not a whole number of this run's 32"):
        moved_data_position(saved, 8, 32, "ckpt")
    with pytest.raises(ValueError, match=r"ckpt: its ranks stopped at other places in the data \(rank 0: epoch 3 batch "
                                         r"6, rank 1: epoch 3 batch 5; .*\): resume with its 2 processes"):
        moved_data_position([saved[0], {**saved[0], "batch_in_epoch": 5}], 8, 16, "ckpt")


def two_rank_layout_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with rank_of_two(rank, world_size, port):  # micro-batches of 1, accumulated over 2
        train(tiny_model(), tiny_data(), tiny_train_config(out, steps=4, stop_after=2, micro_batch_size=1))


def test_a_run_resumes_on_another_process_count_from_the_same_place_in_the_data(tmp_path):
    """A run of 2 processes (micro-batches of 1, 4 per rank in 2 steps) resumed by one process
    (micro-batches of 4): only with --resume-with-changes, and then from the same place in the data
    as a run of one process throughout (taken as it was saved, 4 micro-batches of 4, it would skip
    16 videos). (The parameters are close, not equal: Adam turns the rounding noise of gradients
    that are zero, as that of the key projections' biases, into steps of the learning rate.)"""
    out = str(tmp_path / "two")
    run_ranks(two_rank_layout_worker, out)
    with pytest.raises(ValueError, match="processes: 2 -> 1; micro_batch_size: 1 -> 4"):
        train(tiny_model(), tiny_data(), tiny_train_config(out, steps=4, resume="auto"))
    resumed = FetchedItems()
    with pytest.warns(UserWarning, match="processes: 2 -> 1"):
        train(tiny_model(), resumed, tiny_train_config(out, steps=4, resume="auto", resume_with_changes=True))
    straight = FetchedItems()
    train(tiny_model(), straight, tiny_train_config(tmp_path / "one", steps=4))
    assert len(straight.fetched) == 16 and resumed.fetched == straight.fetched[8:]


class OwnEpochs:
    """A loader of the user's with set_epoch(): batches of `batch_size` items in a fixed order."""

    def __init__(self, batch_size: int):
        self.batch_size, self.data = batch_size, tiny_data()

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for start in range(0, len(self.data), self.batch_size):
            items = [self.data[i] for i in range(start, start + self.batch_size)]
            yield (torch.stack([v for v, _, _ in items]), torch.tensor([label for _, label, _ in items]),
                   [i for _, _, i in items])


def test_another_layout_is_refused_for_a_loader_whose_position_cannot_be_carried_over(tmp_path):
    train(tiny_model(), OwnEpochs(4), tiny_train_config(tmp_path, steps=4, stop_after=2))
    with pytest.raises(ValueError, match="position of this run's OwnEpochs in its data cannot be carried over"), \
            warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before the warning of a resume with changes
        train(tiny_model(), OwnEpochs(2), tiny_train_config(tmp_path, steps=4, micro_batch_size=2, resume="auto",
                                                            resume_with_changes=True))


def test_a_video_loader_sharded_otherwise_than_by_rank_keeps_its_position_to_its_own_layout(vp9_dataset):
    """A VideoLoader given its own shard_id/num_shards does not take the epoch in turns with the ranks:
    its position cannot be moved to another layout."""
    from vitaclip.data import VideoLoader
    from vitaclip.engine.loader import EpochLoader, ShardedTrainLoader
    from vitaclip.engine.train import ranks_take_turns

    root, _ = vp9_dataset

    def video_loader(**shard):
        return EpochLoader(VideoLoader(str(root / "list.csv"), str(root), train=True, batch_size=1, num_frames=2, size=16,
                                       backend="pyav", device="cpu", num_workers=0, **shard))

    one = DistEnv(0, 1, 0, torch.device("cpu"))
    assert ranks_take_turns(video_loader(), one) and ranks_take_turns(video_loader(shard_id=0, num_shards=1), one)
    assert not ranks_take_turns(video_loader(shard_id=1, num_shards=2), one)
    assert not ranks_take_turns(video_loader(shard_id=0, num_shards=1), DistEnv(1, 2, 1, torch.device("cpu")))
    assert ranks_take_turns(ShardedTrainLoader(tiny_data(8), 4, 2), one)
    assert not ranks_take_turns(EpochLoader(OwnEpochs(4)), one)


def test_the_default_device_is_the_local_ranks_gpu(monkeypatch):
    """with no device given (TrainConfig.device None), each process of a multi-GPU node takes
    its local rank's GPU, as 'cuda' does; cuda:0 for every rank would stack them on one GPU."""
    from vitaclip.engine import distributed

    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 8)
    assert distributed.pick_device(None, 3) == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    assert distributed.pick_device(None, 3) == torch.device("cuda", 0)


def test_an_initialised_process_group_gives_rank_and_world_size(monkeypatch):
    """a script that initialised the group itself (e.g. file:// init, no torchrun variables)
    must get the group's rank and size, not a lone rank 0 of 1."""
    from vitaclip.engine import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    env = distributed.init_distributed("cpu")
    assert (env.rank, env.world_size, env.is_main, env.is_distributed) == (1, 2, False, True)


class Described(torch.utils.data.Dataset):
    """tiny_data() that describes its whole list as a VideoLoader does, with this rank's digest."""

    def __init__(self, digest: str):
        self.data, self.digest = tiny_data(), digest

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]

    def description(self):
        return {"videos": len(self.data), "list": self.digest}


def zero_shot(model: VitaCLIP, template: str) -> VitaCLIP:
    model.set_classes(CLASSES, templates=[template])
    return model


def mismatch_worker(rank: int, world_size: int, port: int, out: str) -> None:
    """Each case's train() or evaluate() where rank 1 loads other data, classes, settings or model; what each
    rank raised."""
    with rank_of_two(rank, world_size, port):
        outcomes = {}
        cases = {
            "training list": lambda: train(tiny_model(), Described("ab" if rank == 0 else "cd"),
                                           tiny_train_config(os.path.join(out, "list"), steps=1, warmup_steps=0)),
            "class names": lambda: train(tiny_model(classes=["a", "b", "c", "d"] if rank == 0 else ["a", "b", "c", "e"]),
                                         tiny_data(), tiny_train_config(os.path.join(out, "classes"), steps=1,
                                                                        warmup_steps=0)),
            "training settings": lambda: train(tiny_model(), tiny_data(), tiny_train_config(
                os.path.join(out, "settings"), steps=1 + rank, warmup_steps=0)),
            # the default micro-batch (the global batch over the ranks: 2) given on one rank only
            "micro-batch given": lambda: train(tiny_model(), tiny_data(), tiny_train_config(
                os.path.join(out, "micro"), steps=1, warmup_steps=0, micro_batch_size=2 if rank else None)).step,
            "model architecture": lambda: train(VitaCLIP(dataclasses.replace(tiny_model().config, n_ctx=4 + rank),
                                                         CLASSES), tiny_data(),
                                                tiny_train_config(os.path.join(out, "arch"), steps=1, warmup_steps=0)),
            "evaluation list": lambda: evaluate(tiny_model(), Described("ab" if rank == 0 else "cd"), EVAL),
            # nodes each loading their own copy of a model file for eval or zeroshot
            "evaluated architecture": lambda: evaluate(VitaCLIP(dataclasses.replace(tiny_model().config, n_ctx=4 + rank),
                                                                CLASSES), Described("ab"), EVAL),
            "evaluated weights": lambda: evaluate(tiny_model(seed=rank), Described("ab"), EVAL),
            "evaluated templates": lambda: evaluate(zero_shot(tiny_model(), "a video of {}." if rank == 0 else
                                                              "a clip of {}."), Described("ab"), EVAL),
            "same": lambda: evaluate(tiny_model(), Described("ab"), EVAL).num_videos,
        }
        for name, case in cases.items():
            try:
                outcomes[name] = case()
            except ValueError as error:
                outcomes[name] = str(error)
        torch.save(outcomes, os.path.join(out, f"rank{rank}.pt"))


def test_ranks_that_load_other_lists_classes_settings_or_models_are_refused_on_every_rank(tmp_path):
    """Nodes each reading their own copy of a list or class file: where they differ, each rank would
    draw its share from its own list (videos trained twice, others never) and say nothing."""
    run_ranks(mismatch_worker, str(tmp_path))
    for rank in (0, 1):
        outcomes = torch.load(tmp_path / f"rank{rank}.pt")
        assert outcomes["training list"] == ("the training data differ between ranks: list 'ab' vs 'cd' (rank 0 vs "
                                             "rank 1); every rank must load the same")
        assert outcomes["class names"].startswith("the class names differ between ranks: item 3 'd' vs 'e'")
        # (nodes given other command lines: the ranks would meet at other steps and wait there until the timeout)
        assert outcomes["training settings"] == ("the training settings differ between ranks: steps 1 vs 2 (rank 0 vs "
                                                 "rank 1); every rank must load the same")
        assert outcomes["model architecture"] == ("the model architectures differ between ranks: n_ctx 4 vs 5 (rank 0 "
                                                  "vs rank 1); every rank must load the same")
        assert outcomes["evaluation list"].startswith("the evaluation data differ between ranks: list 'ab' vs 'cd'")
        assert outcomes["evaluated architecture"].startswith("the model architectures differ between ranks: n_ctx 4 "
                                                             "vs 5 (rank 0 vs rank 1)")
        assert re.fullmatch(r"the models differ between ranks: weights '[0-9a-f]{32}' vs '[0-9a-f]{32}' \(rank 0 vs "
                            r"rank 1\); every rank must load the same", outcomes["evaluated weights"])
        assert outcomes["evaluated templates"] == ("the models differ between ranks: templates ['a video of {}.'] vs "
                                                   "['a clip of {}.'] (rank 0 vs rank 1); every rank must load the same")
        assert outcomes["same"] == 32
        assert outcomes["micro-batch given"] == 1


@pytest.mark.parametrize("values,difference", [
    ([["a", "b"], ["a", "b"], ["a", "b", "c"]], "2 vs 3 items"),
    ([{"videos": 4, "list": "ab"}, {"videos": 4, "list": "ab"}, {"videos": 5, "list": "ab"}], "videos 4 vs 5"),
])
def test_a_rank_past_the_second_differing_is_named_as_is_a_list_of_another_length(monkeypatch, values, difference):
    """Ranks 0 and 1 agree, rank 2 does not (a third node's copy): its value is compared too, and a list
    that only adds names to rank 0's says how many it has (a first differing item there is none)."""
    from vitaclip.engine import distributed

    monkeypatch.setattr(distributed, "all_gather_objects", lambda env, value: values)
    with pytest.raises(ValueError, match=re.escape(f"the class names differ between ranks: {difference} (rank 0 vs "
                                                   f"rank 2); every rank must load the same")):
        distributed.check_same_on_every_rank(DistEnv(0, 3, 0, torch.device("cpu")), values[0], "the class names")
