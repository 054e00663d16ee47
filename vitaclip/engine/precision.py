"""Mixed precision: one name ("bf16", "fp16", "fp32") decides the autocast and the grad scaler."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("bf16", "fp16", "fp32")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast(device: torch.device, precision: str):
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A scaler that is active for fp16 only (bf16 and fp32 have the range to go without)."""
    check_precision(precision)
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
