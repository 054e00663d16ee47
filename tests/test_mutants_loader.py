"""Behaviour of the engine's loaders (vitaclip/engine/loader.py) and the worker helpers
(vitaclip/data/workers.py) that mutation testing found unpinned by the other tests."""
import os
import random
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from engine_helpers import Built, WorkerSeeds, tiny_data
from vitaclip.engine import loader as engine_loader
from vitaclip.engine.loader import EpochLoader, SeededItems, ShardedTrainLoader, derived_seed, eval_batches, split_views


def key_indices(keys):
    return [[index for index, _ in batch] for batch in keys]


class DrawsOnly:
    """Items that are the draws of the streams an item is given: its `get` rng or, without `get`,
    the global python, numpy and torch streams."""

    def __init__(self, with_get: bool):
        if with_get:
            self.get = lambda index, rng: rng.random()

    def __len__(self):
        return 4

    def __getitem__(self, index):
        return random.random(), float(np.random.rand()), torch.rand(()).item()


def test_an_item_draws_from_streams_seeded_by_its_seed_not_by_its_index():
    """SeededItems seeds python's, numpy's and torch's streams and a `get` dataset's Generator with the
    item's seed: the draws are those of fresh streams of that seed, the same for every index."""
    seed = 1234
    expected = (random.Random(seed).random(), float(np.random.RandomState(seed).rand()),
                torch.rand((), generator=torch.Generator().manual_seed(seed)).item())
    assert SeededItems(DrawsOnly(False))[(2, seed)] == expected
    items = SeededItems(DrawsOnly(True))
    assert items[(2, seed)] == items[(3, seed)] == np.random.default_rng(seed).random()


@pytest.mark.parametrize("with_get", [False, True])
def test_an_item_leaves_the_callers_streams_where_they_stood(with_get):
    """The caller's python, numpy and torch streams draw next what they would have drawn without the item
    (numpy's position in its key block included, not only the key block)."""
    np.random.rand(3)  # (a position inside numpy's block)
    before = random.getstate(), np.random.get_state(), torch.get_rng_state()
    SeededItems(DrawsOnly(with_get))[(1, 99)]
    numpy_state = np.random.get_state()
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[2])
    assert numpy_state[2] == before[1][2] and np.array_equal(numpy_state[1], before[1][1])


def test_pin_memory_asked_of_the_training_loader_reaches_its_data_loader(monkeypatch):
    """ShardedTrainLoader(pin_memory=True) hands pin_memory to the DataLoader it makes each epoch."""
    asked = []

    class Recorded:
        def __init__(self, *args, **kwargs):
            asked.append(kwargs["pin_memory"])
            raise Built

    monkeypatch.setattr(engine_loader, "DataLoader", Recorded)
    for pin in (True, False):
        with pytest.raises(Built):
            next(iter(ShardedTrainLoader(tiny_data(8), 4, 2, pin_memory=pin)))
    assert asked == [True, False]


def test_a_label_equal_to_the_number_of_classes_is_outside_them():
    """Classes are indexed 0 .. num_classes - 1: a label of num_classes (or -1) is refused, num_classes - 1 is not."""
    class Labelled:
        def __init__(self, labels):
            self.labels = labels

    engine_loader.check_labels(Labelled([0, 3]), 4, "data")
    for bad in (4, -1):
        with pytest.raises(ValueError, match=f"1 label\\(s\\) outside the 4 classes, e.g. item 1 has label {bad}"):
            engine_loader.check_labels(Labelled([0, bad]), 4, "data")


def test_the_global_batch_must_divide_into_micro_batches_of_every_process():
    """global batch 4 = micro-batch 2 x 4 processes x accumulation 1/2: refused, although 2 divides 4."""
    with pytest.raises(ValueError, match="global batch 4 is not a multiple of micro-batch 2 x 4 processes"):
        ShardedTrainLoader(tiny_data(8), 4, 2, world_size=4)
    assert ShardedTrainLoader(tiny_data(8), 4, 2, world_size=2).accum_steps == 1


