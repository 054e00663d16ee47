"""Mixed precision: one name ("bf16", "fp16", "fp32") decides the autocast and the grad scaler."""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from ..choices import PRECISIONS


def check_precision(precision: str, device: Optional[torch.device] = None) -> None:
    """A known precision, and one the device computes in."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" and device is not None and device.type == "cuda":
        check_bf16_gpu(device)


def autocast(device: torch.device, precision: str):
    check_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def check_bf16_gpu(device: torch.device) -> None:
    """bf16 on a GPU without bfloat16 arithmetic (compute capability below 8.0: V100, T4) would be
    emulated, many times slower, where the Triton kernels compile at all: named instead."""
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise ValueError(f"precision bf16 needs a GPU with bfloat16 arithmetic (compute capability 8.0 or later: "
                         f"A100, H100, ...); {torch.cuda.get_device_name(device)} has {major}.{minor}: use fp16 "
                         f"(--precision fp16)")


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A scaler that is active for fp16 only (bf16 and fp32 have the range to go without)."""
    check_precision(precision)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
