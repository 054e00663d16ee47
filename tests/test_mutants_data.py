"""Data pipeline rules that mutation testing found unpinned: each test states the rule from SPEC.md
(or the module docstrings) and checks the loader's clips or plans against a small computation of
its own, so that a change the other tests did not notice fails here."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("av")

from vitaclip.data import VideoLoader, pyav, sampling
from vitaclip.data.lists import read_video_list
from vitaclip.data.transforms import to_rgb

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)  # CLIP's, as SPEC gives them
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def make_loader(root, train, **kw):
    kw = {"backend": "pyav", "num_workers": 0, "device": "cpu", "batch_size": 1, "size": 32, **kw}
    return VideoLoader(str(root / "list.csv"), str(root), train=train, **kw)


def planned_indices(ld, video_id, epoch):
    plan = ld.plan(*ld.videos[video_id], epoch=epoch)
    return plan.frames[plan.views[0]].tolist()


def test_train_plans_start_anywhere_a_whole_strided_clip_fits_in_the_real_video(vp9_dataset):
    """Fixed stride: frames `stride` apart from a start uniform in [0, n - stride*(T-1)), n the video's
    frame count. The loader passing the sampler one frame fewer (never the last start), or a stride
    one short, went unnoticed: the loader's own tests take the frames it planned as their reference."""
    root, rows = vp9_dataset
    t, stride = 4, 8
    ld = make_loader(root, True, num_frames=t, stride=stride, augment=None)
    for video_id, (_, _, n, _) in enumerate(rows):
        starts = set()
        for epoch in range(400):
            idx = planned_indices(ld, video_id, epoch)
            assert idx == [idx[0] + k * stride for k in range(t)], (video_id, epoch, idx)
            starts.add(idx[0])
        last = n - stride * (t - 1) - 1
        assert min(starts) >= 0 and max(starts) <= last, (video_id, n, sorted(starts)[-3:])
        if last < 40:  # few starts: 400 draws reach every one (the 120-frame video's 96 are not all drawn)
            assert starts == set(range(last + 1)), (video_id, n, sorted(starts)[-3:])


def test_tsn_plans_reach_both_ends_of_every_segment_of_the_real_video(vp9_dataset):
    """TSN: T segments of (n-1)/T frames, from segment i a frame uniform in [round(seg*i),
    round(seg*(i+1))], both ends included: over many epochs every frame of each segment is drawn,
    the video's last one too. A frame count one short only narrowed the range the old test checked."""
    root, rows = vp9_dataset
    t = 4
    ld = make_loader(root, True, num_frames=t, tsn=True, augment=None)
    video_id, n = 1, rows[1][2]
    assert n == 45  # seg = 11: [0, 11], [11, 22], [22, 33], [33, 44]
    seen = [set() for _ in range(t)]
    for epoch in range(400):
        for i, v in enumerate(planned_indices(ld, video_id, epoch)):
            seen[i].add(v)
    assert seen == [set(range(11 * i, 11 * (i + 1) + 1)) for i in range(t)]


def test_eval_resizes_the_short_side_to_eval_short_side_then_crops(vp9_dataset):
    """SPEC's test protocol: resize the short side (to eval_short_side, here 40, not the crop size 32),
    then 1 centre crop or 3 crops along the long side; temporal views evenly spaced, the video padded
    with its last frame. The loader resized to the crop size whatever eval_short_side said, unnoticed:
    every other test leaves eval_short_side at its default, the crop size."""
    root, rows = vp9_dataset
    name, _, n, (w, h) = rows[0]
    assert (n, w, h) == (60, 112, 64)
    t, stride, short = 4, 8, 40
    ld = make_loader(root, False, num_frames=t, stride=stride, eval_short_side=short, temporal_views=2,
                     spatial_crops=3)
    batch = next(iter(ld))
    assert batch.video_id.tolist() == [0] * 6 and batch.video.shape == (6, 3, t, 32, 32)
    # by hand: a clip spans 25 frames, slack 35: views start at 0 and 35; frames resized to 40 x 70
    # (112 * 40 / 64), three 32-px crops along the width at 0, 19 and 38, each 4 rows from the top
    views = [[0, 8, 16, 24], [35, 43, 51, 59]]
    frames = to_rgb(pyav.decode_frames(str(root / name), np.arange(n)), "cpu")
    resized = F.interpolate(frames, size=(40, 70), mode="bilinear", align_corners=False)
    want = [resized[view, :, 4:36, left:left + 32] for left in (0, 19, 38) for view in views]
    for k, clip in enumerate(want):
        clip = ((clip / 255 - MEAN) / STD).permute(1, 0, 2, 3)  # [3, T, 32, 32]
        torch.testing.assert_close(batch.video[k], clip, rtol=0, atol=1e-4, msg=f"clip {k}")


def test_random_resized_crop_falls_back_to_a_crop_centred_in_both_directions():
    """After its attempts miss, the largest crop whose aspect ratio (w/h) lies in the range, centred. The
    old test's frames were wide (a full-height fallback): a top always 0 went unnoticed. A tall frame,
    100 wide: the tallest crop of w/h = 3/4 is round(100 / 0.75) = 133 rows, starting (400 - 133) // 2."""
    rng = np.random.default_rng(0)
    assert sampling.random_resized_crop_box(400, 100, rng, scale=(2, 2)) == (133, 0, 133, 100)
    assert sampling.random_resized_crop_box(150, 100, rng, scale=(2, 2)) == (8, 0, 133, 100)


def test_decoded_rgb_frames_keep_their_channel_order():
    """DALI hands the loader RGB frames [F, H, W, 3]: to_rgb makes them [F, 3, H, W] in the same
    R, G, B order (CLIP's mean and std are per RGB channel). Reversed channels (BGR) went unnoticed
    in the tests run without DALI."""
    frames = torch.tensor([[[[10, 20, 30], [40, 50, 60]]]], dtype=torch.uint8)  # [1, 1, 2, 3]
    rgb = to_rgb(frames, "cpu")
    assert rgb.shape == (1, 3, 1, 2)
    assert rgb[0, :, 0, 0].tolist() == [10, 20, 30] and rgb[0, :, 0, 1].tolist() == [40, 50, 60]


def test_a_list_with_lone_carriage_returns_has_one_entry_per_line(tmp_path):
    """Lines end as text mode splits them: LF, CRLF or a lone CR (old Mac editors). Splitting at LF
    alone read a CR-separated list as one line, 'a.mp4,0<CR>b.mp4' with b's label: a.mp4 lost and b
    mislabelled in the path."""
    f = tmp_path / "l.csv"
    f.write_bytes(b"a.mp4,0\rb.mp4,1\rc.mp4,2\r")
    entries = read_video_list(str(f), "/data", num_classes=3)
    assert [(e.path, e.label, e.line) for e in entries] == [
        ("/data/a.mp4", 0, 1), ("/data/b.mp4", 1, 2), ("/data/c.mp4", 2, 3)]
