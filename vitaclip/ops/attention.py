"""Prompt attention: the fused Triton op (forward + backward) behind the naive reference's signature.

`prompt_attention` runs the Triton kernels of `vitaclip.kernels.prompt_attention` on CUDA
tensors, and on CPU tensors when TRITON_INTERPRET=1 (tests); otherwise it falls back to
the plain PyTorch reference in `naive.py`.

`prompt_attention_qkv` takes q, k, v packed as one [F, S, 3, H, Dh] (the fast model path).

Tile sizes per kernel come from `attention_tiles` (GPU default per head dim, `use_tiles` to override).

The kernels are wrapped as two custom ops, `vitaclip::prompt_attention` and
`vitaclip::prompt_attention_backward`, so torch.compile sees one opaque node each and
traces without graph breaks. Absent prompt kinds are `Tensor?` (None) in the schema;
the backward op returns empty tensors for their gradients, mapped back to None.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional

import torch
from torch import Tensor

from ..switches import env_choice
from . import naive
from .attention_tiles import AttentionTiles, KernelTiles, tiles_for

try:
    import triton
except ImportError:  # no Triton on this platform: only the reference path is available
    triton = None
    _kernels = None
else:  # with Triton, kernels that fail to import are a broken install, not a reason to run slowly
    from vitaclip.kernels import prompt_attention as _kernels

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available() -> bool:
    return _kernels is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def uses_triton(q: Tensor) -> bool:
    """Whether `prompt_attention` runs the Triton op for q: on CUDA in the kernels' dtypes, on the
    CPU under the interpreter in fp32 and fp16 (its dot of bf16 operands is wrong)."""
    if not triton_available() or q.dtype not in _DTYPES:
        return False
    return q.is_cuda or (q.device.type == "cpu" and _interpreting() and q.dtype != torch.bfloat16)


BACKWARDS = ("split", "split-apart", "fused")


def backward_kind() -> str:
    """Which backward kernels run (kernels/prompt_attention.py): "split", _bwd_dq and _bwd_dkdv (the
    default); "split-apart", the same with _bwd_dkdv's prompt-tile programs in a launch of their own;
    or "fused", _bwd_fused. VITACLIP_ATTENTION_BACKWARD picks, read at each launch (a CUDA graph
    keeps the kernels it was captured with)."""
    return env_choice("VITACLIP_ATTENTION_BACKWARD", BACKWARDS, "split")


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _launch_config(q: Tensor, n_prompts: int, kernel_tiles: KernelTiles) -> dict:
    """One kernel's constexprs and launch options; kernel_tiles is a field of `_tiles(q)`."""
    head_dim = q.shape[-1]
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_PR=max(16, triton.next_power_of_2(max(n_prompts, 1))),
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **kernel_tiles.launch_args(),
    )


def _tail(rows: int, block: int) -> int:
    """Size of the tile that takes the last rows % block rows: the next power of two, at least
    16 (tl.dot's minimum), at most block (rows % block == 0: block, and no tail runs)."""
    rest = rows % block
    return min(block, max(16, triton.next_power_of_2(rest))) if rest else block


def _row_tiles(rows: int, block: int) -> list:
    """(row_start, n_tiles, tile) of each launch that covers `rows` rows per frame-head: full tiles
    of `block` rows, then of the largest power of two (>= 16) that the rows left fill, until one
    tile covers the rest with fewer than 16 rows to spare (197 rows in 128-row tiles: 128 + 64 + 16;
    in 64-row tiles: 3 x 64 + 16)."""
    launches, start = [], 0
    while start < rows:
        left = rows - start
        cover = max(16, triton.next_power_of_2(left))
        if cover <= block and cover - left < 16:
            tile, n_tiles = cover, 1
        else:
            tile = min(block, 1 << (left.bit_length() - 1))
            n_tiles = left // tile
        if launches and launches[-1][2] == tile:  # the same tile size: one launch
            launches[-1] = (launches[-1][0], launches[-1][1] + n_tiles, tile)
        else:
            launches.append((start, n_tiles, tile))
        start += n_tiles * tile
    return launches


def _tiles(q: Tensor) -> AttentionTiles:
    return tiles_for(q.shape[-1], interpreting=q.device.type == "cpu", fp32=q.dtype == torch.float32)


