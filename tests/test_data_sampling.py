import numpy as np
import pytest

from vitaclip.data import sampling


def rng(seed=0):
    return np.random.default_rng(seed)


def test_train_indices_random_start_fixed_stride():
    starts = set()
    for seed in range(200):
        idx = sampling.train_frame_indices(300, 8, 16, rng(seed))
        assert np.all(np.diff(idx) == 16)
        assert 0 <= idx[0] and idx[-1] < 300
        starts.add(int(idx[0]))
    # start uniform over [0, 300 - 16*7) = [0, 188): both ends reachable in principle, spread wide
    assert max(starts) <= 187 and min(starts) < 20 and max(starts) > 160


def test_train_indices_short_video_repeats_last_inside():
    # span 113 >= 50: 0, 16, 32, 48, then 48 repeated
    assert sampling.train_frame_indices(50, 8, 16, rng()).tolist() == [0, 16, 32, 48, 48, 48, 48, 48]
    # exactly the span: still the deterministic branch (">=" in the public code)
    assert sampling.train_frame_indices(113, 8, 16, rng()).tolist() == list(range(0, 113, 16))
    assert sampling.train_frame_indices(1, 8, 16, rng()).tolist() == [0] * 8


def test_train_indices_one_past_span_can_start_at_one():
    starts = {int(sampling.train_frame_indices(114, 8, 16, rng(s))[0]) for s in range(50)}
    assert starts == {0, 1}  # start uniform in [0, 114 - 16*7)


def test_tsn_one_frame_per_segment():
    n, t = 101, 8
    seg = (n - 1) / t
    seen = [set() for _ in range(t)]
    for seed in range(300):
        idx = sampling.tsn_frame_indices(n, t, rng(seed))
        for i, v in enumerate(idx):
            assert round(seg * i) <= v <= round(seg * (i + 1))
            seen[i].add(int(v))
    # both segment ends are drawn (inclusive upper end, as the public code)
    assert all(round(seg * i) in s and round(seg * (i + 1)) in s for i, s in enumerate(seen))


def test_tsn_short_video():
    idx = sampling.tsn_frame_indices(3, 8, rng())
    assert idx.min() >= 0 and idx.max() <= 2 and np.all(np.diff(idx) >= 0)


@pytest.mark.parametrize("n,views,expected", [
    (300, 3, [0, 94, 187]),        # slack 187: round(93.5) = 94 (Python rounds half to even)
    (300, 4, [0, 62, 125, 187]),
    (300, 1, [93]),                # single view: slack // 2
    (50, 3, [0, 0, 0]),            # shorter than a clip: padded, no slack
    (114, 2, [0, 1]),
])
def test_eval_view_starts(n, views, expected):
    assert sampling.eval_view_starts(n, 8, 16, views) == expected


def test_eval_indices_pad_with_last_frame():
    idx = sampling.eval_frame_indices(50, 8, 16, 2)
    assert idx.tolist() == [[0, 16, 32, 48, 49, 49, 49, 49]] * 2
    idx = sampling.eval_frame_indices(300, 8, 16, 3)
    assert idx[2].tolist() == list(range(187, 300, 16))


def test_eval_crops_positions():
    assert sampling.short_side_resize_shape(256, 340, 224) == (224, 297)
    assert sampling.short_side_resize_shape(340, 256, 224) == (297, 224)
    assert sampling.eval_crop_offsets(224, 297, 224, 1) == [(0, 36)]
    assert sampling.eval_crop_offsets(224, 297, 224, 3) == [(0, 0), (0, 36), (0, 73)]
    assert sampling.eval_crop_offsets(297, 224, 224, 3) == [(0, 0), (36, 0), (73, 0)]
    assert sampling.eval_crop_offsets(250, 250, 224, 1) == [(13, 13)]
    # a square frame's three crops run along its width, as the public code's else branch
    assert sampling.eval_crop_offsets(256, 256, 224, 3) == [(16, 0), (16, 16), (16, 32)]
    with pytest.raises(ValueError, match="1 or 3"):
        sampling.eval_crop_offsets(224, 297, 224, 2)
    with pytest.raises(ValueError, match="smaller"):
        sampling.eval_crop_offsets(200, 297, 224, 1)


