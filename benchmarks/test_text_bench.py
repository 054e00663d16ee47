"""Text side of a training step: 400 class-specific prompts, forward + backward into the context."""
import pytest
import torch

from cuda_bench import bench_cuda, requires_cuda
from vitaclip import VitaCLIP, VitaCLIPConfig

N_CLASSES = 400


@requires_cuda
@pytest.mark.parametrize("truncate", [True, False], ids=["truncated", "full-77"])
def test_text_side_of_a_training_step(benchmark, truncate):
    classes = [f"action number {i} of the dataset" for i in range(N_CLASSES)]
    model = VitaCLIP(VitaCLIPConfig.preset("ViT-B/16"), classes).cuda()
    ctx = model.prompt_learner.ctx

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            feats = model.encode_text(truncate=truncate)
        feats.float().square().mean().backward()
        ctx.grad = None

    median = bench_cuda(benchmark, step)
    benchmark.extra_info["ms_per_step"] = median * 1e3
