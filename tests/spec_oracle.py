"""An independent, literal float64 reading of SPEC's vision side, frame by frame, for tests.

Deliberately written with explicit loops and explicit softmax so that it shares no code
with the package's reference path.
"""
import math

import torch


def layer_norm(x, ln):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], ln.weight.double(), ln.bias.double(), ln.eps)


def linear(x, lin):
    return x @ lin.weight.double().t() + lin.bias.double()


def mha(x, attn, heads):
    """Full self-attention over the rows of x [S, C]."""
    s, c = x.shape
    d = c // heads
    q, k, v = (linear(x, p).view(s, heads, d).transpose(0, 1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    return linear((weights @ v).transpose(0, 1).reshape(s, c), attn.out_proj)


def act(x, name):
    return x * torch.sigmoid(1.702 * x) if name == "quick_gelu" else torch.nn.functional.gelu(x)


def frame_features(visual, video):
    """Per-frame features [B, T, D] of video [B, 3, T, H, W], computed per SPEC."""
    cfg = visual.config
    video = video.double()
    b, _, t, _, _ = video.shape
    t0 = cfg.num_frames
    te = visual.time_embed.double()
    if t != t0:
        te = te[[math.floor(i * t0 / t) for i in range(t)]]  # nearest-neighbour resize
    out = torch.empty(b, t, cfg.embed_dim, dtype=torch.float64)
    for vid in range(b):
        xs = []
        for f in range(t):
            patches = torch.nn.functional.conv2d(video[vid, :, f][None], visual.patch_embed.proj.weight.double(),
                                                 visual.patch_embed.proj.bias.double(), stride=cfg.patch_size)
            tokens = torch.cat([visual.cls_token.double()[None], patches.flatten(2)[0].t()])
            xs.append(layer_norm(tokens + visual.pos_embed.double() + te[f], visual.ln_pre))
        for li, blk in enumerate(visual.blocks):
            new_xs = []
            for f in range(t):
                g0 = (f // t0) * t0  # first frame of this frame's group
                group = range(g0, g0 + t0)
                parts = [xs[f][:1]]
                if cfg.uses_cls_proj:
                    c = torch.stack([linear(xs[g][0], blk.cls_proj) for g in group])
                if cfg.use_local:
                    parts.append(blk.local_prompts.double()[0] + c)
                if cfg.num_global:
                    parts.append(visual.global_prompts.double()[li])
                n_pre = sum(p.shape[0] for p in parts)
                parts.append(xs[f][1:])
                if cfg.use_summary:
                    s = c + mha(layer_norm(c, blk.summary_ln), blk.summary_attn_layer, cfg.heads)
                    parts.append(s[f - g0][None])
                seq = torch.cat(parts)
                seq = seq + mha(layer_norm(seq, blk.norm1), blk.attn, cfg.heads)
                y = torch.cat([seq[:1], seq[n_pre:n_pre + cfg.num_patches]])
                hidden = act(linear(layer_norm(y, blk.norm2), blk.mlp.fc1), cfg.act)
                new_xs.append(y + linear(hidden, blk.mlp.fc2))
            xs = new_xs
        for f in range(t):
            out[vid, f] = layer_norm(xs[f][0], visual.ln_post) @ visual.proj.double()
    return out
