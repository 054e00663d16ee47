"""Triton kernels: CLIP's QuickGELU, y = x * sigmoid(1.702 x), in one pass each way.

In eager PyTorch the activation is three elementwise kernels (scale, sigmoid, product) over
the MLP's 4C-wide hidden tensor, the widest activation of a layer; here it is one read and
one write, computed in fp32 whatever the storage dtype.
"""
import triton
import triton.language as tl

QUICK_GELU_SLOPE = 1.702


@triton.jit
def _quick_gelu_fwd(X, Y, n, SLOPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + offs, (x * tl.sigmoid(SLOPE * x)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _quick_gelu_bwd(X, DY, DX, n, SLOPE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(SLOPE * x)
    tl.store(DX + offs, (dy * (s + SLOPE * x * s * (1.0 - s))).to(DX.dtype.element_ty), mask=mask)
