"""Behaviour of the video loader (vitaclip/data/loader.py: its checks, description, plans, batches,
skip accounting and PyAV pool) that mutation testing found unpinned by the other tests."""
import math

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from vitaclip.data import VideoLoader
from vitaclip.data import loader as loader_module


def make_loader(root, train, **kw):
    kw = {"backend": "pyav", "num_workers": 0, "device": "cpu", "batch_size": 1, "size": 32, **kw}
    return VideoLoader(str(root / "list.csv"), str(root), train=train, **kw)


def test_a_video_of_exactly_min_frames_frames_is_kept_and_one_frame_shorter_is_not(vp9_dataset):
    """min_frames is the shortest video taken: a video of that many frames is usable, of one frame
    fewer left out (a strict bound dropped the videos just long enough)."""
    root, rows = vp9_dataset
    shortest = min(range(len(rows)), key=lambda i: rows[i][2])
    n = rows[shortest][2]
    kept = make_loader(root, True, min_frames=n, on_error="skip")
    assert [video_id for video_id, _, _ in kept.videos] == list(range(len(rows))) and not kept.skipped
    dropped = make_loader(root, True, min_frames=n + 1, on_error="skip")
    assert shortest not in [video_id for video_id, _, _ in dropped.videos]
    assert list(dropped.skipped_videos) == [shortest]


@pytest.mark.parametrize("timeout", [0, -1.0, math.nan])
def test_a_worker_timeout_that_is_not_positive_is_refused(vp9_dataset, timeout):
    """worker_timeout is how long a worker may go silent: 0 (every wait a hang) and NaN (no wait
    ever ends, as NaN compares false) are refused with negative values."""
    root, _ = vp9_dataset
    with pytest.raises(ValueError, match="worker_timeout must be positive"):
        make_loader(root, False, worker_timeout=timeout)


@pytest.mark.parametrize("shard", [dict(), dict(shard_id=0, num_shards=1)])
def test_only_a_loader_sharded_by_process_shares_the_probing_of_its_videos(vp9_dataset, monkeypatch, shard):
    """Sharded by process (no shard_id), every rank makes the loader and the ranks split the probing;
    given its shard, a loader may be made by one process alone, which must not wait on other ranks."""
    root, _ = vp9_dataset
    asked = []
    probe = loader_module.video_infos

    def recording(*args, **kw):
        asked.append(kw["shared"])
        return probe(*args, **kw)

    monkeypatch.setattr(loader_module, "video_infos", recording)
    make_loader(root, False, **shard)
    assert asked == [not shard]


def test_a_tsn_description_holds_no_stride_since_tsn_clips_do_not_depend_on_it(vp9_dataset):
    """TSN draws a frame from each segment whatever `stride` says: two TSN loaders that differ only in
    stride plan the same clips, so their descriptions (compared when a run resumes) are the same."""
    root, _ = vp9_dataset
    a, b = (make_loader(root, True, num_frames=4, tsn=True, stride=s, augment=None) for s in (4, 16))
    for video in a.videos:
        assert np.array_equal(a.plan(*video).frames, b.plan(*video).frames)
    assert a.description() == b.description()
    assert a.description()["stride"] is None


def repeated_list(tmp_path, root, rows, n):
    """A list of `n` entries, the dataset's videos over and over, labelled by their position."""
    (tmp_path / "list.csv").write_text("".join(f"{root / rows[i % len(rows)][0]},{i}\n" for i in range(n)))
    return tmp_path


def test_a_training_epochs_order_is_the_permutation_seeded_by_seed_then_epoch(vp9_dataset, tmp_path):
    """The order of the entries in training epoch e of seed s is numpy's permutation of
    default_rng([s, e]), kept as it was for runs in flight to resume in their orders (the module's
    comment): seeded [e, s], every resumed run would have taken other videos."""
    root, rows = vp9_dataset
    n = 8
    ld = make_loader(repeated_list(tmp_path, root, rows, n), True, seed=3, num_frames=1, size=16, augment=None)
    for epoch in (0, 1, 5):
        ld.set_epoch(epoch)
        got = [batch.video_id.item() for batch in ld]
        assert got == np.random.default_rng([3, epoch]).permutation(n).tolist()



