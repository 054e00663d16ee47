"""The "fast" backends: a Vita-CLIP layer around the fused Triton prompt attention.

Exactly the reference layer (`vision.reference_block_forward`), computed without the
extended sequence:
  - one fused QKV projection of the frames' own tokens (concatenated weight), read by the
    kernel in place, its gradient written back packed; the frozen weights are kept in the
    compute dtype while unchanged (`layer_weights`), so no step casts them;
  - the layer's prompts built inside the layer (`VitaBlock.prompts`: cls_proj, the summary
    op, local prompts), so that under torch.compile their casts and small ops, and the
    gradient of x[:, 0], fuse with the layer's own kernels instead of running eagerly around
    it (a zero-filled stream-sized gradient plus an fp32 add per layer);
  - LayerNorm + K/V projection of each distinct prompt once (global prompts once per
    layer, local prompts once per group, summary tokens once per frame), all kinds in one
    pass, into K and V tensors the kernel reads in place;
  - no queries, output projection or MLP for prompt tokens (their outputs are discarded);
  - then out_proj + residual + MLP on the own tokens, QuickGELU as one Triton kernel each
    way when eager (`ops.activation`); without gradients the MLP's residual add is left to the
    next layer, whose first fused kernel (LayerNorm) reads the two parts anyway (with them it
    would cost memory: `_defers_residual`). When training, the
    stream after attention and the MLP's hidden activation (4x wider than the stream) are
    recomputed in the backward from tensors kept anyway (the layer input and the attention
    output) instead of stored: a layer keeps only its input, the packed qkv and the attention
    output (the rest is a recompute of about one fc1 and one out_proj GEMM per layer);
  - in the last layer, after which only the class tokens are read, keys and values of every
    token but the query, attention, out_proj and MLP of the class token alone
    (`_class_token_layer`, `ops.class_attention`): about 5/6 of a layer's work left out.

"fast" runs this eagerly; "fast-compiled" runs the same layer function under torch.compile
(one graph per layer shape, shared by all layers),
fusing the LayerNorms, casts, QuickGELU and residual adds around the GEMMs and the custom ops,
and compiles the video embedding and the text transformer too (in the mode
`compiling.compile_mode()` names);
"fast-graphed" is "fast-compiled" with whole passes captured as CUDA graphs by the model
(vitaclip.graphs). All register on import and are offered on CUDA; "auto" picks
"fast-graphed": a training step of "fast-compiled" left the H100 idle half the time,
waiting on the host (benchmarks/RESULTS.md, run 3).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .backends import register_backend
from .compiling import compile_mode
from .graphs import tensor_states
from .ops.activation import quick_gelu
from .ops.attention import prompt_attention_qkv, triton_available, uses_triton
from .ops.class_attention import class_token_attention
from .vision import LayerPrompts, QuickGELU, VitaBlock, matmul_dtype

class LayerWeights(NamedTuple):
    """The linear weights of a layer's fast forward, q/k/v stacked into one projection."""
    qkv_weight: Tensor
    qkv_bias: Tensor
    out_weight: Tensor
    out_bias: Tensor
    fc1_weight: Tensor
    fc1_bias: Tensor
    fc2_weight: Tensor
    fc2_bias: Tensor


def layer_weights(block: VitaBlock, dtype: torch.dtype) -> LayerWeights:
    """The block's q/k/v (stacked), out_proj, fc1 and fc2 weights in the compute dtype `dtype`
    (autocast's under autocast). Frozen (the backbone by default): made once per dtype and kept in
    `block.derived`, keyed on the storage and version of the tensors they are read from (a
    parametrization's too) so that an in-place update or a move rebuilds them; a step then casts no
    weight (autocast would cast all of them at every call). If any of them trains: the parameters
    themselves (q/k/v concatenated, differentiably), every call, with or without grad: a CUDA graph
    reads a trained weight at every replay, never a cached copy. Tensors made in inference mode keep
    no version counter, so their weights are made at every call too."""
    attn, mlp = block.attn, block.mlp
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    linears = (q, k, v, attn.out_proj, mlp.fc1, mlp.fc2)
    params = [t for lin in linears for t in (lin.weight, lin.bias)]

    def build(cast) -> LayerWeights:
        return LayerWeights(cast(torch.cat([q.weight, k.weight, v.weight])), cast(torch.cat([q.bias, k.bias, v.bias])),
                            *(cast(t) for t in params[6:]))

    if any(p.requires_grad for p in params):
        # a fused optimizer updates them without bumping their versions: what was cached before they
        # trained must not serve once they are frozen again
        block.derived.pop("fast weights", None)
        return build(lambda t: t)
    if torch.compiler.is_compiling():  # the model compiled whole by its user: the casts go into the graph
        return build(lambda t: t.to(dtype))
    # a parametrized weight is computed at each read (a new tensor of version 0, possibly at the last
    # one's address): the key reads the parameters it is computed from
    sources = [t for lin in linears for t in (*lin.parameters(), *lin.buffers())]
    if any(torch.is_inference(t) for t in sources):  # an in-place write in inference mode would go unseen
        return build(lambda t: t.to(dtype))
    key = tensor_states(sources) + (params[0].device,)
    per_dtype = block.derived.setdefault("fast weights", {})
    cached = per_dtype.get(dtype)
    if cached is None or cached[0] != key:
        # normal tensors even when first built under inference_mode, so that training can reuse them
        with torch.inference_mode(False), torch.no_grad():
            cached = per_dtype[dtype] = (key, build(lambda t: t.to(dtype)))
    return cached[1]


