"""RandAugment for video clips, batched on tensors (any device).

Semantics of timm's config strings (`rand-m7-n4-mstd0.5-inc1`): n ops drawn uniformly
with replacement from the 15-op list (the "increasing" variants with inc1), each applied
with probability p (0.5), at a magnitude drawn from N(m, mstd) clipped to [0, mmax]
(default 10; uniform in [0, m] with mstd above 100 or inf), with a random sign for signed ops. As in the public video code, one draw is
shared by every frame of a clip; AutoContrast, Equalize and Contrast use each frame's own
statistics (they ran per PIL frame there). Pixels are float in [0, 255] and are rounded
and clamped after every op, as the uint8 PIL pipeline did.

The draws (`RandAugment.sample`) are numpy, made with the plan of the clip, so they do not
depend on the decoding backend; `RandAugment.__call__` applies a batch of them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .transforms import to_device

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
# inc1 swaps these for their "increasing" variants (stronger with magnitude)
_INCREASING = {"Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}
FILL = 128.0  # grey fill of geometric ops (timm's default img_mean)


@dataclass(frozen=True)
class RandAugmentConfig:
    magnitude: float = 10.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False
    prob: float = 0.5

    @classmethod
    def parse(cls, config: str) -> "RandAugmentConfig":
        """Parse `rand-m7-n4-mstd0.5-inc1` (keys m, n, mstd, mmax, inc, p)."""
        sections = config.split("-")
        if sections[0] != "rand":
            raise ValueError(f"RandAugment config must start with 'rand': {config!r}")
        kwargs = {}
        names = {"m": "magnitude", "n": "num_ops", "mstd": "magnitude_std",
                 "mmax": "magnitude_max", "inc": "increasing", "p": "prob"}
        for section in sections[1:]:
            match = re.fullmatch(r"([a-z]+)(\d+(?:\.\d+)?|inf)", section)
            if not match or match.group(1) not in names:
                raise ValueError(f"unknown RandAugment section {section!r} in {config!r}")
            key, value = match.groups()
            value = float(value)
            if key == "mstd" and value > 100:  # timm's spelling of a uniform magnitude in [0, m]
                value = math.inf
            kwargs[names[key]] = bool(value) if key == "inc" else int(value) if key == "n" else value
        return cls(**kwargs)


class RandAugment:
    def __init__(self, config):
        self.config = RandAugmentConfig.parse(config) if isinstance(config, str) else config

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """[num_ops, 4] float32 rows (op index into OPS, applied 0/1, magnitude, sign +-1)."""
        cfg = self.config
        rows = np.zeros((cfg.num_ops, 4), dtype=np.float32)
        for row in rows:
            row[0] = rng.integers(len(OPS))
            row[1] = rng.random() < cfg.prob
            magnitude = cfg.magnitude
            if cfg.magnitude_std == math.inf:
                magnitude = rng.uniform(0, magnitude)
            elif cfg.magnitude_std > 0:
                magnitude = rng.normal(magnitude, cfg.magnitude_std)
            row[2] = min(max(magnitude, 0.0), cfg.magnitude_max)
            row[3] = -1.0 if rng.random() < 0.5 else 1.0
        return rows

    def __call__(self, clips: torch.Tensor, params) -> torch.Tensor:
        """clips [B, T, 3, H, W] float in [0, 255]; params [B, num_ops, 4] from `sample`."""
        params = np.asarray(params, dtype=np.float32)
        t = clips.shape[1]
        out = clips.clone()
        # the choices are made on the host and go to the device as queued copies from pinned
        # memory: the host never waits for the GPU in this loop
        for layer in range(params.shape[1]):
            p = params[:, layer]
            # one call per op kind present in this layer, over all clips that drew it
            for op_index in np.unique(p[p[:, 1] > 0, 0]):
                sel = np.flatnonzero((p[:, 0] == op_index) & (p[:, 1] > 0))
                level, sign = (to_device(np.repeat(p[sel, k], t), out.device) for k in (2, 3))
                sel = to_device(sel, out.device)
                frames = out[sel].flatten(0, 1)
                result = apply_op(OPS[int(op_index)], frames, level, sign, self.config.increasing)
                out[sel] = result.view(len(sel), t, *frames.shape[1:])
        return out


def apply_op(name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor,
             increasing: bool = True) -> torch.Tensor:
    """One RandAugment op on frames x [N, 3, H, W] (float, 0..255) with per-frame magnitude
    `level` (0..10, up to mmax) and `sign` (+-1). Returns rounded, clamped floats."""
    frac = (level / 10.0).view(-1, 1, 1, 1)
    signed = frac * sign.view(-1, 1, 1, 1)
    if name == "AutoContrast":
        y = _auto_contrast(x)
    elif name == "Equalize":
        y = _equalize(x)
    elif name == "Invert":
        y = 255.0 - x
    elif name == "Posterize":
        bits = 4 - (frac * 4).floor() if increasing else (frac * 4).floor()
        y = _posterize(x, bits)
    elif name == "Solarize":
        threshold = 256 - (frac * 256).floor() if increasing else (frac * 256).floor()
        y = torch.where(x >= threshold, 255.0 - x, x)
    elif name == "SolarizeAdd":
        # (the caps below, at most 128 added and an enhance factor of at least 0.1, act only above
        # level 10, with mmax > 10: as timm's)
        y = torch.where(x < 128, (x + (frac * 110).floor().clamp(max=128)).clamp(max=255), x)
    elif name in ("Color", "Contrast", "Brightness", "Sharpness"):
        factor = (1.0 + signed * 0.9).clamp(min=0.1) if increasing else frac * 1.8 + 0.1
        y = _enhance(name, x, factor)
    elif name == "Rotate":
        y = _rotate(x, (signed * 30.0).flatten())
    elif name in ("ShearX", "ShearY"):
        y = _shear_or_translate(name, x, (signed * 0.3).flatten())
    elif name in ("TranslateXRel", "TranslateYRel"):
        y = _shear_or_translate(name, x, (signed * 0.45).flatten())
    else:
        raise ValueError(f"unknown RandAugment op {name!r}")
    return y.round().clamp(0, 255)


def grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma, as PIL's convert('L'), [N, 1, H, W]."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * 0.299 + g * 0.587 + b * 0.114).round()


def _enhance(name, x, factor):
    if name == "Brightness":
        degenerate = torch.zeros_like(x)
    elif name == "Color":
        degenerate = grey(x).expand_as(x)
    elif name == "Contrast":
        degenerate = (grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor().expand_as(x)
    else:  # Sharpness: PIL's SMOOTH filter, border pixels kept
        kernel = to_device([[1.0, 1, 1], [1, 5, 1], [1, 1, 1]], x.device, x.dtype) / 13
        smooth = F.conv2d(x.reshape(-1, 1, *x.shape[2:]), kernel.view(1, 1, 3, 3)).round()
        degenerate = x.clone()
        degenerate[:, :, 1:-1, 1:-1] = smooth.view(x.shape[0], x.shape[1], *smooth.shape[2:])
    return (degenerate + factor * (x - degenerate)).clamp(0, 255).floor()


def _auto_contrast(x):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi <= lo
    scale = 255.0 / torch.where(flat, torch.ones_like(hi), hi - lo)
    return torch.where(flat, x, ((x - lo) * scale).floor())


def _equalize(x):
    """PIL's ImageOps.equalize per frame and channel, via batched histograms."""
    n, c = x.shape[:2]
    values = x.round().clamp(0, 255).long().flatten(2)  # [N, C, HW]
    hist = torch.zeros(n, c, 256, device=x.device, dtype=torch.long)
    hist.scatter_add_(2, values, torch.ones_like(values))
    last_nonzero = 255 - torch.flip(hist > 0, dims=[2]).long().argmax(dim=2, keepdim=True)
    total = hist.sum(dim=2, keepdim=True)
    step = (total - hist.gather(2, last_nonzero)) // 255
    cumulative = hist.cumsum(dim=2) - hist  # exclusive
    lut = ((step // 2 + cumulative) // step.clamp(min=1)).clamp(max=255)
    identity = (step == 0) | ((hist > 0).sum(dim=2, keepdim=True) <= 1)
    lut = torch.where(identity, torch.arange(256, device=x.device).expand_as(lut), lut)
    return lut.gather(2, values).view_as(x).to(x.dtype)


def _posterize(x, bits):
    drop = (2.0 ** (8 - bits)).clamp(max=256)
    return (x / drop).floor() * drop


def _rotate(x, degrees):
    a = -torch.deg2rad(degrees)
    cos, sin = torch.cos(a), torch.sin(a)
    h, w = x.shape[2:]
    cx, cy = w / 2.0, h / 2.0
    # input = R (p - c) + c, the inverse map PIL's rotate samples with
    matrix = torch.stack([
        torch.stack([cos, sin, cx - cos * cx - sin * cy], -1),
        torch.stack([-sin, cos, cy + sin * cx - cos * cy], -1)], 1)
    return _warp(x, matrix)


def _shear_or_translate(name, x, v):
    h, w = x.shape[2:]
    one, zero = torch.ones_like(v), torch.zeros_like(v)
    rows = {
        "ShearX": ([one, v, zero], [zero, one, zero]),
        "ShearY": ([one, zero, zero], [v, one, zero]),
        "TranslateXRel": ([one, zero, v * w], [zero, one, zero]),
        "TranslateYRel": ([one, zero, zero], [zero, one, v * h]),
    }[name]
    matrix = torch.stack([torch.stack(rows[0], -1), torch.stack(rows[1], -1)], 1)
    return _warp(x, matrix)


def _warp(x, matrix):
    """Sample x at matrix @ (output pixel centre), pixel units (PIL's affine convention),
    bicubic, grey outside. As PIL, a point inside reads the frame alone: its taps past the edge
    read the edge pixels (taps reading the fill left a grey seam along the frame's edges)."""
    n, _, h, w = x.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device, dtype=x.dtype) + 0.5,
                            torch.arange(w, device=x.device, dtype=x.dtype) + 0.5, indexing="ij")
    centres = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, -1, 3)
    src = centres @ matrix.to(x.dtype).transpose(1, 2)  # [N, HW, 2] in pixels
    grid = src / to_device([w, h], x.device, x.dtype) * 2 - 1
    inside = ((grid.abs() <= 1).all(-1)).view(n, 1, h, w)
    sampled = F.grid_sample(x, grid.view(n, h, w, 2), mode="bicubic", padding_mode="border", align_corners=False)
    return torch.where(inside, sampled, torch.full_like(sampled, FILL)).clamp(0, 255)
