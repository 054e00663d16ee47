"""Per-layer summary step s = c + MHSA(LN(c)) of ViT-B/16: the compiled op vs the PyTorch path.

B = 32 videos of T frames (one group each), C = 768, 12 heads, bf16; forward, and forward +
backward into c and every parameter. Each timed call runs STEPS summary steps back to back
and synchronises once, so launch overhead counts as it does inside the model. Launched
eagerly, and replayed from a CUDA graph (as the "fast-graphed" backend runs the model): the
GPU time alone, with the host's launch overhead gone.
"""
import pytest
import torch

from cuda_bench import bench_cuda, requires_cuda
from vitaclip.graphs import CapturedPass
from vitaclip.ops import naive, summary_ext
from vitaclip.vision import Attention

VIDEOS, WIDTH, HEADS, STEPS = 32, 768, 12, 20
PATHS = {"extension": summary_ext.summary_tokens, "pytorch": naive.summary_tokens}


@requires_cuda
@pytest.mark.skipif(not summary_ext.is_built(), reason="vitaclip._C not built")
@pytest.mark.parametrize("launch", ["eager", "cuda-graph"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("frames", [8, 16])
def test_summary_step(benchmark, frames, mode, path, launch):
    norm = torch.nn.LayerNorm(WIDTH).cuda().bfloat16()
    attn = Attention(WIDTH, HEADS).cuda().bfloat16()
    params = [*norm.parameters(), *attn.parameters()]
    c = torch.randn(VIDEOS, frames, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(c)
    fn = PATHS[path]

    def forward():
        with torch.no_grad():
            for _ in range(STEPS):
                fn(c, norm, attn, HEADS)

    def forward_backward():
        for _ in range(STEPS):
            torch.autograd.grad(fn(c, norm, attn, HEADS), [c, *params], grad)

    step = forward if mode == "forward" else forward_backward
    benchmark.group = f"summary T={frames} {mode} {launch}"
    if launch == "cuda-graph":  # captured as the model's graphed passes are
        step = CapturedPass(step, [], []).forward_graph.replay
    median = bench_cuda(benchmark, step, rounds=10)
    benchmark.extra_info["us_per_step"] = median / STEPS * 1e6
