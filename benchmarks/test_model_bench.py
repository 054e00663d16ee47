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

from cuda_bench import bench_cuda, check_graphed, requires_cuda
from model_steps import inference_step, make_model, training_step

# "fast-compiled" compiles its layer graph (once per shape and grad mode) in the first, untimed step;
# "fast-graphed" also captures its CUDA graphs there
BACKENDS = ["fast", "fast-compiled", "fast-graphed", "reference"]
INFERENCE_BATCH, TRAIN_BATCH = 32, 16
STEPS = {"inference": lambda model: inference_step(model, INFERENCE_BATCH),
         "vision_training": lambda model: training_step(model, TRAIN_BATCH, vision_only=True),
         "training": lambda model: training_step(model, TRAIN_BATCH)}
CLIPS = {"inference": INFERENCE_BATCH, "vision_training": TRAIN_BATCH, "training": TRAIN_BATCH}


@pytest.fixture(scope="module")
def model():
    return make_model()


def time_step(benchmark, model, backend, kind):
    model.set_backend(backend)
    step = STEPS[kind](model)
    # what earlier benchmarks left (their graphs, the fast layers' weights in bf16) holds memory
    # that this one's peak would not count, or would count without using it
    model._graphs.clear()
    for block in model.visual.blocks:
        block.derived.clear()
    torch.cuda.empty_cache()
    step()  # compiles (with GEMM autotuning, its trial buffers); a graph is captured at the second call
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    median = bench_cuda(benchmark, step, rounds=10)
    benchmark.extra_info["clips_per_s"] = CLIPS[kind] / median
    benchmark.extra_info["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    benchmark.extra_info["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30  # graph pools too
    check_graphed(benchmark, model)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_inference_throughput(benchmark, model, backend):
    time_step(benchmark, model, backend, "inference")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_training_step_throughput(benchmark, model, backend):
    time_step(benchmark, model, backend, "vision_training")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_throughput(benchmark, model, backend):
    time_step(benchmark, model, backend, "training")