def test_the_first_entry_of_the_list_left_out_is_recorded_by_its_video_id(vp9_dataset, tmp_path):
    """skipped_videos maps each entry left out to why, by video id (its index in the list): the
    first entry's id is 0, which is recorded as any other (a truth test of the id lost it)."""
    root, rows = vp9_dataset
    (tmp_path / "list.csv").write_text(f"missing.webm,0\n{root / rows[0][0]},1\n")
    ld = make_loader(tmp_path, False, on_error="skip")
    assert list(ld.skipped_videos) == [0] and "missing.webm" in ld.skipped_videos[0]
    assert [video_id for video_id, _, _ in ld.videos] == [1]


def test_frames_decoded_at_the_transposed_size_of_the_metadata_are_a_decode_error(tmp_path):
    """A video replaced after its metadata was read, by one as many pixels in size but turned (32x64
    where 64x32 was read), decodes to frames of another size: a decode error, not frames cropped as
    if they were the size the crop boxes were drawn for."""
    from video_fixtures import write_marked_video

    write_marked_video(str(tmp_path / "v.webm"), "libvpx-vp9", 64, 32)
    (tmp_path / "list.csv").write_text("v.webm,0\nw.webm,1\n")
    write_marked_video(str(tmp_path / "w.webm"), "libvpx-vp9", 64, 32)
    ld = make_loader(tmp_path, False, batch_size=2, num_frames=2, stride=1, on_error="skip")
    write_marked_video(str(tmp_path / "w.webm"), "libvpx-vp9", 32, 64)
    assert [batch.video_id.tolist() for batch in ld] == [[0]]
    assert len(ld.skipped) == 1 and "decoded frames are 32x64, its metadata says 64x32" in ld.skipped[0]


class SilentPool:
    """Stands in for a DataLoader iterator whose workers never answer: counts the waits asked of it."""

    def __init__(self):
        self.waits = []

    def _try_get_data(self, timeout=None):
        self.waits.append(timeout)
        return False, None


def test_a_longer_wait_polls_until_its_limit_and_leaves_the_pools_own_wait_after(monkeypatch):
    """_waiting_longer makes a wait go on in polls of POOL_POLL_S, up to `limit` seconds, within its
    block only: after it, a wait of the pool is again its own (a kept wrapper would make every later
    wait of the pool, mid-epoch too, last the longer limit)."""
    monkeypatch.setattr(loader_module, "POOL_POLL_S", 2.0)
    pool = SilentPool()
    with loader_module._waiting_longer(pool, 7.0):
        assert pool._try_get_data(2.0) == (False, None)
    assert pool.waits == [2.0] * 4  # ceil(7 / 2) polls
    assert "_try_get_data" not in vars(pool)
    pool.waits.clear()
    pool._try_get_data(2.0)
    assert pool.waits == [2.0]


class RecordingDecoder:
    """Stands in for dali.DaliDecoder: records its arguments, decodes nothing."""

    def __init__(self, device, batch_size, **kw):
        self.made = dict(device=device, batch_size=batch_size, **kw)

    def decode(self, batches):
        return iter(())


@pytest.mark.parametrize("workers,threads", [(0, 2), (3, 3)])
def test_dali_is_told_the_clip_length_and_stride_and_gets_at_least_two_threads(vp9_dataset, monkeypatch, workers,
                                                                             threads):
    """DALI's reader mode reads clips of `sequence_length` frames `stride` apart: the loader's
    num_frames and stride (told another length, every fixed-stride batch falls back to the slow
    decoder mode, with the same frames). Its threads are num_workers, never fewer than two. DALI is
    a stand-in here: nothing is decoded."""
    root, _ = vp9_dataset
    monkeypatch.setattr(loader_module.dali, "available", lambda: True)
    monkeypatch.setattr(loader_module.dali, "DaliDecoder", RecordingDecoder)
    ld = make_loader(root, True, backend="dali-cpu", num_frames=3, stride=5, num_workers=workers, batch_size=2)
    list(ld.decode_epoch())
    made = ld.dali_decoder.made
    assert (made["device"], made["batch_size"], made["device_id"]) == ("cpu", 2, None)
    assert (made["sequence_length"], made["stride"], made["num_threads"]) == (3, 5, threads)