def test_an_epoch_drops_its_last_incomplete_global_batch_and_data_short_of_one_is_refused():
    """10 items in global batches of 4: an epoch is 2 steps (8 items), the part-batch of 2 dropped;
    3 items make no step at all."""
    loader = ShardedTrainLoader(tiny_data(10), 4, 4)
    batches = iter(loader)
    first_epoch = [next(batches)[2].tolist() for _ in range(2)]
    assert len(set(sum(first_epoch, []))) == 8
    next(batches)
    assert loader.state_dict() == {"seed": 0, "epoch": 1, "micro_in_epoch": 1}
    with pytest.raises(ValueError, match="training data has 3 items, fewer than one global batch of 4"):
        ShardedTrainLoader(tiny_data(3), 4, 4)


def test_seed_0_keeps_its_orders_a_permutation_seeded_by_the_epoch():
    """Runs of the default seed 0 in flight resume in their orders: epoch e's is torch.randperm seeded by e."""
    for epoch in (0, 3):
        order = torch.randperm(12, generator=torch.Generator().manual_seed(epoch)).tolist()
        assert key_indices(ShardedTrainLoader(tiny_data(12), 4, 4)._keys(epoch, 0)) == [order[0:4], order[4:8],
                                                                                      order[8:12]]


def test_rank_r_takes_the_micro_batches_r_r_plus_world_of_each_step():
    """A step's global batch splits into accum_steps x world micro-batches, in order; rank r of 2 takes
    micro-batches r and r + 2 of the 4 that one process with the same micro-batch takes in turn."""
    data = tiny_data(16)
    alone = list(ShardedTrainLoader(data, 8, 2, seed=5)._keys(1, 0))
    for rank in (0, 1):
        assert list(ShardedTrainLoader(data, 8, 2, rank=rank, world_size=2, seed=5)._keys(1, 0)) == alone[rank::2]


def test_an_items_seed_is_that_of_its_run_seed_epoch_and_position():
    """Each item of an epoch is drawn under derived_seed(seed, epoch, position in the epoch's order), whatever
    item the order puts there."""
    keys = [key for batch in ShardedTrainLoader(tiny_data(8), 4, 2, seed=3)._keys(2, 0) for key in batch]
    assert [seed for _, seed in keys] == [derived_seed(3, 2, p) for p in range(8)]


def test_evaluation_items_are_dealt_round_robin_to_the_ranks_each_drawn_as_on_one_process():
    """Item i is rank i % world's, in batches of batch_size, and its video is the one a single process gets
    (its seed depends on the run's seed and i alone)."""
    data = tiny_data(10)
    alone = {i: v for video, _, ids in eval_batches(data, 4, seed=2) for v, i in zip(video, ids.tolist())}
    batches = list(eval_batches(data, 2, rank=1, world_size=3, seed=2))
    assert [ids.tolist() for _, _, ids in batches] == [[1, 4], [7]]
    for video, _, ids in batches:
        for v, i in zip(video, ids.tolist()):
            assert torch.equal(v, alone[i])


def test_evaluation_workers_of_each_rank_get_a_stream_of_their_own():
    """eval_batches' workers take their base seed from (seed, rank): the ranks' workers differ, and a rank's
    are the same every time."""
    def worker_seed(rank):
        return int(next(iter(eval_batches(WorkerSeeds(), 2, rank=rank, world_size=2, num_workers=1)))[2][0])

    seeds = [worker_seed(0), worker_seed(1)]
    assert seeds[0] != seeds[1] and worker_seed(1) == seeds[1]


def test_a_list_of_batches_is_taken_as_the_ranks_batches_as_it_is():
    """A list (or tuple) has len and indexing too, but holds batches, not items."""
    batches = [(torch.zeros(2, 3, 2, 16, 16), torch.tensor([0, 1]), [0, 1])]
    assert eval_batches(batches, 1) is batches and eval_batches(tuple(batches), 1, rank=1, world_size=2) == tuple(batches)


def test_views_split_into_consecutive_videos_each_with_its_label_and_id():
    """[B, V, ...] -> [B*V, ...] video-major: row b*V + v is view v of video b, with video b's label and id."""
    video = torch.arange(2 * 3).float().view(2, 3, 1, 1, 1, 1).expand(2, 3, 3, 1, 1, 1)
    flat, labels, ids = split_views(video, torch.tensor([5, 7]), ["a", "b"])
    assert flat[:, 0, 0, 0, 0].tolist() == [0, 1, 2, 3, 4, 5]
    assert labels.tolist() == [5, 5, 5, 7, 7, 7] and ids == ["a", "a", "a", "b", "b", "b"]
    _, _, tensor_ids = split_views(video, torch.tensor([5, 7]), torch.tensor([10, 20]))
    assert tensor_ids == [10, 10, 10, 20, 20, 20]