def _prompt_args(local_k, local_v, global_k, global_v, summary_k, summary_v, k):
    """Kernel pointers and sizes. The kernels index prompts as contiguous tensors (they are
    tiny, so making them so costs nothing); k stands in for absent ones, whose loads are
    compiled out."""
    n_local = local_k.shape[1] if local_k is not None else 0
    n_global = global_k.shape[0] if global_k is not None else 0
    has_summary = summary_k is not None
    ptrs = [t.contiguous() if t is not None else k
            for t in (local_k, local_v, global_k, global_v, summary_k, summary_v)]
    return ptrs, n_local, n_global, has_summary


def _strides(*tensors: Tensor) -> list:
    return [s for t in tensors for s in t.stride()]


def _split_qkv(q_or_qkv: Tensor, k: Optional[Tensor], v: Optional[Tensor]):
    """(q, k, v): given separately, or as views of a packed [F, S, 3, H, Dh] when k is None."""
    return q_or_qkv.unbind(2) if k is None else (q_or_qkv, k, v)


def launch_device(t: Tensor):
    """Around Triton launches: Triton launches on the current CUDA device, not the tensors' (as
    PyTorch's own ops do), and custom ops get no device guard."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_forward(q, k, v, prompts, frames_per_group):
    n_frames, seq, heads, head_dim = q.shape
    ptrs, n_local, n_global, has_summary = _prompt_args(*prompts, k)
    out = q.new_empty(n_frames, seq, heads, head_dim)
    lse = torch.empty(n_frames, heads, seq, device=q.device, dtype=torch.float32)
    cfg = _launch_config(q, n_local + n_global + int(has_summary), _tiles(q).fwd)
    cfg["TAIL_N"] = _tail(seq, cfg["BLOCK_N"])
    for row_start, n_tiles, tile in _row_tiles(seq, cfg["BLOCK_M"]):
        _kernels._fwd[(n_tiles * n_frames * heads,)](
            q, k, v, *ptrs, out, lse, *_strides(q, k, v),
            seq, heads, frames_per_group, head_dim ** -0.5 * _kernels.LOG2E, row_start, n_tiles,
            P=n_local, G=n_global, HAS_SUMMARY=has_summary, **{**cfg, "BLOCK_M": tile})
    return out, lse


def _launch_backward(grad_out, q, k, v, prompts, out, lse, frames_per_group, dq, dk, dv):
    """Writes dq, dk, dv (any strides, unit stride along Dh); returns the prompt gradients: local
    keys and values stacked [2, n_groups, P, H, Dh], global ones [2, G, H, Dh], summary keys and
    values [F, H, Dh] (empty tensors for absent prompts)."""
    n_frames, seq, heads, head_dim = q.shape
    ptrs, n_local, n_global, has_summary = _prompt_args(*prompts, k)
    # the kernels index these as contiguous (no-ops for the forward's own out and lse)
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    delta = torch.empty_like(lse)
    f32 = dict(device=q.device, dtype=torch.float32)
    # per-frame fp32 partials of the shared prompts' keys and values, stacked so that one sum and
    # one cast reduce both (deterministic, no atomics)
    local_part = torch.empty(2, n_frames, n_local, heads, head_dim, **f32)
    global_part = torch.empty(2, n_frames, n_global, heads, head_dim, **f32)
    dsk = q.new_empty(n_frames, heads, head_dim) if has_summary else _empty(q)
    dsv = torch.empty_like(dsk)

    n_prompts = n_local + n_global + int(has_summary)
    tiles = _tiles(q)
    dq_cfg = _launch_config(q, n_prompts, tiles.bwd_dq)
    dkdv_cfg = _launch_config(q, n_prompts, tiles.bwd_dkdv)
    sizes = dict(P=n_local, G=n_global, HAS_SUMMARY=has_summary)
    scales = (head_dim ** -0.5 * _kernels.LOG2E, head_dim ** -0.5)
    in_strides = _strides(q, k, v)
    kind = backward_kind()
    if kind == "fused":  # one program per frame-head
        fused_cfg = _launch_config(q, n_prompts, tiles.bwd_fused)
        dq_acc = torch.empty(n_frames * heads, seq, fused_cfg["BLOCK_D"], **f32)
        _kernels._bwd_fused[(n_frames * heads,)](
            q, k, v, *ptrs, out, grad_out, lse, delta, dq_acc, dq, dk, dv,
            *local_part, *global_part, dsk, dsv, *in_strides, *dq.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
            seq, heads, frames_per_group, *scales, **sizes, **fused_cfg,
            TAIL_M=_tail(seq, fused_cfg["BLOCK_M"]), TAIL_N=_tail(seq, fused_cfg["BLOCK_N"]))
        return _reduced_prompt_grads(q, prompts, local_part, global_part, frames_per_group, dsk, dsv)
    dq_cfg["TAIL_N"] = _tail(seq, dq_cfg["BLOCK_N"])
    for row_start, n_tiles, tile in _row_tiles(seq, dq_cfg["BLOCK_M"]):
        _kernels._bwd_dq[(n_tiles * n_frames * heads,)](
            q, k, v, *ptrs, out, grad_out, lse, delta, dq, *in_strides, *dq.stride()[:3],
            seq, heads, frames_per_group, *scales, row_start, n_tiles, **sizes, **{**dq_cfg, "BLOCK_M": tile})
    # _bwd_dkdv reads the delta that _bwd_dq stored (same stream, so ordered). Each frame-head's
    # prompt-tile program runs in the first launch ("split"), or in a launch of its own
    # ("split-apart"), so that the own-tile launches compile without the prompt path, whose
    # registers make the 64x64 launch spill (benchmarks/kernel_registers.py)
    dkdv_cfg["TAIL_M"] = _tail(seq, dkdv_cfg["BLOCK_M"])
    launches = [(row_start, n_tiles, tile, 0) for row_start, n_tiles, tile in _row_tiles(seq, dkdv_cfg["BLOCK_N"])]
    if n_prompts and kind == "split-apart":
        launches.append((0, 0, dkdv_cfg["BLOCK_N"], 1))
    elif n_prompts:
        launches[0] = (*launches[0][:3], 1)
    for row_start, n_tiles, tile, prompt_program in launches:
        _kernels._bwd_dkdv[((n_tiles + prompt_program) * n_frames * heads,)](
            q, k, v, *ptrs, grad_out, lse, delta, dk, dv,
            *local_part, *global_part, dsk, dsv, *in_strides, *dk.stride()[:3], *dv.stride()[:3],
            seq, heads, frames_per_group, *scales, row_start, n_tiles,
            **sizes, **{**dkdv_cfg, "BLOCK_N": tile, "PROMPT_PROGRAM": prompt_program})

    return _reduced_prompt_grads(q, prompts, local_part, global_part, frames_per_group, dsk, dsv)


def _reduced_prompt_grads(q, prompts, local_part, global_part, frames_per_group, dsk, dsv) -> list:
    """The prompt gradients from the kernels' per-frame partials: local prompts summed over the frames
    of their group, global ones over all frames (an empty set given gets its empty gradient, as the
    fake implementation says)."""
    local_k, global_k = prompts[0], prompts[2]
    local = local_part.unflatten(1, (-1, frames_per_group)).sum(2).to(q.dtype) if local_k is not None else _empty(q)
    global_ = global_part.sum(1).to(q.dtype) if global_k is not None else _empty(q)
    return [local, global_, dsk, dsv]


# One op pair serves both layouts: q, k, v given separately (strided views allowed), or
# packed as one [F, S, 3, H, Dh] in the first argument with k = v = None, so that the
# backward writes one packed gradient and autograd needs no copy to assemble it.
@torch.library.custom_op("vitaclip::prompt_attention", mutates_args=())
def _prompt_attention_op(
    q_or_qkv: Tensor, k: Optional[Tensor], v: Optional[Tensor],
    local_k: Optional[Tensor], local_v: Optional[Tensor],
    global_k: Optional[Tensor], global_v: Optional[Tensor],
    summary_k: Optional[Tensor], summary_v: Optional[Tensor],
    frames_per_group: int,
) -> tuple[Tensor, Tensor]:
    prompts = (local_k, local_v, global_k, global_v, summary_k, summary_v)
    with launch_device(q_or_qkv):
        return _launch_forward(*_split_qkv(q_or_qkv, k, v), prompts, frames_per_group)


@_prompt_attention_op.register_fake
def _(q_or_qkv, k, v, local_k, local_v, global_k, global_v, summary_k, summary_v, frames_per_group):
    q = _split_qkv(q_or_qkv, k, v)[0]
    n_frames, seq, heads, head_dim = q.shape
    return (q.new_empty(n_frames, seq, heads, head_dim),
            q.new_empty(n_frames, heads, seq, dtype=torch.float32))


@torch.library.custom_op("vitaclip::prompt_attention_backward", mutates_args=())
def _prompt_attention_backward_op(
    grad_out: Tensor, q_or_qkv: Tensor, k: Optional[Tensor], v: Optional[Tensor],
    local_k: Optional[Tensor], local_v: Optional[Tensor],
    global_k: Optional[Tensor], global_v: Optional[Tensor],
    summary_k: Optional[Tensor], summary_v: Optional[Tensor],
    out: Tensor, lse: Tensor, frames_per_group: int,
) -> List[Tensor]:  # (typing.List: torch 2.6 takes no list[Tensor] in a custom op's schema)
    """Gradients of (q_or_qkv, k, v, local_k and local_v stacked, global_k and global_v stacked,
    summary_k, summary_v); empty tensors for inputs that were None. (Two gradients stacked in one
    tensor are reduced together; an op may not return two views of one tensor.)"""
    prompts = (local_k, local_v, global_k, global_v, summary_k, summary_v)
    q, k_, v_ = _split_qkv(q_or_qkv, k, v)
    if k is None:
        dqkv = q_or_qkv.new_empty(q_or_qkv.shape)
        grads = [dqkv, _empty(q), _empty(q)]
        dq, dk, dv = dqkv.unbind(2)
    else:
        dq, dk, dv = grads = [q.new_empty(q.shape) for _ in range(3)]
    with launch_device(q):
        return grads + _launch_backward(grad_out, q, k_, v_, prompts, out, lse, frames_per_group, dq, dk, dv)


@_prompt_attention_backward_op.register_fake
def _(grad_out, q_or_qkv, k, v, local_k, local_v, global_k, global_v, summary_k, summary_v, out, lse,
      frames_per_group):
    def like(t, *lead):
        return q_or_qkv.new_empty(*lead, *t.shape) if t is not None else q_or_qkv.new_empty(0)
    return [like(q_or_qkv), like(k), like(v), like(local_k, 2), like(global_k, 2), like(summary_k), like(summary_v)]


def _setup_context(ctx, inputs, output):
    *tensors, frames_per_group = inputs
    ctx.frames_per_group = frames_per_group
    ctx.save_for_backward(*tensors, *output)
    # lse is for the backward only: without these, autograd fills a zero gradient [F, H, S] for
    # it in every layer's backward
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse):
    saved = ctx.saved_tensors
    if grad_out is None:  # the output did not reach the loss
        return (None,) * (len(saved) - 1)
    dq, dk, dv, local, global_, dsk, dsv = _prompt_attention_backward_op(grad_out, *saved, ctx.frames_per_group)
    local_k, global_k = saved[3], saved[5]
    grads = [dq, dk, dv, *(local.unbind(0) if local_k is not None else (None, None)),
             *(global_.unbind(0) if global_k is not None else (None, None)), dsk, dsv]
    # inputs that were None get None (their slots in the op's result hold empty tensors)
    return (*[g if t is not None else None for g, t in zip(grads, saved[:9])], None)


_prompt_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(q, k, v, local_k, local_v, global_k, global_v, summary_k, summary_v, frames_per_group):
    def need(ok, msg):
        if not ok:
            raise ValueError(f"prompt_attention: {msg}")

    for name, t in {"q": q, "k": k, "v": v}.items():
        need(isinstance(t, Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    need(q.dim() == 4 and q.numel() > 0, f"q must be a non-empty [F, S, H, Dh], got shape {tuple(q.shape)}")
    n_frames, seq, heads, head_dim = q.shape
    need(k.shape == q.shape and v.shape == q.shape,
         f"k {tuple(k.shape)} and v {tuple(v.shape)} must match q {tuple(q.shape)}")
    need(q.is_floating_point(), f"q must be floating point, got {q.dtype}")
    need(isinstance(frames_per_group, int) and frames_per_group >= 1,
         f"frames_per_group must be a positive int, got {frames_per_group!r}")
    pairs = {"local": (local_k, local_v), "global": (global_k, global_v), "summary": (summary_k, summary_v)}
    for name, (pk, pv) in pairs.items():
        need((pk is None) == (pv is None), f"{name}_k and {name}_v must both be given or both be None")
    if local_k is not None:
        need(n_frames % frames_per_group == 0,
             f"{n_frames} frames are not a whole number of groups of {frames_per_group}")
        want = (n_frames // frames_per_group, local_k.shape[1] if local_k.dim() == 4 else -1, heads, head_dim)
        need(local_k.dim() == 4 and tuple(local_k.shape) == want and local_v.shape == local_k.shape,
             f"local_k/v must be [F // frames_per_group, P, H, Dh] = {want}, got "
             f"{tuple(local_k.shape)} and {tuple(local_v.shape)}")
    if global_k is not None:
        need(global_k.dim() == 3 and global_k.shape[1:] == (heads, head_dim) and global_v.shape == global_k.shape,
             f"global_k/v must be [G, {heads}, {head_dim}], got {tuple(global_k.shape)} and {tuple(global_v.shape)}")
    if summary_k is not None:
        want = (n_frames, heads, head_dim)
        need(tuple(summary_k.shape) == want and summary_v.shape == summary_k.shape,
             f"summary_k/v must be {want}, got {tuple(summary_k.shape)} and {tuple(summary_v.shape)}")
    for name, t in {"k": k, "v": v, "local_k": local_k, "local_v": local_v, "global_k": global_k,
                    "global_v": global_v, "summary_k": summary_k, "summary_v": summary_v}.items():
        if t is not None:
            need(t.dtype == q.dtype and t.device == q.device,
                 f"{name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")


# The kernels widen only the frame offset to 64 bits: rows, heads and head dims are indexed in int32
MAX_FRAME_OFFSET = 2 ** 31


def _frame_offsets_fit(t: Tensor) -> bool:
    """Whether every element of one frame of t [F, ...] lies within MAX_FRAME_OFFSET elements of
    the frame's first (not so for, e.g., seq-first views [S, F, ...] of thousands of frames)."""
    return sum((n - 1) * abs(s) for n, s in zip(t.shape[1:], t.stride()[1:])) < MAX_FRAME_OFFSET


