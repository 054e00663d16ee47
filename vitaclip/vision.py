"""Vita-CLIP's video encoder: a frozen CLIP ViT with summary, local and global prompts.

Parameter names follow the authors' checkpoints (SPEC: "Public checkpoint layout"), so
their state dicts load without renaming.
"""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compiling import compile_mode
from .config import VitaCLIPConfig
from .ops.summary import summary_tokens


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (the authors' layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, s, c = x.shape
        def split(t: Tensor) -> Tensor:
            return t.view(n, s, self.heads, c // self.heads).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(o.transpose(1, 2).reshape(n, s, c))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


@torch.compiler.assume_constant_result  # a fixed fact of the device type, which torch 2.11's dynamo cannot trace
def has_autocast(device: str) -> bool:
    """Whether the device type `device` has autocast (meta, for one, has none)."""
    return torch.amp.is_autocast_available(device)


def autocast_dtype(device: str) -> Optional[torch.dtype]:
    """Autocast's dtype on the device type `device` where it is on, else None (also on device types
    that have no autocast, such as meta, which torch.is_autocast_enabled refuses)."""
    if has_autocast(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def autocast_off(device: str):
    """A context with autocast off on the device type `device` (nothing to do where it has none)."""
    return torch.autocast(device, enabled=False) if has_autocast(device) else contextlib.nullcontext()


def matmul_dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul of `dtype` operands on `device` computes in: autocast's where it is on,
    except for float64, which autocast leaves alone; else `dtype`."""
    autocast = autocast_dtype(device)
    return autocast if autocast is not None and dtype != torch.float64 else dtype


class PatchEmbed(nn.Module):
    """CLIP's patch convolution (kernel = stride = patch size, the authors' parameter), computed
    as what it is, one matmul over the flattened patches (cuDNN's convolution and its two layout
    conversions took 2 ms of a 27 ms batch of 32 clips on an H100, benchmarks/RESULTS.md)."""

    def __init__(self, patch_size: int, width: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, frames: Tensor) -> Tensor:
        """Patch features [F, N, C] of frames [..., 3, H, W] (any strides; F = the leading sizes' product)."""
        p = self.patch_size
        device = frames.device.type
        dtype = matmul_dtype(device, self.proj.weight.dtype)  # (frames of another dtype are cast in the copy)
        # [..., rows, columns, 3, p, p]: the weight's (channel, row, column) order, cast in the same copy
        lead = frames.dim() - 3
        patches = frames.unflatten(-1, (-1, p)).unflatten(-3, (-1, p))  # [..., 3, rows, p, columns, p]
        patches = patches.permute(*range(lead), lead + 1, lead + 3, lead, lead + 2, lead + 4)
        rows, columns = patches.shape[lead:lead + 2]
        patches = patches.to(dtype, memory_format=torch.contiguous_format).contiguous()  # one copy either way
        patches = patches.view(-1, rows * columns, 3 * p * p)
        weight = self.proj.weight.reshape(self.proj.out_channels, -1)  # (a copy where it is channels-last)
        return F.linear(patches, weight, self.proj.bias)  # [F, N, C]


@dataclass
class LayerPrompts:
    """The prompt tokens one layer appends to every frame's sequence (all exact, none repeated).

    local:   [n_groups, T0, C]  local prompts p_l + c of each group of T0 frames, or None
    global_: [G, C]             the layer's global prompts, or None
    summary: [F, C]             each frame's summary token, or None
    """

    local: Optional[Tensor]
    global_: Optional[Tensor]
    summary: Optional[Tensor]
    frames_per_group: int


class VitaBlock(nn.Module):
    """One frozen CLIP layer plus its prompt modules."""

    def __init__(self, config: VitaCLIPConfig):
        super().__init__()
        c = config.width
        self.heads = config.heads
        self.num_frames = config.num_frames
        self.norm1 = nn.LayerNorm(c)
        self.attn = Attention(c, config.heads)
        self.norm2 = nn.LayerNorm(c)
        # mlp_ratio is read off the weights as hidden / width: round, as int() can land one short
        self.mlp = Mlp(c, round(c * config.mlp_ratio), config.act)
        if config.uses_cls_proj:
            self.cls_proj = nn.Linear(c, c)
        if config.use_summary:
            self.summary_ln = nn.LayerNorm(c)
            self.summary_attn_layer = Attention(c, config.heads)
        if config.use_local:
            self.local_prompts = nn.Parameter(torch.empty(1, config.num_frames, c))
        # Tensors a backend derives from this block's weights (e.g. in a compute dtype), keyed as
        # it likes; not state: dropped when a move or cast gives the weights new memory, and left
        # out of copies and pickles (made again on use).
        self.derived: dict = {}

    def _apply(self, fn, *args, **kwargs):
        def addresses():
            return [p.data_ptr() for p in self.parameters()]

        before = addresses()
        module = super()._apply(fn, *args, **kwargs)
        if addresses() != before:
            self.derived.clear()
        return module

    def __getstate__(self) -> dict:
        return {**self.__dict__, "derived": {}}

    def forward(self, x: Tensor, pending: Optional[Tensor], global_prompts: Optional[Tensor],
                class_tokens_only: bool, block_forward: "BlockForward") -> Tuple[Tensor, Optional[Tensor]]:
        """This layer as the backend's `block_forward` computes it (see BlockForward), called through
        the module so that hooks on it run in every backend. The layer's output is x' + pending'
        (pending' None: x' alone; a fast backend leaves the MLP's residual add to the next layer when
        no gradient is needed, and in the last layer computes the class tokens alone, [F, 1, C])."""
        return block_forward(self, x, pending, global_prompts, class_tokens_only)

    def prompts(self, x: Tensor, global_prompts: Optional[Tensor]) -> LayerPrompts:
        """Build this layer's prompt tokens from the frames' tokens x [F, S, C]."""
        local = summary = None
        if hasattr(self, "cls_proj"):
            n_frames, _, width = x.shape
            c = self.cls_proj(x[:, 0]).view(n_frames // self.num_frames, self.num_frames, width)
            if hasattr(self, "summary_ln"):
                summary = summary_tokens(c, self.summary_ln, self.summary_attn_layer, self.heads)
                summary = summary.reshape(n_frames, width)
            if hasattr(self, "local_prompts"):
                local = self.local_prompts + c
        return LayerPrompts(local, global_prompts, summary, self.num_frames)


# A backend's layer: (block, x, pending, global_prompts) -> (x', pending'). The layer's input is the
# frames' tokens x + pending ([F, S, C]; pending None: x alone), its output x' + pending': a layer may
# leave its last residual add to the next one, which folds it into its first fused kernel instead of
# a pass over the stream of its own. global_prompts: the layer's [G, C] or None. A layer builds its
# prompts itself (`VitaBlock.prompts`), so a compiled layer fuses their small ops, and the gradient
# of x[:, 0], with its own. class_tokens_only: True for the last layer, after which only the class
# tokens x'[:, 0] + pending'[:, 0] are read; a backend may then compute them alone ([F, 1, C] each).
BlockForward = Callable[[VitaBlock, Tensor, Optional[Tensor], Optional[Tensor], bool], Tuple[Tensor, Optional[Tensor]]]


def reference_block_forward(block: VitaBlock, x: Tensor, pending: Optional[Tensor],
                            global_prompts: Optional[Tensor], class_tokens_only: bool = False) -> Tuple[Tensor, None]:
    """The original layer: attention over the materialised sequence
    [cls, local(T0), global(G), patches(N), summary], then the MLP on the frame's own tokens
    (all of them, whatever class_tokens_only says, as the original)."""
    if pending is not None:
        x = x + pending
    prompts = block.prompts(x, global_prompts)
    n_frames = x.shape[0]
    parts = [x[:, :1]]
    if prompts.local is not None:
        parts.append(prompts.local.repeat_interleave(prompts.frames_per_group, dim=0))
    if prompts.global_ is not None:
        parts.append(prompts.global_.unsqueeze(0).expand(n_frames, -1, -1))
    n_before_patches = sum(p.shape[1] for p in parts)
    parts.append(x[:, 1:])
    if prompts.summary is not None:
        parts.append(prompts.summary.unsqueeze(1))
    seq = torch.cat(parts, dim=1)
    seq = seq + block.attn(block.norm1(seq))
    own = torch.cat([seq[:, :1], seq[:, n_before_patches:n_before_patches + x.shape[1] - 1]], dim=1)
    return own + block.mlp(block.norm2(own)), None


class VisionTransformer(nn.Module):
    def __init__(self, config: VitaCLIPConfig):
        super().__init__()
        self.config = config
        c = config.width
        self.patch_embed = PatchEmbed(config.patch_size, c)
        self.cls_token = nn.Parameter(torch.empty(c))
        self.pos_embed = nn.Parameter(torch.empty(config.num_patches + 1, c))
        self.time_embed = nn.Parameter(torch.empty(config.num_frames, c))
        self.ln_pre = nn.LayerNorm(c)
        self.blocks = nn.ModuleList(VitaBlock(config) for _ in range(config.layers))
        self.ln_post = nn.LayerNorm(c)
        self.proj = nn.Parameter(torch.empty(c, config.embed_dim))
        if config.num_global:
            self.global_prompts = nn.Parameter(torch.empty(config.layers, config.num_global, c))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP-style init of the backbone; the public code's init of the prompt modules."""
        c = self.config.width
        scale = c ** -0.5
        nn.init.normal_(self.cls_token, std=scale)
        nn.init.normal_(self.pos_embed, std=scale)
        nn.init.normal_(self.proj, std=scale)
        nn.init.normal_(self.time_embed, std=0.02)
        bound = math.sqrt(6.0 / (3 * self.config.patch_size ** 2 + c))
        if hasattr(self, "global_prompts"):
            nn.init.uniform_(self.global_prompts, -bound, bound)
        for block in self.blocks:
            if hasattr(block, "local_prompts"):
                nn.init.uniform_(block.local_prompts, -bound, bound)
            if hasattr(block, "summary_attn_layer"):
                for lin in (block.summary_attn_layer.q_proj, block.summary_attn_layer.k_proj,
                            block.summary_attn_layer.v_proj, block.summary_attn_layer.out_proj):
                    nn.init.xavier_uniform_(lin.weight)
                    nn.init.zeros_(lin.bias)

    def check_video(self, video: Tensor) -> None:
        cfg = self.config
        if not isinstance(video, Tensor):
            raise TypeError(f"video must be a torch.Tensor [B, 3, T, H, W], got {type(video).__name__}")
        if not video.is_floating_point():
            # raw pixels (uint8 0..255) would be cast and scored as they are: wrong logits, no error
            raise TypeError(f"video must be a floating-point tensor, CLIP-normalised, got dtype {video.dtype}"
                            + (" (raw pixels? scale to [0, 1] and normalise with CLIP's mean and std first)"
                               if video.dtype == torch.uint8 else ""))
        if video.dim() != 5:
            raise ValueError(f"video must be [B, 3, T, H, W], got a tensor of rank {video.dim()} "
                             f"with shape {tuple(video.shape)}")
        b, ch, t, h, w = video.shape
        if ch != 3:
            raise ValueError(f"video must have 3 channels in dim 1 ([B, 3, T, H, W]), got {ch} "
                             f"(shape {tuple(video.shape)})")
        if b == 0 or t == 0:
            raise ValueError(f"video has no clips or no frames: shape {tuple(video.shape)}")
        if (h, w) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"frames are {h}x{w} but the positional embedding is for "
                             f"{cfg.image_size}x{cfg.image_size}; resize or crop the video first")
        cfg.check_frames(t)

    def time_embedding(self, n_frames: int) -> Tensor:
        if n_frames == self.config.num_frames:
            return self.time_embed
        table = self.time_embed.t().unsqueeze(0)  # [1, C, T0]
        return F.interpolate(table, size=n_frames, mode="nearest").squeeze(0).t()

    def embed(self, video: Tensor) -> Tensor:
        """The first layer's input [B * T, S, C]: patches, class token, positions, time, ln_pre."""
        b, _, t, h, w = video.shape
        x = self.patch_embed(video.transpose(1, 2))
        cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        x = x.view(b, t, *x.shape[1:]) + self.time_embedding(t).to(x.dtype)[None, :, None, :]
        return self.ln_pre(x.view(b * t, *x.shape[2:]))

    def forward(self, video: Tensor, block_forward: BlockForward, compiled: bool = False) -> Tensor:
        """Per-frame features [B, T, D] of a normalised video [B, 3, T, H, W]; `compiled` runs
        `embed` under torch.compile."""
        self.check_video(video)
        b, t = video.shape[0], video.shape[2]
        x, pending = compiled_embed()(self, video) if compiled else self.embed(video), None
        for i, block in enumerate(self.blocks):
            global_prompts = self.global_prompts[i] if hasattr(self, "global_prompts") else None
            x, pending = block(x, pending, global_prompts, i == len(self.blocks) - 1, block_forward)
        cls = x[:, 0] if pending is None else x[:, 0] + pending[:, 0]  # the only tokens read after the last layer
        features = self.ln_post(cls) @ self.proj
        return features.view(b, t, -1)


@functools.lru_cache(maxsize=None)
def compiled_embed():
    """`VisionTransformer.embed` under torch.compile, built on first use: one fused pass for the
    casts, adds and LayerNorm around the patch GEMM. A function of the module, not an attribute
    of it, so that copies and pickles of a model carry no compiled code."""
    return torch.compile(VisionTransformer.embed, dynamic=False, mode=compile_mode())
