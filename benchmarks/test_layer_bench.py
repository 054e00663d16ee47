"""One ViT-B/16 layer with all prompts (8 local per clip, 8 global, a summary per frame), bf16
autocast: each backend's block_forward alone, inference (32 clips x 8 frames) and a training
forward + backward (16 clips x 8 frames). Splits the whole-model numbers into the layer's share."""
import pytest
import torch

from cuda_bench import bench_cuda, requires_cuda
from vitaclip import VitaCLIPConfig, backends
from vitaclip.model import is_trainable
from vitaclip.vision import VisionTransformer

BACKENDS = ["fast", "fast-compiled", "reference"]
CONFIG = VitaCLIPConfig.preset("ViT-B/16")


@pytest.fixture(scope="module")
def block():
    block = VisionTransformer(CONFIG).blocks[0].cuda()  # initialised
    for name, p in block.named_parameters():  # as in the model: the prompts and summary attention train
        p.requires_grad_(is_trainable(f"visual.blocks.0.{name}"))
    return block


def layer_inputs(block, clips, requires_grad):
    """(x, pending, global prompts) as a layer after the first gets them: the stream in fp32 and,
    without gradients, the previous layer's MLP output (the part of the residual left to this
    layer) in bf16; with gradients layers hand on the stream whole (fast._defers_residual)."""
    frames = clips * CONFIG.num_frames
    shape = (frames, CONFIG.num_patches + 1, CONFIG.width)
    x = torch.randn(*shape, device="cuda", requires_grad=requires_grad)
    pending = None if requires_grad else torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
    global_prompts = torch.randn(CONFIG.num_global, CONFIG.width, device="cuda", requires_grad=requires_grad)
    return x, pending, global_prompts


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_inference(benchmark, block, backend):
    forward = backends.resolve_backend(backend, torch.device("cuda")).block_forward
    x, pending, global_prompts = layer_inputs(block, 32, requires_grad=False)

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            forward(block, x, pending, global_prompts)

    benchmark.extra_info["ms"] = bench_cuda(benchmark, step) * 1e3


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_training(benchmark, block, backend):
    forward = backends.resolve_backend(backend, torch.device("cuda")).block_forward
    x, pending, global_prompts = layer_inputs(block, 16, requires_grad=True)
    trainable = [p for p in block.parameters() if p.requires_grad]

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            stream, mlp_out = forward(block, x, pending, global_prompts)
        loss = stream.float().square().mean() + (mlp_out.float().square().mean() if mlp_out is not None else 0)
        torch.autograd.grad(loss, [x, global_prompts, *trainable])

    torch.cuda.reset_peak_memory_stats()
    benchmark.extra_info["ms"] = bench_cuda(benchmark, step) * 1e3
    benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