def _checked_attention(q, k, v, prompts, frames_per_group: int, op_qkv) -> Tensor:
    """Checks, then the Triton op given op_qkv (its first three arguments: q, k, v, or the packed
    qkv and two Nones), or the naive reference where Triton does not run."""
    _check_inputs(q, k, v, *prompts, frames_per_group)
    if not uses_triton(q):  # e.g. float64, or the CPU without the interpreter
        return naive.prompt_attention(q, k, v, *prompts, frames_per_group).contiguous()
    op_qkv = [t if t is None or _frame_offsets_fit(t) else t.contiguous() for t in op_qkv]
    return _prompt_attention_op(*op_qkv, *prompts, frames_per_group)[0]


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
    """Attention of each frame's own queries over its own, local, global and summary keys.

    Same contract as `naive.prompt_attention`. q, k, v may be strided views (e.g. of a fused
    QKV output [F, S, 3, H, Dh]); the output is a fresh contiguous [F, S, H, Dh], so
    `.view(F, S, H * Dh)` feeds the output projection without a copy.
    """
    prompts = (local_k, local_v, global_k, global_v, summary_k, summary_v)
    return _checked_attention(q, k, v, prompts, frames_per_group, (q, k, v))


def prompt_attention_qkv(
    qkv: Tensor,
    local_k: Optional[Tensor] = None,
    local_v: Optional[Tensor] = None,
    global_k: Optional[Tensor] = None,
    global_v: Optional[Tensor] = None,
    summary_k: Optional[Tensor] = None,
    summary_v: Optional[Tensor] = None,
    frames_per_group: int = 1,
) -> Tensor:
    """`prompt_attention` of a packed qkv [F, S, 3, H, Dh] (a fused QKV projection's output):
    its gradient comes back packed in one tensor, with no copy to assemble it."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"prompt_attention_qkv: qkv must be [F, S, 3, H, Dh], got shape {tuple(qkv.shape)}")
    prompts = (local_k, local_v, global_k, global_v, summary_k, summary_v)
    return _checked_attention(*qkv.unbind(2), prompts, frames_per_group, (qkv, None, None))
