"""Behaviour of the compiled summary op (csrc/summary_attention*.{h,cpp}, its CPU kernels, and
vitaclip/ops/summary_ext.py) that mutation testing found unpinned by the other tests.

Each test compares with the plain PyTorch path (`naive.summary_tokens`) or a small computation
of its own, at odd sizes; those needing the built op skip as the other summary tests do.
"""
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from test_summary_ext import backward_arguments, make_summary_layer, op_args, output_and_grads, parameters_of
from test_summary_review import needs_ext
from vitaclip.ops import naive, summary_ext

NAMES = ["c", "ln.weight", "ln.bias", "q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias",
         "out.weight", "out.bias"]


def assert_matches_naive(c, norm, attn, heads, grad, atol=1e-10, rtol=1e-10):
    """Output and every gradient of the op as those of the PyTorch path (float64 inputs: tight)."""
    out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, heads, grad)
    ref, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, heads, grad)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    for name, got, want in zip(NAMES, grads, ref_grads):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"grad of {name}: {m}")


@needs_ext
def test_the_layer_norms_own_eps_is_used():
    """The op normalises with the LayerNorm's eps (passed on by summary_tokens and used by the CPU
    kernel), not the default 1e-5 every other test's LayerNorm has."""
    norm, attn = make_summary_layer(12, 3, dtype=torch.float64)
    norm.eps = 0.3  # of the order of the variance: a wrong eps changes everything
    c = torch.randn(3, 5, 12, dtype=torch.float64) * 0.7
    assert_matches_naive(c, norm, attn, 3, torch.randn(3, 5, 12, dtype=torch.float64))


@needs_ext
def test_softmax_is_stable_for_large_scores():
    """Attention scores far beyond exp's float32 range (~88) give the PyTorch path's result,
    not inf / inf = NaN: the softmax subtracts each row's maximum."""
    norm, attn = make_summary_layer(12, 2)
    with torch.no_grad():  # q . k / sqrt(6) of the order of 1e3
        attn.q_proj.weight.mul_(30)
        attn.k_proj.weight.mul_(30)
    c, grad = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, 2, grad)
    ref, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, 2, grad)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for name, got, want in zip(NAMES, grads, ref_grads):
        assert torch.isfinite(got).all(), name
        scale = want.abs().max().clamp_min(1)
        torch.testing.assert_close(got / scale, want / scale, atol=1e-3, rtol=0, msg=lambda m: f"{name}: {m}")


def strided(t):
    """The same values as a non-contiguous view (every other element of a larger tensor)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    wide[..., ::2] = t.detach()
    return wide[..., ::2]


@needs_ext
def test_non_contiguous_parameters_and_gradients():
    """Parameters that are non-contiguous views (e.g. a slice of a packed tensor) and the expanded
    gradient of out.sum() are read by value, not as if they were contiguous."""
    norm, attn = make_summary_layer(10, 2, dtype=torch.float64)
    for module, name in [(norm, "weight"), (norm, "bias"), (attn.q_proj, "bias"), (attn.v_proj, "bias"),
                         (attn.out_proj, "weight"), (attn.out_proj, "bias")]:
        view = strided(getattr(module, name))
        assert not view.is_contiguous()
        setattr(module, name, nn.Parameter(view))
        assert not getattr(module, name).is_contiguous()
    c = torch.randn(3, 5, 10, dtype=torch.float64)
    assert_matches_naive(c, norm, attn, 2, torch.randn(3, 5, 10, dtype=torch.float64))
    ones = torch.ones(1, 1, 1, dtype=torch.float64).expand(3, 5, 10)  # out.sum()'s gradient
    assert_matches_naive(c, norm, attn, 2, ones)


@needs_ext
def test_backward_op_reads_non_contiguous_saved_tensors_by_value():
    """The public backward op given the forward's saved tensors as non-contiguous views computes
    what it computes from contiguous ones."""
    norm, attn = make_summary_layer(10, 2, dtype=torch.float64)
    args = backward_arguments(op_args(torch.randn(3, 5, 10, dtype=torch.float64), norm, attn, 2),
                              torch.randn(3, 5, 10, dtype=torch.float64))
    want = torch.ops.vitaclip.summary_attention_backward(*args)
    for index in range(10):  # grad_out, c, normed, qkv, heads_out, mean, rstd, ln_weight, qkv_params, out_weight
        views = list(args)
        views[index] = strided(args[index])
        got = torch.ops.vitaclip.summary_attention_backward(*views)
        for name, g, w in zip(["c", "ln.weight", "ln.bias", "qkv.weight", "qkv.bias", "out.weight", "out.bias"],
                              got, want):
            torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12, msg=lambda m: f"arg {index}, {name}: {m}")


@needs_ext
@pytest.mark.parametrize("index, shape, message", [
    (2, (15, 11), "normed has shape"), (3, (15, 29), "qkv has shape"), (3, (14, 30), "qkv has shape"),
    (4, (15, 9), "heads_out has shape"), (5, (14,), "mean must be"), (6, (16,), "rstd must be")])
def test_backward_op_refuses_mis_sized_saved_tensors(index, shape, message):
    """A saved tensor of the wrong size (not just the wrong dtype) is a clear error, not an
    out-of-bounds read: normed, qkv and heads_out by shape, mean and rstd by their length."""
    norm, attn = make_summary_layer(10, 2)
    args = backward_arguments(op_args(torch.randn(3, 5, 10), norm, attn, 2))
    args[index] = torch.randn(shape, dtype=args[index].dtype)
    with pytest.raises(ValueError, match=message):
        torch.ops.vitaclip.summary_attention_backward(*args)


class NoGradient(torch.autograd.Function):
    """Identity whose backward returns no gradient (None), as some custom functions do."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return None


