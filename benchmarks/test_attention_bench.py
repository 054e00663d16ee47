"""Fused prompt attention vs PyTorch SDPA on the materialised sequences (ViT-B/16, bf16).

Batch 32 clips x 8 frames (F = 256), 1 + 14x14 own tokens, 12 heads of 64, 8 local prompts
per clip, 8 global prompts, a summary token per frame. SDPA's time includes building the
extended key/value sequences, as the reference layer must. Launched eagerly (the fused op's
several Triton launches cost the host tens of microseconds each) and replayed from a CUDA graph
(the GPU time alone, as the compiled and graphed backends run it).
"""
import pytest
import torch
import torch.nn.functional as F

from cuda_bench import LAUNCHES, bench_cuda, launched, requires_cuda
from vitaclip.ops import naive
from vitaclip.ops.attention import BACKWARDS, prompt_attention_qkv

FRAMES, T0, SEQ, HEADS, HEAD_DIM, N_GLOBAL = 256, 8, 197, 12, 64, 8


def sdpa_prompt_attention(qkv, local_k, local_v, global_k, global_v, summary_k, summary_v, frames_per_group):
    q, k, v = qkv.unbind(2)
    keys = naive.gather_prompt_kv(k, local_k, global_k, summary_k, frames_per_group)
    values = naive.gather_prompt_kv(v, local_v, global_v, summary_v, frames_per_group)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
    return out.transpose(1, 2)


IMPLS = {"fused": prompt_attention_qkv, "sdpa": sdpa_prompt_attention}  # both from a packed qkv


def make_inputs(requires_grad):
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)

    qkv = rand(FRAMES, SEQ, 3, HEADS, HEAD_DIM)
    prompts = [rand(FRAMES // T0, T0, HEADS, HEAD_DIM), rand(FRAMES // T0, T0, HEADS, HEAD_DIM),
               rand(N_GLOBAL, HEADS, HEAD_DIM), rand(N_GLOBAL, HEADS, HEAD_DIM),
               rand(FRAMES, HEADS, HEAD_DIM), rand(FRAMES, HEADS, HEAD_DIM)]
    return qkv, prompts


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_attention_forward(benchmark, impl, launch):
    fn = IMPLS[impl]
    qkv, prompts = make_inputs(requires_grad=False)
    benchmark.group = f"attention forward {launch}"
    median = bench_cuda(benchmark, launched(lambda: fn(qkv, *prompts, T0), launch))
    benchmark.extra_info["ms"] = median * 1e3


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("impl", [*IMPLS, *(f"fused-backward-{kind}" for kind in BACKWARDS if kind != "split")])
def test_attention_forward_backward(benchmark, monkeypatch, impl, launch):
    """"fused": the fused op with its default backward kernels ("split": dQ, then dK/dV);
    "fused-backward-KIND": with VITACLIP_ATTENTION_BACKWARD=KIND."""
    if impl.startswith("fused-backward-"):
        monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", impl[len("fused-backward-"):])
    fn = IMPLS[impl.split("-")[0]]
    qkv, prompts = make_inputs(requires_grad=True)
    grad_out = torch.randn(FRAMES, SEQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    leaves = [qkv, *prompts]

    def step():
        torch.autograd.grad(fn(qkv, *prompts, T0), leaves, grad_out)

    benchmark.group = f"attention forward+backward {launch}"
    median = bench_cuda(benchmark, launched(step, launch))
    benchmark.extra_info["ms"] = median * 1e3
