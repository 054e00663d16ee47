"""Training-step and inference throughput of the engine's model step (clips/s in extra_info)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import bench_cuda, requires_cuda
from vitaclip import VitaCLIP, VitaCLIPConfig
from vitaclip.engine.precision import autocast

BATCH, FRAMES = 8, 8


def _model_and_batch(device):
    torch.manual_seed(0)
    model = VitaCLIP(VitaCLIPConfig.preset("ViT-B/16", num_frames=FRAMES), [f"class {i}" for i in range(400)])
    model.to(device)
    video = torch.randn(BATCH, 3, FRAMES, 224, 224, device=device)
    labels = torch.randint(400, (BATCH,), device=device)
    return model, video, labels


@requires_cuda
def test_train_step_vit_b16_bf16(benchmark):
    device = torch.device("cuda")
    model, video, labels = _model_and_batch(device)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)

    def step():
        with autocast(device, "bf16"):
            loss = F.cross_entropy(model(video), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = bench_cuda(benchmark, step, rounds=10)
    benchmark.extra_info["train_clips_per_s"] = BATCH / seconds


@requires_cuda
def test_inference_vit_b16_bf16(benchmark):
    device = torch.device("cuda")
    model, video, _ = _model_and_batch(device)
    model.eval()

    @torch.no_grad()
    def infer():
        with autocast(device, "bf16"):
            model(video)

    seconds = bench_cuda(benchmark, infer, rounds=10)
    benchmark.extra_info["inference_clips_per_s"] = BATCH / seconds
