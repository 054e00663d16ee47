"""A PyAV decoding worker that dies on a video (FFmpeg crashing on a damaged file whose probe
succeeded) in skip mode: the loader finds the video at fault by decoding the clips in hand again, each
alone, leaves it out (of later epochs too), and goes on with the epoch in a new pool (raise mode still
ends the epoch)."""
import shutil

import pytest
import torch

pytest.importorskip("av")

from vitaclip.data import VideoDecodeError, VideoLoader

CRASH_ID = 2  # with seed 0, epoch 0 plans it second in batch 0, epoch 1 first in batch 2 (the last)
NAMES = [f"v{i}.webm" if i != CRASH_ID else "crash.webm" for i in range(6)]


@pytest.fixture
def crash_list(vp9_dataset, tmp_path, monkeypatch):
    """Six small videos, one named "crash" (on which the decoding workers die), labels 0..5, and the
    decoding workers' tasks those of worker_faults."""
    from vitaclip.data import loader as loader_module
    from worker_faults import FaultyTasks

    root, rows = vp9_dataset
    for i, name in enumerate(NAMES):
        shutil.copy(root / rows[i % 3][0], tmp_path / name)
    (tmp_path / "list.csv").write_text("".join(f"{name},{i}\n" for i, name in enumerate(NAMES)))
    monkeypatch.setattr(loader_module, "_PyAVTasks", FaultyTasks)
    monkeypatch.setattr(loader_module, "POOL_POLL_S", 0.5)  # a dead worker noticed within half a second
    return tmp_path


def make_loader(folder, **kw):
    kw = {**dict(train=True, batch_size=2, num_frames=2, stride=4, size=32, augment=None, backend="pyav",
                 device="cpu", num_workers=2, prefetch=1, worker_timeout=60, seed=0), **kw}
    return VideoLoader(str(folder / "list.csv"), str(folder), **kw)


def without_crash(batches):
    """The batches of a run in which the crash video was left out: its clip taken from its batch."""
    kept = []
    for batch in batches:
        keep = batch.video_id != CRASH_ID
        if keep.any():
            kept.append((batch.video[keep], batch.label[keep], batch.video_id[keep]))
    return kept


def assert_same(got, want):
    assert [b.video_id.tolist() for b in got] == [ids.tolist() for _, _, ids in want]
    for batch, (video, label, ids) in zip(got, want):
        assert torch.equal(batch.label, label) and torch.equal(batch.video_id, ids)
        assert torch.equal(batch.video, video)


def test_a_worker_crash_in_skip_mode_leaves_out_its_video_only_and_the_epoch_goes_on(crash_list):
    inline = make_loader(crash_list, num_workers=0)  # decodes in this process: the crash video decodes
    reference = {}
    for epoch in (0, 1):
        inline.set_epoch(epoch)
        reference[epoch] = without_crash(list(inline))
    assert sum(len(ids) for _, _, ids in reference[0]) == 5

    ld = make_loader(crash_list, on_error="skip")
    first = list(ld)  # the crash in the first batch, while the pool held the second and part of the third
    assert_same(first, reference[0])
    ids = torch.cat([b.video_id for b in first]).tolist()
    assert sorted(ids) == [i for i in range(6) if i != CRASH_ID]  # every other video, once
    assert all(b.label.tolist() == b.video_id.tolist() for b in first)  # label i for video i
    assert len(ld.skipped) == 1 and "crash.webm" in ld.skipped[0] and list(ld.skipped_videos) == [CRASH_ID]
    assert ld.next_batch == 3

    pool = ld._workers
    ld.set_epoch(1)  # the crash video, planned in the last batch, is left out before decoding
    assert_same(list(ld), reference[1])
    assert len(ld.skipped) == 1  # counted once in all
    assert ld._workers is pool  # no worker died: the pool of epoch 0 is still the one

    ld.set_epoch(1, start_batch=1)  # resumed mid-epoch
    assert_same(list(ld), reference[1][1:])
    assert len(ld.skipped) == 1 and ld.next_batch == 3


def test_a_worker_crash_in_raise_mode_still_ends_the_epoch_naming_the_videos_awaited(crash_list):
    ld = make_loader(crash_list)
    with pytest.raises(VideoDecodeError, match=r"worker failed while the loader waited for .*crash\.webm"):
        list(ld)
    assert ld._workers is None and ld.skipped == []  # the next epoch starts a new pool
