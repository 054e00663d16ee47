"""Plain PyTorch references for the fused ops. They are the oracle of every fast path.

Shapes (F frames, S own tokens per frame = 1 + N, H heads, Dh head dim, C = H * Dh):

prompt_attention: each frame's own queries attend over four key/value sources,
    its own tokens     k, v          [F, S, H, Dh]
    its group's local  local_k/v     [F // frames_per_group, P, H, Dh]  (or None)
    the layer's global global_k/v    [G, H, Dh]                          (or None)
    its summary token  summary_k/v   [F, H, Dh]                          (or None)
  frame f belongs to local group f // frames_per_group. Output [F, S, H, Dh].

summary_tokens: s = c + MHSA(LN(c)) over the frames of each group, c [n_groups, T, C].
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def gather_prompt_kv(
    k: Tensor,
    local_k: Optional[Tensor],
    global_k: Optional[Tensor],
    summary_k: Optional[Tensor],
    frames_per_group: int,
) -> Tensor:
    """Materialise every frame's full key (or value) sequence: [F, S + P + G + 1, H, Dh]."""
    n_frames = k.shape[0]
    parts = [k]
    if local_k is not None:
        parts.append(local_k.repeat_interleave(frames_per_group, dim=0))
    if global_k is not None:
        parts.append(global_k.unsqueeze(0).expand(n_frames, -1, -1, -1))
    if summary_k is not None:
        parts.append(summary_k.unsqueeze(1))
    return torch.cat(parts, dim=1)


def prompt_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    local_k: Optional[Tensor] = None,
    local_v: Optional[Tensor] = None,
    global_k: Optional[Tensor] = None,
    global_v: Optional[Tensor] = None,
    summary_k: Optional[Tensor] = None,
    summary_v: Optional[Tensor] = None,
    frames_per_group: int = 1,
) -> Tensor:
    """Softmax attention of the frames' own queries over own + local + global + summary keys."""
    keys = gather_prompt_kv(k, local_k, global_k, summary_k, frames_per_group)
    values = gather_prompt_kv(v, local_v, global_v, summary_v, frames_per_group)
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("fshd,fkhd->fhsk", q, keys) * scale
    probs = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(dim=-1).to(q.dtype)  # float64 stays
    return torch.einsum("fhsk,fkhd->fshd", probs, values)


def multi_head_self_attention(x: Tensor, q_proj, k_proj, v_proj, out_proj, num_heads: int) -> Tensor:
    """Full (non-causal) multi-head self-attention over dim 1 of x [G, T, C]."""
    g, t, c = x.shape
    def heads(proj):
        return proj(x).view(g, t, num_heads, c // num_heads).transpose(1, 2)
    o = F.scaled_dot_product_attention(heads(q_proj), heads(k_proj), heads(v_proj))
    return out_proj(o.transpose(1, 2).reshape(g, t, c))


def summary_tokens(c: Tensor, norm, attn, num_heads: int) -> Tensor:
    """Summary tokens s = c + MHSA(LN(c)); c [n_groups, T, C], attention within each group."""
    return c + multi_head_self_attention(
        norm(c), attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, num_heads)
