"""The last layer's one-query attention (ops/class_attention.py) against the naive reference
with the class token's query row: forward and every gradient, in float64 and in fp32 against
float64, at odd shapes (T0 = 1, 3, 8; 0, 1 or 8 global prompts; with and without local and
summary prompts)."""
import pytest
import torch

from vitaclip.ops import naive
from test_prompt_attention import make_inputs
from vitaclip.ops.class_attention import PROMPT_NAMES, class_token_attention

SEQ = 50  # 7x7 patches + cls


def inputs(frames_per_group, n_global, local, summary, heads, dtype=torch.float64):
    """The prompt attention tests' inputs, with the class token's query row alone."""
    leaves = make_inputs(2, frames_per_group, SEQ, heads, frames_per_group if local else 0, n_global, summary,
                         dtype=dtype, packed=False, seed=frames_per_group * 100 + n_global * 10 + heads)
    leaves["q"] = leaves["q"][:, 0].contiguous()
    return leaves


def reference(q, k, v, frames_per_group, **prompts):
    """naive.prompt_attention with the class token's query as the only row; its other rows are
    arbitrary (the reference gives each row its own softmax)."""
    rows = torch.cat([q.unsqueeze(1), torch.zeros_like(k[:, 1:])], dim=1)
    return naive.prompt_attention(rows, k, v, frames_per_group=frames_per_group, **prompts)[:, 0]


def one_query(q, k, v, frames_per_group, **prompts):
    return class_token_attention(q, k, v, [prompts.get(name) for name in PROMPT_NAMES], frames_per_group)


def outputs_and_grads(fn, leaves, frames_per_group, grad_out):
    leaves = {name: t.detach().requires_grad_(True) for name, t in leaves.items()}
    out = fn(frames_per_group=frames_per_group, **leaves)
    return out, dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))))


@pytest.mark.parametrize("frames_per_group,n_global,local,summary,heads", [
    (1, 0, True, False, 1), (3, 1, True, True, 2), (8, 8, False, True, 1), (3, 8, True, False, 2),
    (2, 0, False, False, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_class_token_attention_matches_reference(frames_per_group, n_global, local, summary, heads, dtype):
    leaves = inputs(frames_per_group, n_global, local, summary, heads)
    grad_out = torch.randn(leaves["q"].shape, dtype=torch.float64)
    want, want_grads = outputs_and_grads(reference, leaves, frames_per_group, grad_out)
    got, grads = outputs_and_grads(one_query, {n: t.to(dtype) for n, t in leaves.items()},
                                   frames_per_group, grad_out)
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.double(), want, **tol)
    assert grads.keys() == want_grads.keys()
    for name, ref in want_grads.items():
        torch.testing.assert_close(grads[name].double(), ref, msg=name, **tol)


def test_class_token_attention_runs_in_fp32_under_autocast():
    leaves = inputs(3, 2, True, True, 2)
    want = reference(frames_per_group=3, **leaves)
    low = {n: t.to(torch.bfloat16) for n, t in leaves.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = one_query(frames_per_group=3, **low)
    assert got.dtype == torch.bfloat16
    # the inputs' rounding to bf16, not the computation's, bounds the error
    torch.testing.assert_close(got.double(), want, atol=0.1, rtol=0.05)
    exact = reference(frames_per_group=3, **{n: t.double() for n, t in low.items()})
    torch.testing.assert_close(got.double(), exact, atol=1e-2, rtol=1e-2)


def test_bad_shapes_are_rejected():
    leaves = inputs(3, 0, True, False, 2)
    q, k, v = leaves.pop("q"), leaves.pop("k"), leaves.pop("v")
    with pytest.raises(ValueError, match="needs k and v"):
        one_query(q[:, :1], k, v, 3, **leaves)
    with pytest.raises(ValueError, match="not groups of 4"):  # local prompts need whole groups
        one_query(q, k, v, 4, **leaves)
    assert one_query(q, k, v, 4).shape == q.shape  # without them any frame count is whole


@pytest.mark.parametrize("frames_per_group", [0, -1, 1.5])
def test_a_frames_per_group_that_is_no_positive_int_is_rejected_with_or_without_local_prompts(frames_per_group):
    """As prompt_attention: 0 divided by zero, and -1 ran, without local prompts too."""
    q, k = torch.randn(4, 2, 8), torch.randn(4, 5, 2, 8)
    with pytest.raises(ValueError, match=f"frames_per_group must be a positive int, got {frames_per_group}"):
        class_token_attention(q, k, k.clone(), frames_per_group=frames_per_group)
