"""Which frames and which pixels a clip takes: every random draw of the data pipeline
except RandAugment's (see augment.py). Pure Python/numpy, so every decoder backend
receives the same indices and boxes for the same seed.

Rules follow the public Vita-CLIP/EVL loader:
- train, fixed stride: if the video spans the clip (stride*(T-1)+1 < n) the start is
  uniform in [0, n - stride*(T-1)); otherwise frames 0, stride, 2*stride, ... and every
  index past the end repeats the last index that was still inside the video.
- train, TSN: T segments of (n-1)/T frames; from segment i a uniform frame in
  [round(seg*i), round(seg*(i+1))] (both ends included, Python's round).
- eval: the video is padded with its last frame to span a clip; view i of n starts at
  round(slack * i / (n-1)) (the SPEC's; the public code's slack / (n-1) * i differs from it, by
  float rounding, for 15 views and more only), a single view at slack // 2.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np

from ..choices import DEFAULT_STRIDE


def clip_span(num_frames: int, stride: int) -> int:
    return (num_frames - 1) * stride + 1


def train_frame_indices(video_frames: int, num_frames: int, stride: int,
                        rng: np.random.Generator) -> np.ndarray:
    _check_counts(video_frames, num_frames)
    check_stride(stride)
    if clip_span(num_frames, stride) >= video_frames:
        idx = np.arange(num_frames) * stride
        last_inside = (video_frames - 1) // stride * stride
        return np.minimum(idx, last_inside)
    start = int(rng.integers(video_frames - stride * (num_frames - 1)))
    return start + np.arange(num_frames) * stride


def tsn_frame_indices(video_frames: int, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    _check_counts(video_frames, num_frames)
    seg = (video_frames - 1) / num_frames
    return np.array([int(rng.integers(round(seg * i), round(seg * (i + 1)) + 1))
                     for i in range(num_frames)])


def eval_view_starts(video_frames: int, num_frames: int, stride: int, num_views: int) -> List[int]:
    _check_counts(video_frames, num_frames)
    check_stride(stride)
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    slack = max(video_frames, clip_span(num_frames, stride)) - clip_span(num_frames, stride)
    if num_views == 1:
        return [slack // 2]
    # slack * i first: a quotient rounded first can land just past a half (15 views of slack 29: view 7 at 15)
    return [round(slack * i / (num_views - 1)) for i in range(num_views)]


def eval_frame_indices(video_frames: int, num_frames: int, stride: int, num_views: int) -> np.ndarray:
    """[num_views, num_frames] indices; past-the-end indices read the last frame (padding)."""
    starts = np.array(eval_view_starts(video_frames, num_frames, stride, num_views))
    idx = starts[:, None] + np.arange(num_frames)[None, :] * stride
    return np.minimum(idx, video_frames - 1)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            attempts: int = 10) -> Tuple[int, int, int, int]:
    """(top, left, h, w) of an Inception-style crop: area fraction uniform in `scale`,
    log-uniform aspect ratio; after `attempts` misses, the largest centred crop whose
    aspect ratio lies in `ratio`."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def short_side_resize_shape(height: int, width: int, short_side: int) -> Tuple[int, int]:
    """Output (h, w) with the short side = short_side and the long side scaled, floored."""
    if height < width:
        return short_side, width * short_side // height
    return height * short_side // width, short_side


def eval_crop_offsets(height: int, width: int, size: int, num_crops: int) -> List[Tuple[int, int]]:
    """(top, left) of each square crop: 1 centred, or 3 along the long side (start,
    middle, end); frames must already be resized (see short_side_resize_shape)."""
    if min(height, width) < size:
        raise ValueError(f"frame {height}x{width} smaller than the crop {size}")
    if num_crops == 1:
        return [((height - size) // 2, (width - size) // 2)]
    if num_crops == 3:
        margin = max(height, width) - size
        starts = (0, margin // 2, margin)
        if height > width:
            return [(s, (width - size) // 2) for s in starts]
        return [((height - size) // 2, s) for s in starts]
    raise ValueError(f"num_crops must be 1 or 3, got {num_crops}")


def seed_sequence(*key: int) -> np.random.SeedSequence:
    """numpy's SeedSequence for what `key` names alone: it pads its entropy with zeros, so that (s, e)
    and (s, e, 0) would give one stream (an epoch's order and its first video's clip); the key's
    length, appended, tells them apart."""
    return np.random.SeedSequence([*key, len(key)])


def trained_stride(training_data: Optional[dict]) -> int:
    """The frame stride a model was trained with, from its `training_data` (VideoLoader.description),
    else DEFAULT_STRIDE: scoring samples clips as training did."""
    stride = (training_data or {}).get("stride")
    return stride if isinstance(stride, int) and stride > 0 else DEFAULT_STRIDE


def trained_frames(training_data: Optional[dict], clip_frames: int) -> int:
    """The frames per clip a model was trained on, from its `training_data` (more than its T0
    `clip_frames` where it was trained on longer clips, T0 each group's), else `clip_frames`."""
    frames = (training_data or {}).get("frames")
    return frames if isinstance(frames, int) and frames > 0 else clip_frames


def check_stride(stride: int) -> None:
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


def _check_counts(video_frames: int, num_frames: int) -> None:
    if video_frames < 1:
        raise ValueError(f"video has no frames ({video_frames})")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
