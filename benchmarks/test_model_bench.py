"""Whole-model throughput, fast vs reference backend: ViT-B/16, 8 x 224 x 224 clips, bf16 autocast,
random weights, 400 classes. Records clips/s and peak memory in extra_info.

Targets on an H100 (fast backend): inference >= 1400 clips/s at batch 32; vision training step
(16 clips, forward + backward into the prompts, frozen backbone) >= 550 clips/s, peak <= 5 GB.
The vision step scores the clips against fixed text features (the target's definition); the
full step also runs the text side of 400 class-specific prompts (benchmarked alone in
test_text_bench.py).
"""
import pytest
import torch
import torch.nn.functional as F

from cuda_bench import bench_cuda, requires_cuda
from vitaclip import VitaCLIP, VitaCLIPConfig

# "fast-compiled" compiles its layer graph (once per shape and grad mode) in the first, untimed step;
# "fast-graphed" also captures its CUDA graphs there
BACKENDS = ["fast", "fast-compiled", "fast-graphed", "reference"]
INFERENCE_BATCH, TRAIN_BATCH, FRAMES = 32, 16, 8


@pytest.fixture(scope="module")
def model():
    classes = [f"action number {i}" for i in range(400)]
    return VitaCLIP(VitaCLIPConfig.preset("ViT-B/16"), classes).cuda()


def video(batch):
    return torch.randn(batch, 3, FRAMES, 224, 224, device="cuda")


def record(benchmark, median, clips):
    benchmark.extra_info["clips_per_s"] = clips / median
    benchmark.extra_info["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_throughput(benchmark, model, backend):
    model.set_backend(backend)
    model.eval()
    clips = video(INFERENCE_BATCH)

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(clips)

    torch.cuda.reset_peak_memory_stats()  # before the first step: a CUDA graph's capture is its peak
    step()
    record(benchmark, bench_cuda(benchmark, step, rounds=10), INFERENCE_BATCH)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_training_step_throughput(benchmark, model, backend):
    model.set_backend(backend)
    model.train()
    clips = video(TRAIN_BATCH)
    labels = torch.randint(0, 400, (TRAIN_BATCH,), device="cuda")
    text = F.normalize(torch.randn(400, model.config.embed_dim, device="cuda"), dim=-1)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            features = F.normalize(model.encode_video(clips).float(), dim=-1)
            loss = F.cross_entropy(model.logit_scale.exp() * features @ text.t(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()  # before the first step: a CUDA graph's capture is its peak
    step()
    record(benchmark, bench_cuda(benchmark, step, rounds=10), TRAIN_BATCH)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_throughput(benchmark, model, backend):
    model.set_backend(backend)
    model.train()
    clips = video(TRAIN_BATCH)
    labels = torch.randint(0, 400, (TRAIN_BATCH,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(clips), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()  # before the first step: a CUDA graph's capture is its peak
    step()
    record(benchmark, bench_cuda(benchmark, step, rounds=10), TRAIN_BATCH)
