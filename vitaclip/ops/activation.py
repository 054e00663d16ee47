"""QuickGELU as one fused Triton op (forward and backward), for tensors the Triton kernels can
take (see `attention.uses_triton`); the model's `vision.QuickGELU` module is its reference."""
from __future__ import annotations

import torch
from torch import Tensor

from .attention import launch_device, triton_available

if triton_available():
    import triton

    from vitaclip.kernels import quick_gelu as _kernels

_BLOCK = 2048


def _launch(kernel, *tensors: Tensor) -> Tensor:
    """kernel over the elements of `tensors` in memory order: each is made contiguous (a no-op for the
    model's, which `quick_gelu` makes so), and so is the result."""
    tensors = [t.contiguous() for t in tensors]
    out = torch.empty_like(tensors[0], memory_format=torch.contiguous_format)
    n = out.numel()
    with launch_device(out):
        kernel[(triton.cdiv(n, _BLOCK),)](*tensors, out, n, SLOPE=_kernels.QUICK_GELU_SLOPE, BLOCK=_BLOCK,
                                          num_warps=8)
    return out


@torch.library.custom_op("vitaclip::quick_gelu", mutates_args=())
def _quick_gelu_op(x: Tensor) -> Tensor:
    return _launch(_kernels._quick_gelu_fwd, x)


@_quick_gelu_op.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("vitaclip::quick_gelu_backward", mutates_args=())
def _quick_gelu_backward_op(x: Tensor, grad_out: Tensor) -> Tensor:
    return _launch(_kernels._quick_gelu_bwd, x, grad_out)


@_quick_gelu_backward_op.register_fake
def _(x, grad_out):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad_out):
    return _quick_gelu_backward_op(ctx.saved_tensors[0], grad_out)


_quick_gelu_op.register_autograd(_backward, setup_context=_setup_context)


def quick_gelu(x: Tensor) -> Tensor:
    """x * sigmoid(1.702 x), computed in fp32 and stored in x's dtype."""
    return _quick_gelu_op(x.contiguous())
