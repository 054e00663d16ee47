"""Pixel transforms on tensors (any device): colour conversion, crops, resizes, flip,
normalisation. The plan (which box, flip or not) comes from sampling.py; these only apply it.
Resizes are bilinear without antialiasing and without rounding, as the public code did."""
from __future__ import annotations

import functools
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


# The luma weights (Kr, Kb) of the YCbCr matrices a video can be tagged with: BT.601 for SD and
# untagged video (what FFmpeg and DALI assume), BT.709 for HD, BT.2020 for UHD/HDR.
MATRICES = {"bt601": (0.299, 0.114), "bt709": (0.2126, 0.0722), "bt2020": (0.2627, 0.0593)}
DECODER_MATRIX = "bt601"  # the matrix DALI's decoders convert every video with


@functools.lru_cache(maxsize=None)
def ycbcr_to_rgb(matrix: str) -> Tuple[Tuple[float, ...], ...]:
    """3 x 3: (R, G, B) from (Y, Cb, Cr), all on the same 0..255 scale (Cb, Cr centred on 0). Plain
    numbers, so that converting a clip on the GPU copies no tensor to it."""
    kr, kb = MATRICES[matrix]
    kg = 1.0 - kr - kb
    return ((1.0, 0.0, 2 * (1 - kr)),
            (1.0, -2 * kb * (1 - kb) / kg, -2 * kr * (1 - kr) / kg),
            (1.0, 2 * (1 - kb), 0.0))


@functools.lru_cache(maxsize=None)
def _decoder_rgb_to_rgb(matrix: str) -> Tuple[Tuple[float, ...], ...]:
    """3 x 3: RGB as `matrix` makes it from RGB as DECODER_MATRIX made it (the same YCbCr)."""
    fix = torch.tensor(ycbcr_to_rgb(matrix), dtype=torch.float64) @ torch.linalg.inv(
        torch.tensor(ycbcr_to_rgb(DECODER_MATRIX), dtype=torch.float64))
    return tuple(tuple(row) for row in fix.tolist())


def _mix(rows: Tuple[Tuple[float, ...], ...], channels: torch.Tensor) -> torch.Tensor:
    """[F, 3, H, W]: each output channel the `rows`-weighted sum of the 3 input channels (dim 1)."""
    return torch.cat([sum(w * channels[:, j:j + 1] for j, w in enumerate(row) if w) for row in rows], 1)


def to_rgb(frames, device, matrix: str = DECODER_MATRIX) -> torch.Tensor:
    """Decoded frames (RGB uint8 [F, H, W, 3] converted with DECODER_MATRIX, or Yuv420) of a video
    coded with the YCbCr `matrix` -> float [F, 3, H, W] in 0..255. RGB frames are converted back
    and again: what the decoder clipped stays clipped (the most saturated colours of BT.709 video
    leave BT.601's 0..255), a few levels on natural colours."""
    if isinstance(frames, Yuv420):
        return yuv420_to_rgb(*(p.to(device, non_blocking=True) for p in frames), matrix=matrix)
    rgb = frames.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    if matrix == DECODER_MATRIX:
        return rgb
    # back to YCbCr as the decoder's matrix made it, then to RGB with the video's own
    return _mix(_decoder_rgb_to_rgb(matrix), rgb).round().clamp(0, 255)


def frame_size(frames) -> Tuple[int, int]:
    """(height, width) of decoded frames (RGB uint8 [F, H, W, 3] or Yuv420)."""
    return tuple(frames.y.shape[-2:]) if isinstance(frames, Yuv420) else tuple(frames.shape[1:3])


def yuv420_to_rgb(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, matrix: str = DECODER_MATRIX) -> torch.Tensor:
    """Limited range with the YCbCr `matrix` (MATRICES), bilinear, centre-sited chroma upsampling
    (for odd sizes the chroma planes are stretched over the frame, which FFmpeg's conversion matches
    where centre siting per 2x2 block does not), rounded: for BT.601 the conversion DALI's decoder
    applies, so both backends give the same pixels."""
    h, w = y.shape[-2:]
    chroma = torch.stack([u, v], 1).float() - 128.0  # [F, 2, h/2, w/2]
    chroma = F.interpolate(chroma, size=(h, w), mode="bilinear", align_corners=False)
    luma = (y.float().unsqueeze(1) - 16.0) * (255.0 / 219.0)
    return _mix(ycbcr_to_rgb(matrix), torch.cat([luma, chroma * (255.0 / 224.0)], 1)).round().clamp(0, 255)


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
