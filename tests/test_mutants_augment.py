"""Behaviour of RandAugment (vitaclip/data/augment.py) and the pixel transforms (vitaclip/data/transforms.py)
that mutation testing found unpinned by the other tests. Each test checks the code against timm's documented
RandAugment semantics, PIL's op definitions or a small computation of its own, never against output copied
from the code."""
import math

import numpy as np
import pytest
import torch

from vitaclip.data.augment import OPS, RandAugment, RandAugmentConfig, apply_op
from vitaclip.data.transforms import MATRICES, resized_crop, to_rgb


def magnitudes(config, clips):
    """The magnitudes of `clips` draws of `config`, all ops of all clips together."""
    ra = RandAugment(config)
    return np.concatenate([ra.sample(np.random.default_rng(s)) for s in range(clips)])[:, 2]


def ramp_frame():
    """One frame [1, 3, 16, 16] holding every level 0..255 once per channel."""
    return torch.arange(256.0).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()


def test_an_mstd_of_exactly_100_is_still_a_normal_std():
    """timm's parser turns mstd into a uniform magnitude only when it is *above* 100 (`if mstd > 100`):
    mstd100 is a (very wide) normal std. A threshold of >= 100 went unnoticed: the tests used 101 and inf."""
    assert RandAugmentConfig.parse("rand-m7-mstd100").magnitude_std == 100.0
    assert RandAugmentConfig.parse("rand-m7-mstd100.5").magnitude_std == math.inf


def test_magnitudes_drawn_below_zero_are_clipped_to_zero():
    """timm clips each drawn magnitude to [0, upper bound] (`max(0., min(magnitude, upper_bound))`). With
    m1 and mstd3, P(N(1, 3) < 0) = Phi(-1/3) = 0.369 of the draws are exactly 0. Only the upper clip was
    checked: magnitudes left negative (ops turned the other way, factors past their range) went unnoticed."""
    m = magnitudes("rand-m1-n4-mstd3", 500)
    assert m.min() == 0.0
    phi = 0.5 * (1 + math.erf(-1 / 3 / math.sqrt(2)))
    assert abs(np.mean(m == 0) - phi) < 0.04, (np.mean(m == 0), phi)


def test_the_default_upper_bound_of_the_magnitude_is_ten():
    """timm's upper bound is _LEVEL_DENOM = 10 unless mmax is given: rand-m15 applies every op at magnitude
    10, rand-m15-mmax12 at 12. A default bound of 9 went unnoticed (m7 with mstd0.5 never reaches it)."""
    assert RandAugmentConfig().magnitude_max == 10
    assert set(magnitudes("rand-m15-n4", 5).tolist()) == {10.0}
    assert set(magnitudes("rand-m15-n4-mmax12", 5).tolist()) == {12.0}


def test_clips_that_draw_the_same_op_in_a_layer_each_get_their_own_magnitude_and_sign():
    """The batch applies one call per op kind and layer, with each clip's magnitude and sign repeated over
    its frames: every clip equals its op applied alone. The existing batch test rarely had two clips draw the
    same op in one layer, so spreading the magnitudes frame-wise across clips (tile, not repeat) passed."""
    t = 3
    clips = torch.stack([torch.full((t, 3, 6, 7), 60.0), torch.full((t, 3, 6, 7), 201.0)])
    clips[:, :, :, :, :3] += 30.0  # not flat: a per-frame factor shows in every frame
    brightness = OPS.index("Brightness")
    params = np.array([[[brightness, 1, 2.0, 1.0]], [[brightness, 1, 9.0, -1.0]]], dtype=np.float32)
    out = RandAugment("rand-m7-n1-inc1")(clips, params)
    for b, (_, _, level, sign) in enumerate(params[:, 0]):
        # inc1 Brightness: factor 1 + sign * level / 10 * 0.9 (timm's _enhance_increasing_level_to_arg)
        factor = 1.0 + sign * level / 10 * 0.9
        want = (clips[b] * factor).clamp(0, 255).floor()
        assert torch.equal(out[b], want), b


def test_inc0_solarize_and_enhance_use_timm_s_non_increasing_arguments():
    """Without inc1 timm's Solarize threshold is int(m / 10 * 256) (m5: 128, levels from 128 up inverted)
    and the enhance factor is m / 10 * 1.8 + 0.1 (m0: 0.1, Brightness keeps a tenth). Only inc0's
    Posterize was tested: a threshold of m / 10 * 255 or a factor without the + 0.1 went unnoticed."""
    x = ramp_frame()
    got = apply_op("Solarize", x, torch.tensor([5.0]), torch.tensor([1.0]), increasing=False)
    assert torch.equal(got, torch.where(x >= 128, 255 - x, x))
    got = apply_op("Brightness", x, torch.tensor([0.0]), torch.tensor([1.0]), increasing=False)
    assert torch.equal(got, torch.div(x, 10, rounding_mode="floor"))


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "Contrast"])
def test_ops_with_image_statistics_use_each_frame_s_own(name):
    """AutoContrast, Equalize and Contrast use each frame's statistics (one PIL frame at a time): frames
    augmented together equal each frame augmented alone. The existing test's two frames were mirror images
    (the same statistics), so statistics taken over all frames of the call went unnoticed."""
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.randint(40, 120, (3, 9, 10), generator=g),
                     torch.randint(0, 256, (3, 9, 10), generator=g)]).float()
    level, sign = torch.tensor([6.0, 6.0]), torch.tensor([-1.0, -1.0])
    together = apply_op(name, x, level, sign)
    for k in range(2):
        assert torch.equal(together[k:k + 1], apply_op(name, x[k:k + 1], level[k:k + 1], sign[k:k + 1])), k


