"""The compiled summary op's CUDA kernels against a float64 reference (needs a GPU; seconds).

Criterion (assert_no_worse_than_pytorch): per output and gradient, the op's error against
float64 is at most twice the PyTorch path's error in the same dtype, plus a small floor.
"""
import pytest
import torch

from vitaclip.ops import naive, summary_ext
from test_summary_ext import assert_no_worse_than_pytorch, make_summary_layer, output_and_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not summary_ext.is_built(), reason="vitaclip._C not built")]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("width,heads", [(768, 12), (1024, 16), (256, 2)],
                         ids=["768x12", "1024x16", "head-dim-128"])
@pytest.mark.parametrize("frames", [1, 3, 8, 16, 32])
def test_cuda_matches_float64(frames, width, heads, dtype):
    norm, attn = make_summary_layer(width, heads, dtype=torch.float64, device="cuda", seed=frames)
    c = torch.randn(6, frames, width, dtype=torch.float64, device="cuda")
    grad = torch.randn_like(c)
    reference = output_and_grads(naive.summary_tokens, c, norm, attn, heads, grad)
    reference = [reference[0], *reference[1]]
    norm, attn = norm.to(dtype), attn.to(dtype)
    c, grad = c.to(dtype), grad.to(dtype)
    out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, heads, grad)
    ref_out, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, heads, grad)
    assert out.dtype == dtype and out.is_cuda
    floor = 1e-5 if dtype == torch.float32 else 1e-2
    assert_no_worse_than_pytorch([out, *grads], [ref_out, *ref_grads], reference, floor)
