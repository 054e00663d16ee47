"""The training loop on a GPU: bf16 and fp16 steps, CUDA RNG in checkpoints, resumption."""
import pytest
import torch

from engine_helpers import tiny_data, tiny_model, tiny_train_config
from vitaclip.engine import checkpoint as ckpt
from vitaclip.engine.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_train_and_resume_on_gpu(tmp_path, precision):
    cfg = dict(steps=4, precision=precision, device="cuda")
    full = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "full", **cfg))
    assert all(torch.isfinite(torch.tensor(v)) for v in full.losses.values())
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "part", stop_after=2, **cfg))
    payload = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "part"))
    assert "cuda" in payload["rng"][0]
    rest = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "part", resume="auto", **cfg))
    for step in (3, 4):  # GPU kernels may reorder sums: equal up to rounding
        assert rest.losses[step] == pytest.approx(full.losses[step], rel=1e-3, abs=1e-4)
