"""Prompt attention for one query per frame: the class token's, in the last layer.

After the last layer only the class tokens are read (SPEC: frame feature = ln_post(x_cls) @ proj),
so that layer needs the class token's query alone. With one query row the fused kernel's tiles
would be almost empty; here each key/value source is read where it lies, as in the kernel (the
shared local and global prompts are not copied per frame): scores per source, one softmax over
all of them, the weighted sums of the values per source. Plain PyTorch: under torch.compile the
products and sums fuse into reductions over the keys. Same shapes and meaning as
`naive.prompt_attention` with q [F, H, Dh] for [F, 1, H, Dh]; computed in at least fp32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor


PROMPT_NAMES = ("local_k", "local_v", "global_k", "global_v", "summary_k", "summary_v")


def _check_prompt_shapes(prompts, n_groups: int, n_frames: int, heads: int, dim: int) -> None:
    """Each pair of prompt keys and values both given or both None, of the shapes that
    `naive.prompt_attention` takes: the products below would broadcast others silently."""
    for name, (pk, pv) in zip(("local", "global", "summary"), (prompts[0:2], prompts[2:4], prompts[4:6])):
        if (pk is None) != (pv is None):
            raise ValueError(f"class_token_attention: {name}_k and {name}_v must both be given or both be None")
        if pk is None:
            continue
        want = {"local": (n_groups, pk.shape[1] if pk.dim() == 4 else -1, heads, dim),
                "global": (pk.shape[0] if pk.dim() == 3 else -1, heads, dim),
                "summary": (n_frames, heads, dim)}[name]
        if tuple(pk.shape) != want or pv.shape != pk.shape:
            raise ValueError(f"class_token_attention: {name}_k/v must be {want}, got {tuple(pk.shape)} and "
                             f"{tuple(pv.shape)}")


def class_token_attention(q: Tensor, k: Tensor, v: Tensor, prompts: Sequence[Optional[Tensor]] = (None,) * 6,
                          frames_per_group: int = 1) -> Tensor:
    """q [F, H, Dh]; k, v [F, S, H, Dh]; prompts: the keys and values named PROMPT_NAMES, each as
    `naive.prompt_attention` takes it or None. Output [F, H, Dh]."""
    local_k, local_v, global_k, global_v, summary_k, summary_v = prompts
    n_frames, heads, dim = q.shape
    if k.shape[0] != n_frames or k.shape[2:] != q.shape[1:] or v.shape != k.shape:
        raise ValueError(f"class_token_attention: q {tuple(q.shape)} needs k and v [F, S, H, Dh] of its F, H "
                         f"and Dh, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not isinstance(frames_per_group, int) or frames_per_group < 1:  # (as prompt_attention: 0 divided by zero)
        raise ValueError(f"class_token_attention: frames_per_group must be a positive int, got {frames_per_group!r}")
    if local_k is not None and n_frames % frames_per_group:
        raise ValueError(f"class_token_attention: {n_frames} frames are not groups of {frames_per_group}")
    _check_prompt_shapes(prompts, n_frames // frames_per_group, n_frames, heads, dim)
    wide = torch.promote_types(q.dtype, torch.float32)
    groups = n_frames // frames_per_group
    with torch.autocast(q.device.type, enabled=False):
        query = q.to(wide) * dim ** -0.5

        # each source: (its scores [F, K, H], and a map from its probabilities [F, K, H] to [F, H, Dh])
        def own(probs):
            return (probs.unsqueeze(-1) * v).sum(1)

        def local(probs):
            grouped = probs.view(groups, frames_per_group, -1, heads, 1)
            return (grouped * local_v.unsqueeze(1)).sum(2).view(n_frames, heads, dim)

        def global_(probs):
            return (probs.unsqueeze(-1) * global_v).sum(1)

        def summary(probs):
            return probs[:, 0, :, None] * summary_v

        sources = [((query.unsqueeze(1) * k).sum(-1), own)]
        if local_k is not None:
            grouped = query.view(groups, frames_per_group, 1, heads, dim)
            sources.append(((grouped * local_k.unsqueeze(1)).sum(-1).flatten(0, 1), local))
        if global_k is not None:
            sources.append(((query.unsqueeze(1) * global_k).sum(-1), global_))
        if summary_k is not None:
            sources.append(((query * summary_k).sum(-1).unsqueeze(1), summary))
        scores = torch.cat([s for s, _ in sources], dim=1)
        probs = scores.softmax(dim=1).split([s.shape[1] for s, _ in sources], dim=1)
        out = sum(weigh(p) for p, (_, weigh) in zip(probs, sources))
    return out.to(q.dtype)