class FiveFromStart:
    """An epoch loader of 5 batches (each its position) that can start mid-epoch, and says no next_batch."""

    def __init__(self):
        self.start = 0

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __len__(self):
        return 5

    def __iter__(self):
        return iter(range(self.start, 5))


def test_an_epoch_loader_resumed_mid_epoch_goes_on_at_the_first_batch_not_used():
    """Resumed after 2 batches, a loader that starts at start_batch yields batch 2 first, then 3, 4, then
    epoch 1 from its start."""
    resumed = EpochLoader(FiveFromStart())
    resumed.load_state_dict({"epoch": 0, "batch_in_epoch": 2})
    batches = iter(resumed)
    assert [next(batches) for _ in range(4)] == [2, 3, 4, 0]


def test_rng_states_leave_a_cuda_not_yet_initialised_alone(monkeypatch):
    """A process that has not used its GPU (a CPU run on a GPU machine) saves no CUDA generator: reading one
    would initialise CUDA on a device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: pytest.fail("initialised CUDA to read its generator"))
    assert "cuda" not in engine_loader.rng_states()


def test_map_in_workers_asked_for_no_workers_uses_one():
    """workers is at least 1: a pool of 0 processes cannot be made."""
    from vitaclip.data.workers import map_in_workers

    (pid,) = map_in_workers([(os.getpid,)], 0)
    assert pid != os.getpid()


def test_a_call_within_a_timeout_leaves_no_alarm_and_the_callers_handler():
    """within() cancels its alarm and puts back the SIGALRM handler it found, once the call returns."""
    from vitaclip.data.workers import within

    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        assert within(30, sum, [1, 2]) == 3
        assert signal.alarm(0) == 0  # (0: no alarm was pending; this also cancels one a failure left)
        assert signal.getsignal(signal.SIGALRM) is handler
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_at_most_in_flight_calls_are_submitted_at_a_time():
    """as_completed submits a call only while fewer than in_flight are running: stopping early leaves no
    queue of work behind."""
    from vitaclip.data.workers import as_completed

    running, most = {}, []

    class Counted(ThreadPoolExecutor):
        def submit(self, fn, *args):
            most.append(len(running) + 1)
            return super().submit(fn, *args)

    sleeps = [0.0, 0.3] * 3  # the first call ends well before the second
    with Counted(8) as pool:
        done = sorted(key for key, _, _ in as_completed(pool, time.sleep, enumerate((s,) for s in sleeps), 2, running))
    assert done == list(range(6)) and max(most) == 2


def test_a_call_the_broken_pool_refuses_comes_back_failed_not_lost():
    """A submit to a pool already broken raises BrokenProcessPool: as_completed hands that call back with
    the failure in its future, as the calls in flight end, so that it is run again alone."""
    from concurrent.futures.process import BrokenProcessPool

    from vitaclip.data.workers import as_completed

    class BrokenAtTwo(ThreadPoolExecutor):
        def submit(self, fn, *args):
            if args == (2,):
                raise BrokenProcessPool("a worker died")
            return super().submit(fn, *args)

    with BrokenAtTwo(2) as pool:
        ended = {key: future for key, _, future in as_completed(pool, abs, enumerate((k,) for k in range(4)), 2, {})}
    assert sorted(ended) == [0, 1, 2, 3] and isinstance(ended[2].exception(), BrokenProcessPool)
    assert [ended[k].result() for k in (0, 1, 3)] == [0, 1, 3]


def test_an_error_in_the_caller_kills_the_calls_still_running(tmp_path):
    """map_in_workers ends at once on an error of its own (here done() raising, as Ctrl-C would): a long
    call still running is killed with its worker, so the caller's process exits without waiting for it."""
    from worker_faults import exits_within

    assert exits_within("""
if __name__ == "__main__":
    import os, time
    from vitaclip.data.workers import map_in_workers

    def interrupted():
        raise KeyboardInterrupt

    try:
        map_in_workers([(os.getpid,), (time.sleep, 300)], 2, done=interrupted)
    except KeyboardInterrupt:
        print("done", flush=True)
""", tmp_path, timeout=60)