class RecordingAugment:
    """The loader's RandAugment, recording the frames it is given."""

    def __init__(self, inner):
        self.inner, self.given = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, frames, params):
        self.given.append(frames.clone())
        return self.inner(frames, params)


def test_randaugment_is_given_whole_frames_rounded_to_pixel_values(tmp_path):
    """RandAugment acts on 8-bit pixels (as PIL's, whose thresholds and histograms it follows): frames
    resized to the shape they are shown (an anamorphic video, pixels twice as wide as high) are rounded
    before it, to the values of the resized frames computed here."""
    from video_fixtures import write_marked_video
    from vitaclip.data import pyav
    from vitaclip.data.transforms import to_rgb

    write_marked_video(str(tmp_path / "wide.mp4"), "libx264", 32, 32, pixel_aspect=2)
    (tmp_path / "list.csv").write_text("wide.mp4,0\n")
    ld = make_loader(tmp_path, True, num_frames=2, stride=1, flip=False)
    ld.augment = RecordingAugment(ld.augment)
    next(iter(ld))
    plan = ld.plan(*ld.videos[0])
    assert plan.info.shown_size == (32, 64)
    frames = to_rgb(pyav.decode_frames(plan.entry.path, plan.frames), "cpu")[torch.as_tensor(plan.views[0])]
    resized = torch.nn.functional.interpolate(frames, size=(32, 64), mode="bilinear", align_corners=False)
    assert not torch.equal(resized, resized.round())  # (else rounding would change nothing)
    (given,) = ld.augment.given
    assert torch.equal(given[0], resized.round().clamp(0, 255))


def test_an_evaluation_shard_without_videos_yields_no_batches_instead_of_failing(vp9_dataset, tmp_path):
    """Evaluation deals the videos round robin to the shards: with fewer videos than shards, a shard gets
    none and yields nothing (its rank still takes part); only training refuses a shard that fills no batch."""
    root, rows = vp9_dataset
    (tmp_path / "list.csv").write_text(f"{root / rows[0][0]},0\n")
    shards = [make_loader(tmp_path, False, num_frames=2, stride=4, shard_id=r, num_shards=2) for r in range(2)]
    assert [len(ld) for ld in shards] == [1, 0]
    assert [batch.video_id.tolist() for batch in shards[0]] == [[0]]
    assert list(shards[1]) == []


def test_an_evaluation_loader_describes_itself_as_flipping_nothing(vp9_dataset):
    """Flipping is a training augmentation: an evaluation loader, flip left at its default (True), flips
    no clip, and its description says so."""
    root, _ = vp9_dataset
    assert make_loader(root, False).description()["flip"] is False
    assert make_loader(root, True).description()["flip"] is True


class Worker:
    """Stands in for a pool's worker process: alive or not, and whether it was killed."""

    def __init__(self, alive):
        self.alive, self.killed = alive, False

    def is_alive(self):
        return self.alive

    def kill(self):
        self.killed = True


def test_a_pool_ended_kills_its_workers_still_alive(vp9_dataset):
    """An ended pool's live workers are killed, not asked to stop: a hung one would ignore the request
    (and, shielded from stop signals, perhaps SIGTERM too) and outlive the pool. Dead ones are left be."""
    root, _ = vp9_dataset
    ld = make_loader(root, False)
    ld._workers = object()  # a pool, for the loader to drop
    pool = type("PoolIterator", (), {})()
    pool._workers = [Worker(True), Worker(False), Worker(True)]
    ld._end_pool(pool)
    assert [worker.killed for worker in pool._workers] == [True, False, True]
    assert ld._workers is None
