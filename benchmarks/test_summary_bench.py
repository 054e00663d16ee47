"""Per-layer summary step s = c + MHSA(LN(c)) of ViT-B/16: the compiled op vs the PyTorch path.

B = 32 videos of T frames (one group each), C = 768, 12 heads, in bf16 (parameters too) or under
bf16 autocast with fp32 parameters (as the model trains: the casts of the parameters count);
forward, and forward + backward into c and every parameter. Each timed call runs STEPS summary steps back to back
and synchronises once, so launch overhead counts as it does inside the model. Launched
eagerly, and replayed from a CUDA graph (as the "fast-graphed" backend runs the model): the
GPU time alone, with the host's launch overhead gone. The host's share alone is timed on the CPU
too (`test_summary_step_host_time`, on any machine).
"""
import pytest
import torch

from cuda_bench import LAUNCHES, bench_cuda, launched, requires_cuda
from vitaclip.ops import naive, summary_ext
from vitaclip.vision import Attention

VIDEOS, WIDTH, HEADS, STEPS = 32, 768, 12, 20
PATHS = {"extension": summary_ext.summary_tokens, "pytorch": naive.summary_tokens}


@requires_cuda
@pytest.mark.skipif(not summary_ext.is_built(), reason="vitaclip._C not built")
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("frames", [8, 16])
@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_summary_step(benchmark, precision, frames, mode, path, launch):
    param_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    norm = torch.nn.LayerNorm(WIDTH).cuda().to(param_dtype)
    attn = Attention(WIDTH, HEADS).cuda().to(param_dtype)
    params = [*norm.parameters(), *attn.parameters()]
    c = torch.randn(VIDEOS, frames, WIDTH, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn_like(c)
    fn = PATHS[path]

    def summary():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "autocast"):
            return fn(c, norm, attn, HEADS)

    def forward():
        with torch.no_grad():
            for _ in range(STEPS):
                summary()

    def forward_backward():
        for _ in range(STEPS):
            torch.autograd.grad(summary(), [c, *params], grad)

    benchmark.group = f"summary {precision} T={frames} {mode} {launch}"
    median = bench_cuda(benchmark, launched(forward if mode == "forward" else forward_backward, launch), rounds=10)
    benchmark.extra_info["us_per_step"] = median / STEPS * 1e6


HOST_WIDTH, HOST_STEPS = 16, 200


@pytest.mark.skipif(not summary_ext.is_built(), reason="vitaclip._C not built")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_summary_step_host_time(benchmark, mode, path):
    """The host's time per summary step, which bounds an eager step on the GPU (there the kernels of
    32 clips took under a quarter of it, RESULTS run 4): the same calls on the CPU, on tensors so
    small (one group of 8 frames, width 16, 2 heads) that their arithmetic costs next to nothing."""
    norm, attn = torch.nn.LayerNorm(HOST_WIDTH), Attention(HOST_WIDTH, 2)
    params = [*norm.parameters(), *attn.parameters()]
    c = torch.randn(1, 8, HOST_WIDTH, requires_grad=True)
    grad = torch.randn_like(c)
    fn = PATHS[path]

    def forward():
        with torch.no_grad():
            for _ in range(HOST_STEPS):
                fn(c, norm, attn, 2)

    def forward_backward():
        for _ in range(HOST_STEPS):
            torch.autograd.grad(fn(c, norm, attn, 2), [c, *params], grad)

    benchmark.group = f"summary host time {mode}"
    benchmark.pedantic(forward if mode == "forward" else forward_backward, rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info["us_per_step"] = benchmark.stats.stats.median / HOST_STEPS * 1e6
