"""The reference model on CUDA: same logits as on the CPU, and sane in bf16/fp16 autocast."""
import pytest
import torch

from conftest import CLASSES, random_video, randomize_, tiny_config
from vitaclip import VitaCLIP

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_reference_on_cuda_matches_cpu_in_float64():
    model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend="reference")).double()
    video = random_video(model.config, frames=6).double()
    cpu = model(video)
    gpu = model.cuda()(video.cuda())
    assert torch.allclose(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)  # logits are taken in fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_autocast_on_cuda(dtype):
    model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend="reference")).cuda()
    video = random_video(model.config).cuda()
    ref = model(video)
    with torch.autocast("cuda", dtype=dtype):
        out = model(video)
    assert out.dtype == torch.float32
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
