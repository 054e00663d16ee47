"""Pixel transforms on tensors (any device): colour conversion, crops, resizes, flip,
normalisation. The plan (which box, flip or not) comes from sampling.py; these only apply it.
Resizes are bilinear without antialiasing and without rounding, as the public code did."""
from __future__ import annotations

from typing import NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class Yuv420(NamedTuple):
    """Planar 4:2:0 frames: y [F, H, W], u and v [F, ceil(H/2), ceil(W/2)], uint8."""
    y: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor


def to_device(values, device, dtype=None) -> torch.Tensor:
    """Host values (list, numpy) as a tensor on `device` without waiting for the GPU: a CUDA
    copy from pageable memory first synchronises the stream, one from pinned memory queues."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def to_rgb(frames, device) -> torch.Tensor:
    """Decoded frames (RGB uint8 [F, H, W, 3] or Yuv420) -> float [F, 3, H, W] in 0..255."""
    if isinstance(frames, Yuv420):
        return yuv420_to_rgb(*(p.to(device, non_blocking=True) for p in frames))
    return frames.to(device, non_blocking=True).permute(0, 3, 1, 2).float()


def frame_size(frames) -> Tuple[int, int]:
    """(height, width) of decoded frames (RGB uint8 [F, H, W, 3] or Yuv420)."""
    return tuple(frames.y.shape[-2:]) if isinstance(frames, Yuv420) else tuple(frames.shape[1:3])


def yuv420_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """BT.601 limited range with bilinear, centre-sited chroma upsampling, rounded: the
    conversion DALI's decoder applies, so both backends give the same pixels."""
    h, w = y.shape[-2:]
    chroma = torch.stack([u, v], 1).float() - 128.0  # [F, 2, h/2, w/2]
    chroma = F.interpolate(chroma, size=(h, w), mode="bilinear", align_corners=False)
    luma = (y.float().unsqueeze(1) - 16.0) * (255.0 / 219.0)
    cu, cv = chroma[:, 0:1] * (255.0 / 224.0), chroma[:, 1:2] * (255.0 / 224.0)
    rgb = torch.cat([luma + 1.402 * cv,
                     luma - 0.344136 * cu - 0.714136 * cv,
                     luma + 1.772 * cu], 1)
    return rgb.round().clamp(0, 255)


def resized_crop(frames: torch.Tensor, box: Sequence[int], size: Tuple[int, int]) -> torch.Tensor:
    """Crop (top, left, h, w) of [F, C, H, W], then resize to size (h, w)."""
    top, left, h, w = (int(v) for v in box)
    if top < 0 or left < 0 or h < 1 or w < 1 or top + h > frames.shape[-2] or left + w > frames.shape[-1]:
        raise ValueError(f"crop box {tuple(box)} outside frames of size {tuple(frames.shape[-2:])}")
    return resize(frames[..., top:top + h, left:left + w], size)


def resize(frames: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    return F.interpolate(frames, size=tuple(size), mode="bilinear", align_corners=False)


def normalize(clips: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, channel_dim: int = 1) -> torch.Tensor:
    """(x / 255 - mean) / std on 0..255 pixels, channels at channel_dim."""
    shape = [1] * clips.dim()
    shape[channel_dim] = 3
    mean = to_device(mean, clips.device, torch.float32).view(shape)
    std = to_device(std, clips.device, torch.float32).view(shape)
    return (clips.float() / 255.0 - mean) / std
