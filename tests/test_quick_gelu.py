"""The fused QuickGELU op against the model's QuickGELU module (float64), value and gradient."""
import os

import pytest
import torch

from vitaclip.ops.attention import triton_available
from vitaclip.vision import QuickGELU

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton on CUDA or Triton's CPU interpreter")


def test_quick_gelu_matches_module_in_float64():
    from vitaclip.ops.activation import quick_gelu

    x = (torch.randn(3, 50, 37, dtype=torch.float64, device=DEVICE) * 4).requires_grad_(True)  # 2.7 blocks
    grad_out = torch.randn_like(x)
    want = QuickGELU()(x)
    (want_grad,) = torch.autograd.grad(want, x, grad_out)
    x32 = x.detach().float().requires_grad_(True)
    got = quick_gelu(x32)
    (got_grad,) = torch.autograd.grad(got, x32, grad_out.float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-6, rtol=1e-5)
    torch.library.opcheck(torch.ops.vitaclip.quick_gelu.default, (x32.detach()[:, :7].requires_grad_(True),))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_quick_gelu_bf16_on_gpu():
    from vitaclip.ops.activation import quick_gelu

    x = torch.randn(64, 197, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    got = quick_gelu(x)
    want = QuickGELU()(x.detach().double())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=1e-2)
    got.float().sum().backward()
    assert torch.isfinite(x.grad).all()