def test_contrast_blends_towards_the_mean_grey_rounded_half_up():
    """PIL's ImageEnhance.Contrast blends towards int(mean + 0.5) of the frame's grey. A grey frame of
    10, 10, 10, 1 has mean 7.75: the degenerate is 8, and inc1 Contrast at m10, sign -1 (factor 0.1) gives
    floor(8 + 0.1 (x - 8)): 8 for 10, 7 for 1. Flooring the mean (7) only moved the real frame's pixels
    by 1 at most, inside the timm comparison's tolerance."""
    x = torch.tensor([[10.0, 10.0], [10.0, 1.0]]).expand(1, 3, 2, 2)
    got = apply_op("Contrast", x, torch.tensor([10.0]), torch.tensor([-1.0]))
    assert torch.equal(got, torch.tensor([[8.0, 8.0], [8.0, 7.0]]).expand(1, 3, 2, 2))


def test_autocontrast_leaves_a_flat_channel_unchanged():
    """PIL's autocontrast keeps a channel whose lowest and highest levels are equal (`if hi <= lo`: the
    identity table) and stretches the others, level x to int((x - lo) * 255 / (hi - lo)). The real frame
    had no flat channel: dividing by hi - lo = 0 (NaN pixels) went unnoticed."""
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = 77.0
    x[0, 1] = torch.tensor([[10.0, 20.0], [30.0, 40.0]])
    x[0, 2] = torch.tensor([[0.0, 5.0], [5.0, 3.0]])
    got = apply_op("AutoContrast", x, torch.tensor([5.0]), torch.tensor([1.0]))
    assert torch.equal(got[0, 0], x[0, 0])
    assert got[0, 1].flatten().tolist() == [0.0, 85.0, 170.0, 255.0]  # (x - 10) * 255 / 30
    assert got[0, 2].flatten().tolist() == [0.0, 255.0, 255.0, 153.0]  # x * 255 / 5


def test_crop_boxes_reaching_the_frames_edges_are_taken_and_boxes_past_them_refused():
    """resized_crop takes any (top, left, h, w) inside [F, C, H, W] (h, w >= 1), the whole frame too, and
    refuses the rest with ValueError. An empty box or a negative left let through (an error from interpolate,
    not ValueError) went unnoticed, as the loader never plans such boxes; a bottom check of >= or a right edge
    checked against the height only failed minutes into the loader's tests. Here on a wide frame, 4 x 6."""
    frames = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    assert torch.equal(resized_crop(frames, (0, 0, 4, 6), (4, 6)), frames)
    assert torch.equal(resized_crop(frames, (1, 2, 3, 4), (3, 4)), frames[..., 1:4, 2:6])
    for box in [(0, 0, 0, 6), (0, 0, 4, 0), (1, 0, 4, 6), (0, 3, 4, 4), (-1, 0, 2, 2), (0, -1, 2, 2)]:
        with pytest.raises(ValueError):
            resized_crop(frames, box, (2, 2))


def test_rgb_frames_of_a_bt709_video_come_back_rounded_to_whole_levels():
    """A decoder's RGB frames (made with BT.601) of a BT.709 video go back to the YCbCr the decoder saw,
    then to RGB with BT.709, rounded and clamped to 0..255 like the Yuv420 path, so both backends give whole
    levels. By hand with the standard equations: Y = Kr R + Kg G + Kb B, Cb = (B - Y) / (2 (1 - Kb)),
    Cr = (R - Y) / (2 (1 - Kr)), and back with the other matrix. Leaving the fractions went unnoticed."""
    pixels = [[200, 30, 40], [10, 220, 90], [60, 70, 250], [128, 128, 128], [255, 0, 0], [3, 250, 251]]
    frames = torch.tensor(pixels, dtype=torch.uint8).view(1, 2, 3, 3)  # [F, H, W, 3]
    got = to_rgb(frames, "cpu", "bt709")
    rgb = torch.tensor(pixels, dtype=torch.float64)
    kr, kb = MATRICES["bt601"]
    y = kr * rgb[:, 0] + (1 - kr - kb) * rgb[:, 1] + kb * rgb[:, 2]
    cb, cr = (rgb[:, 2] - y) / (2 * (1 - kb)), (rgb[:, 0] - y) / (2 * (1 - kr))
    kr, kb = MATRICES["bt709"]
    r, b = y + 2 * (1 - kr) * cr, y + 2 * (1 - kb) * cb
    g = (y - kr * r - kb * b) / (1 - kr - kb)
    want = torch.stack([r, g, b], 1).round().clamp(0, 255).float()  # [6, 3]
    assert torch.equal(got.permute(0, 2, 3, 1).reshape(6, 3), want)
