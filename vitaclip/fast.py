"""The "fast" backend: a Vita-CLIP layer around the fused Triton prompt attention.

Exactly the reference layer (`vision.reference_block_forward`), computed without the
extended sequence:
  - one fused QKV projection of the frames' own tokens (concatenated weight, cached while
    the frozen q/k/v weights stay unchanged), read by the kernel in place, its gradient
    written back packed;
  - LayerNorm + K/V projection of each distinct prompt once: global prompts once per
    layer, local prompts once per group, summary tokens once per frame;
  - no queries, output projection or MLP for prompt tokens (their outputs are discarded);
  - then out_proj + residual + MLP on the own tokens.
Registered on import; "auto" picks it on CUDA.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import register_backend
from .ops.attention import prompt_attention_qkv, triton_available
from .vision import LayerPrompts, VitaBlock

_CACHE_ATTR = "_fast_qkv_cache"


def fused_qkv_weight(block: VitaBlock) -> Tuple[Tensor, Tensor]:
    """[3C, C] weight and [3C] bias of q/k/v stacked. Cached on the block, keyed on the
    weights' storage and version so any in-place update or move invalidates it; rebuilt
    every call (differentiably) when a q/k/v parameter trains."""
    attn = block.attn
    linears = (attn.q_proj, attn.k_proj, attn.v_proj)
    params = [t for lin in linears for t in (lin.weight, lin.bias)]
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return torch.cat([lin.weight for lin in linears]), torch.cat([lin.bias for lin in linears])
    key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
    cached = getattr(block, _CACHE_ATTR, None)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            weight = torch.cat([lin.weight for lin in linears])
            bias = torch.cat([lin.bias for lin in linears])
        cached = (key, weight, bias)
        object.__setattr__(block, _CACHE_ATTR, cached)  # a plain attribute: not state, not moved
    return cached[1], cached[2]


def _prompt_kv(block: VitaBlock, tokens: Optional[Tensor], kv_weight: Tensor, kv_bias: Tensor
               ) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Keys and values [..., H, Dh] of prompt tokens [..., C] (LayerNorm, then K/V projection)."""
    if tokens is None:
        return None, None
    width = tokens.shape[-1]
    kv = F.linear(block.norm1(tokens), kv_weight, kv_bias)
    kv = kv.view(*tokens.shape[:-1], 2, block.heads, width // block.heads)
    return kv.select(-3, 0), kv.select(-3, 1)


def fast_block_forward(block: VitaBlock, x: Tensor, prompts: LayerPrompts) -> Tensor:
    n_frames, seq, width = x.shape
    heads = block.heads
    weight, bias = fused_qkv_weight(block)
    qkv = F.linear(block.norm1(x), weight, bias).view(n_frames, seq, 3, heads, width // heads)
    kv_weight, kv_bias = weight[width:], bias[width:]
    local_k, local_v = _prompt_kv(block, prompts.local, kv_weight, kv_bias)
    global_k, global_v = _prompt_kv(block, prompts.global_, kv_weight, kv_bias)
    summary_k, summary_v = _prompt_kv(block, prompts.summary, kv_weight, kv_bias)
    attended = prompt_attention_qkv(qkv, local_k, local_v, global_k, global_v, summary_k, summary_v,
                                    prompts.frames_per_group)
    x = x + block.attn.out_proj(attended.view(n_frames, seq, width))
    return x + block.mlp(block.norm2(x))


def fast_available(device: torch.device) -> bool:
    return triton_available() and torch.device(device).type == "cuda"


register_backend("fast", fast_block_forward, fast_available, priority=10)