@needs_ext
def test_an_undefined_incoming_gradient_gives_no_gradients():
    """When the op's output gets no gradient (a function after it returns None), the backward
    returns none either, rather than calling the backward op on an undefined tensor."""
    norm, attn = make_summary_layer(10, 2)
    c = torch.randn(2, 3, 10, requires_grad=True)
    out = summary_ext.summary_tokens(c, norm, attn, 2)
    loss = NoGradient.apply(out).sum() + c.sum()
    grads = torch.autograd.grad(loss, [c, *parameters_of(norm, attn)], allow_unused=True)
    torch.testing.assert_close(grads[0], torch.ones_like(c))
    assert all(g is None or not g.any() for g in grads[1:])


def real_and_fake(op, args):
    """op(*args), and op on fake copies of the tensors (the registered fake kernel)."""
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    return real, fake


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_fake_kernels_give_the_real_shapes_and_dtypes(dtype):
    """The fake (meta) kernels torch.compile traces with give every output's shape and dtype, the
    statistics mean and rstd in float32 for half precision and float64 for float64."""
    norm, attn = make_summary_layer(10, 2, dtype=dtype)
    args = op_args(torch.randn(3, 5, 10, dtype=dtype), norm, attn, 2)
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    real, fake = real_and_fake(torch.ops.vitaclip.summary_attention.default, args)
    assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in fake]
    assert real[4].dtype == real[5].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    back_args = backward_arguments(args, torch.randn(3, 5, 10, dtype=dtype))
    real, fake = real_and_fake(torch.ops.vitaclip.summary_attention_backward.default, back_args)
    assert [(r.shape, r.dtype) for r in real] == [(f.shape, f.dtype) for f in fake]


def test_a_cuda_device_without_index_asks_about_the_current_gpu(monkeypatch):
    """runs_on(torch.device("cuda")) asks the driver about the current GPU, not GPU None."""
    asked = []
    monkeypatch.setattr(summary_ext, "KERNEL_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(summary_ext, "_RUNS_ON_GPU", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.ops.vitaclip, "cuda_kernels_run_on", lambda index: asked.append(index) or True,
                        raising=False)
    assert summary_ext.runs_on(torch.device("cuda"))
    assert asked == [3]


@pytest.mark.parametrize("dtype, acc_bytes", [(torch.float32, 4), (torch.bfloat16, 4), (torch.float64, 8)])
def test_shared_memory_need_is_the_backward_kernels_layout(monkeypatch, dtype, acc_bytes):
    """A CUDA shape fits exactly when the attention backward's shared memory fits the GPU's limit:
    q, k, v and dO rows of head dim + 1 and two T x T matrices, in the accumulation type (float,
    double for float64); one byte less and it takes the PyTorch path."""
    frames, heads, head_dim = 5, 3, 7
    needed = (4 * frames * (head_dim + 1) + 2 * frames * frames) * acc_bytes
    c = SimpleNamespace(device=torch.device("cuda", 1), shape=(2, frames, heads * head_dim), dtype=dtype)
    for limit, fits in [(needed, True), (needed - 1, False)]:
        monkeypatch.setattr(summary_ext, "shared_memory_per_block", lambda index: limit if index == 1 else 0)
        assert summary_ext.shared_memory_fits(c, heads) == fits, limit
