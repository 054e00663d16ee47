"""The per-layer summary step: s = c + MHSA(LN(c)) over the frames of each clip group.

The model always calls `summary_tokens` here; it is the single switch between the compiled
C++/CUDA op (`summary_ext`, sources in csrc/) and the plain PyTorch path in `naive.py`.
The compiled op runs whenever it is built, unless the environment sets VITACLIP_DISABLE_EXT=1
(read at every call, so it can be flipped at run time; a layer under torch.compile, as in the
"fast-compiled" and "fast-graphed" backends, reads it when compiled: flip it before the first
call, or call torch._dynamo.reset() after).
"""
from __future__ import annotations

import os

from torch import Tensor

from . import naive, summary_ext

DISABLE_ENV = "VITACLIP_DISABLE_EXT"


def extension_available() -> bool:
    """Whether the compiled summary op is built and switched on (i.e. what `summary_tokens` runs)."""
    return summary_ext.is_built() and os.environ.get(DISABLE_ENV, "0") != "1"


def summary_tokens(c: Tensor, norm, attn, num_heads: int) -> Tensor:
    """Summary tokens s = c + MHSA(LN(c)); c [n_groups, T, C], attention within each group.

    norm: nn.LayerNorm; attn: a module with q_proj, k_proj, v_proj, out_proj (nn.Linear).
    """
    if c.dim() != 3 or c.shape[-1] % num_heads != 0:
        raise ValueError(f"summary_tokens: c must be [n_groups, T, C] with C divisible by num_heads "
                         f"{num_heads}, got shape {tuple(c.shape)}")
    if (extension_available() and summary_ext.runs_on(c.device) and summary_ext.shared_memory_fits(c, num_heads)
            and summary_ext.takes(norm, attn)):
        return summary_ext.summary_tokens(c, norm, attn, num_heads)
    return naive.summary_tokens(c, norm, attn, num_heads)