def _compute_dtype(block: VitaBlock, x: Tensor) -> torch.dtype:
    return matmul_dtype(x.device.type, block.attn.q_proj.weight.dtype)


def _prompt_kv(prompts: LayerPrompts, norm: nn.LayerNorm, qkv_weight: Tensor, qkv_bias: Tensor,
               heads: int) -> Tuple[Optional[Tensor], ...]:
    """Keys and values [..., H, Dh] of every prompt token (LayerNorm, then K/V projection):
    (local_k, local_v, global_k, global_v, summary_k, summary_v), None for an absent kind. All
    kinds go through one LayerNorm and one GEMM each for K and V, whose outputs the kernel reads
    in place (contiguous slices: no copies)."""
    kinds = (prompts.local, prompts.global_, prompts.summary)
    present = [t.flatten(0, -2) for t in kinds if t is not None]
    if not present:
        return (None,) * 6
    tokens = norm(torch.cat(present) if len(present) > 1 else present[0])
    width = tokens.shape[-1]
    k, v = (F.linear(tokens, qkv_weight[i * width:(i + 1) * width], qkv_bias[i * width:(i + 1) * width])
            for i in (1, 2))
    out, start = [], 0
    for kind in kinds:
        if kind is None:
            out += [None, None]
            continue
        shape, rows = (*kind.shape[:-1], heads, width // heads), kind[..., 0].numel()
        out += [k[start:start + rows].view(shape), v[start:start + rows].view(shape)]
        start += rows
    return tuple(out)


def _residual_and_mlp_hidden(x: Tensor, attended: Tensor, out_weight: Tensor, out_bias: Tensor,
                             norm: nn.LayerNorm, fc1_weight: Tensor, fc1_bias: Tensor, act) -> Tuple[Tensor, Tensor]:
    """The stream after attention, x + out_proj(attended), and the MLP hidden act(fc1(norm(.)))."""
    x = x + F.linear(attended, out_weight, out_bias)
    return x, act(F.linear(norm(x), fc1_weight, fc1_bias))


def _layer_input(x: Tensor, pending: Optional[Tensor], global_prompts: Optional[Tensor],
                 block: VitaBlock) -> Tuple[Tensor, LayerPrompts]:
    """The layer's input x + pending and its prompts."""
    if pending is not None:
        x = x + pending
    return x, block.prompts(x, global_prompts)


def _layer(x: Tensor, pending: Optional[Tensor], global_prompts: Optional[Tensor], weights: LayerWeights,
           block: VitaBlock, defer_residual: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(stream after attention, MLP output) of the layer with input x + pending when
    `defer_residual`: their sum is the layer's output, added by the next layer in its first kernel
    (or for the class tokens alone after the last one); else (the layer's output, None)."""
    x, prompts = _layer_input(x, pending, global_prompts, block)
    n_frames, seq, width = x.shape
    heads = block.heads
    qkv = F.linear(block.norm1(x), weights.qkv_weight, weights.qkv_bias).view(n_frames, seq, 3, heads, width // heads)
    prompt_kv = _prompt_kv(prompts, block.norm1, weights.qkv_weight, weights.qkv_bias, heads)
    attended = prompt_attention_qkv(qkv, *prompt_kv, prompts.frames_per_group).view(n_frames, seq, width)
    mlp = block.mlp
    # the fused Triton QuickGELU saves eager launches; under torch.compile inductor fuses the plain
    # module itself, with its neighbours (into fc1's epilogue when autotuning GEMMs)
    fused_act = isinstance(mlp.act, QuickGELU) and uses_triton(x) and not torch.compiler.is_compiling()
    act = quick_gelu if fused_act else mlp.act
    args = (x, attended, weights.out_weight, weights.out_bias, block.norm2, weights.fc1_weight, weights.fc1_bias, act)
    if torch.is_grad_enabled() and attended.requires_grad:
        # recomputed in the backward from x and attended, which norm1 and the attention op keep anyway
        x, hidden = checkpoint(_residual_and_mlp_hidden, *args, use_reentrant=False, preserve_rng_state=False)
    else:
        x, hidden = _residual_and_mlp_hidden(*args)
    out = F.linear(hidden, weights.fc2_weight, weights.fc2_bias)
    return (x, out) if defer_residual else (x + out, None)


def _defers_residual() -> bool:
    """Whether layers leave their MLP's residual add to the next layer: only where no gradient is
    recorded. With gradients, a compiled layer given x and pending apart keeps both for the backward,
    and its LayerNorm's fp32 normalised input too (6 bytes more per stream element and layer than given
    their sum: about 1.2 GiB in a 16-clip ViT-B/16 training step, by inductor's partition of the layer
    traced on the CPU); adding in the layer before costs a pass over the stream instead."""
    return not torch.is_grad_enabled()


def _class_token_layer(x: Tensor, pending: Optional[Tensor], global_prompts: Optional[Tensor],
                       weights: LayerWeights, block: VitaBlock) -> Tuple[Tensor, Tensor]:
    """`_layer` for the last layer, after which only the class tokens are read: the keys and values
    of every token, but the query, attention, output projection and MLP of the class token alone
    (one row of S per frame). Returns the two parts of the class tokens' output, [F, 1, C] each."""
    x, prompts = _layer_input(x, pending, global_prompts, block)
    n_frames, seq, width = x.shape
    heads = block.heads
    normed = block.norm1(x)
    q = F.linear(normed[:, 0], weights.qkv_weight[:width], weights.qkv_bias[:width]).view(n_frames, heads, -1)
    kv = F.linear(normed, weights.qkv_weight[width:], weights.qkv_bias[width:]).view(n_frames, seq, 2, heads, -1)
    prompt_kv = _prompt_kv(prompts, block.norm1, weights.qkv_weight, weights.qkv_bias, heads)
    attended = class_token_attention(q, kv[:, :, 0], kv[:, :, 1], prompt_kv, prompts.frames_per_group)
    x, hidden = _residual_and_mlp_hidden(x[:, :1], attended.view(n_frames, 1, width), weights.out_weight,
                                         weights.out_bias, block.norm2, weights.fc1_weight, weights.fc1_bias,
                                         block.mlp.act)
    return x, F.linear(hidden, weights.fc2_weight, weights.fc2_bias)


@functools.lru_cache(maxsize=None)
def compiled_layer():
    """`_layer` under torch.compile, built on first use (importing the compiler is slow), in the
    mode `compiling.compile_mode()` names. One graph per input shape and grad mode, up to
    torch's recompile limit (8); not fullgraph=True, under which one more shape (an evaluation's
    last partial batch, another view count) would be a hard error instead of an uncompiled call.
    The tests compile it with fullgraph=True: it has no graph breaks."""
    return torch.compile(_layer, dynamic=False, mode=compile_mode())


@functools.lru_cache(maxsize=None)
def compiled_class_token_layer():
    """`_class_token_layer` under torch.compile: its graphs apart from the other layers'."""
    return torch.compile(_class_token_layer, dynamic=False, mode=compile_mode())


def fast_block_forward(block: VitaBlock, x: Tensor, pending: Optional[Tensor], global_prompts: Optional[Tensor],
                       class_tokens_only: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    weights = layer_weights(block, _compute_dtype(block, x))
    if class_tokens_only:
        return _class_token_layer(x, pending, global_prompts, weights, block)
    return _layer(x, pending, global_prompts, weights, block, _defers_residual())


def fast_compiled_block_forward(block: VitaBlock, x: Tensor, pending: Optional[Tensor],
                                global_prompts: Optional[Tensor], class_tokens_only: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    dtype = _compute_dtype(block, x)
    weights = layer_weights(block, dtype)
    defer = _defers_residual()
    if pending is None and defer:  # zeros, as the MLP output would be: the first layer shares the others' graph
        pending = x.new_zeros(x.shape, dtype=dtype)
    if class_tokens_only:
        return compiled_class_token_layer()(x, pending, global_prompts, weights, block)
    return compiled_layer()(x, pending, global_prompts, weights, block, defer)


def fast_available(device: torch.device) -> bool:
    return triton_available() and torch.device(device).type == "cuda"


register_backend("fast", fast_block_forward, fast_available, priority=5)
register_backend("fast-compiled", fast_compiled_block_forward, fast_available, priority=10, compile_modules=True,
                 traced_as="fast")
register_backend("fast-graphed", fast_compiled_block_forward, fast_available, priority=20, compile_modules=True,
                 cuda_graphs=True, traced_as="fast")
