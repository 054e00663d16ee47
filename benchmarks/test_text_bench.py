"""Text side of a training step: 400 class-specific prompts, forward + backward into the context.

Also which attention kernel suits the short truncated prompts (about 20 tokens, 8 heads): the
cuDNN kernel PyTorch picks on an H100 took 1.9 ms of the 5.8 ms a compiled step spent on the GPU
(benchmarks/RESULTS.md, run 3), so the other SDPA kernels are timed beside it, and vitaclip's
explicit attention (batched matmuls and a masked softmax in fp32, no padding to kernel tiles: the
default since run 4; VITACLIP_TEXT_ATTENTION=sdpa picks SDPA).
"""
import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cuda_bench import bench_cuda, check_graphed, requires_cuda
from vitaclip import VitaCLIP, VitaCLIPConfig
from vitaclip.backends import resolve_backend

N_CLASSES = 400
KERNELS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "math": SDPBackend.MATH, "explicit": None}


@requires_cuda
@pytest.mark.parametrize("truncate,kernel", [(True, "default"), (False, "default"), (True, "flash"),
                                             (True, "efficient"), (True, "math"), (True, "explicit"),
                                             (False, "explicit")],
                         ids=["truncated-sdpa", "full-77-sdpa", "truncated-flash", "truncated-efficient",
                              "truncated-math", "truncated-explicit", "full-77-explicit"])
def test_text_side_of_a_training_step(benchmark, monkeypatch, truncate, kernel):
    torch._dynamo.reset()  # compile afresh: a graph traced under another kernel choice keeps it
    # "explicit": vitaclip's own causal attention instead of SDPA (VITACLIP_TEXT_ATTENTION)
    monkeypatch.setenv("VITACLIP_TEXT_ATTENTION", "explicit" if kernel == "explicit" else "sdpa")
    classes = [f"action number {i} of the dataset" for i in range(N_CLASSES)]
    model = VitaCLIP(VitaCLIPConfig.preset("ViT-B/16"), classes).cuda()
    ctx = model.prompt_learner.ctx

    def kernels():  # a fresh context each step: sdpa_kernel's is single-use
        return sdpa_kernel(KERNELS[kernel]) if KERNELS[kernel] is not None else contextlib.nullcontext()

    def step():
        with kernels(), torch.autocast("cuda", dtype=torch.bfloat16):
            feats = model.encode_text(truncate=truncate)
        feats.float().square().mean().backward()
        ctx.grad = None

    median = bench_cuda(benchmark, step)
    benchmark.extra_info["ms_per_step"] = median * 1e3
    benchmark.extra_info["backend"] = resolve_backend(model.backend, torch.device("cuda")).name
    check_graphed(benchmark, model)
