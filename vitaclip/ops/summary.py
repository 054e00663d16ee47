"""The per-layer summary step: s = c + MHSA(LN(c)) over the frames of each clip group.

The model always calls `summary_tokens` here; it is the single switch between the
C++/CUDA extension (issue: csrc/) and the plain PyTorch path in `naive.py`.
"""
from __future__ import annotations

from torch import Tensor

from . import naive


def extension_available() -> bool:
    """Whether the compiled summary op is built and switched on."""
    return False


def summary_tokens(c: Tensor, norm, attn, num_heads: int) -> Tensor:
    return naive.summary_tokens(c, norm, attn, num_heads)