def test_random_resized_crop_box_stays_inside_and_follows_ranges():
    areas, ratios = [], []
    for seed in range(500):
        top, left, h, w = sampling.random_resized_crop_box(256, 340, rng(seed))
        assert 0 <= top and top + h <= 256 and 0 <= left and left + w <= 340 and h > 0 and w > 0
        areas.append(h * w / (256 * 340))
        ratios.append(w / h)
    assert 0.07 < min(areas) and max(areas) <= 1.0 and np.mean(areas) > 0.3
    inside = [r for r, a in zip(ratios, areas) if a < 0.9]
    assert min(inside) > 0.74 and max(inside) < 1.35


def test_random_resized_crop_aspect_is_log_uniform_in_the_asked_orientation():
    logs = np.array([np.log(w / h) for _, _, h, w in
                     (sampling.random_resized_crop_box(1000, 1000, rng(s), scale=(0.1, 0.2)) for s in range(4000))])
    # log-uniform over (3/4, 4/3): mean 0, half the crops taller than wide (uniform in w/h: about 43%)
    assert abs(logs.mean()) < 0.01 and abs((logs < 0).mean() - 0.5) < 0.03
    for s in range(200):  # an asymmetric range keeps its orientation: w/h, not h/w
        _, _, h, w = sampling.random_resized_crop_box(400, 400, rng(s), scale=(0.1, 0.1), ratio=(1.5, 2.0))
        assert 1.4 < w / h < 2.1


def test_random_resized_crop_offsets_reach_both_edges():
    boxes = [sampling.random_resized_crop_box(4, 4, rng(s), scale=(0.25, 0.25), ratio=(1, 1)) for s in range(200)]
    assert {b[0] for b in boxes} == {0, 1, 2} and {b[1] for b in boxes} == {0, 1, 2}


def test_random_resized_crop_fallback_is_centred():
    # scale > 1 can never fit: fallback to the largest centred crop of allowed aspect
    assert sampling.random_resized_crop_box(100, 400, rng(), scale=(2, 2)) == (0, 133, 100, 133)
    assert sampling.random_resized_crop_box(100, 120, rng(), scale=(2, 2)) == (0, 0, 100, 120)


def test_bad_counts():
    with pytest.raises(ValueError, match="no frames"):
        sampling.train_frame_indices(0, 8, 16, rng())
    with pytest.raises(ValueError, match="stride"):
        sampling.train_frame_indices(10, 8, 0, rng())
    with pytest.raises(ValueError, match="num_views"):
        sampling.eval_view_starts(10, 8, 16, 0)
    for stride in (0, -1):  # one frame repeated, or frames backwards
        with pytest.raises(ValueError, match="stride must be >= 1"):
            sampling.eval_frame_indices(64, 8, stride, 2)


@pytest.mark.parametrize("bad, match", [(dict(stride=0), "stride must be >= 1"),
                                        (dict(num_frames=0), "num_frames must be >= 1")])
def test_the_loader_refuses_bad_sampling_before_reading_its_list(tmp_path, bad, match):
    from vitaclip.data import VideoLoader

    with pytest.raises(ValueError, match=match):  # the list does not even exist
        VideoLoader(str(tmp_path / "missing.csv"), train=False, batch_size=1, **bad)


def test_random_streams_of_a_key_and_of_its_extension_by_zero_differ():
    """numpy pads a SeedSequence's entropy with zeros, so (seed, epoch) and (seed, epoch, 0) would give one
    stream: an epoch's order and its first video's clip, or a rank-0 loader's workers."""
    from vitaclip.data.sampling import seed_sequence
    from vitaclip.engine.loader import derived_seed

    assert np.random.SeedSequence([3, 1]).generate_state(2).tolist() == \
        np.random.SeedSequence([3, 1, 0]).generate_state(2).tolist()  # numpy's rule, guarded against here
    keys = [(3,), (3, 0), (3, 0, 0), (3, 1), (3, 1, 0), (3, 1, 0, 0)]
    assert len({tuple(seed_sequence(*key).generate_state(2).tolist()) for key in keys}) == len(keys)
    assert len({derived_seed(*key) for key in keys}) == len(keys)
