"""Behaviour of the fused Triton prompt attention (kernels/prompt_attention.py and its wrapper
ops/attention.py) that mutation testing found unpinned by the other tests.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), tiny odd shapes, fp32 against the
float64 reference, as in test_prompt_attention.py."""

import pytest
import torch

from conftest import interpreter_only
from test_prompt_attention import assert_matches_reference, call, make_inputs, outputs_and_grads
from vitaclip.ops import attention, naive
from vitaclip.ops.attention import BACKWARDS, prompt_attention, triton_available, uses_triton

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")


def _head_dim_strided(t):
    """The same values with the head dim not contiguous in memory (stride H): [F, S, Dh, H] underneath."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@interpreter_only
@pytest.mark.parametrize("backward", BACKWARDS)
def test_q_k_v_with_a_strided_head_dim_match_the_reference(monkeypatch, backward):
    """q, k, v may have any strides, the head dim's included: the kernels read each with its own
    stride along Dh, not as if it were 1 (the other layout tests keep the head dim contiguous)."""
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    leaves = make_inputs(2, 2, 21, 2, 2, 3, True, packed=False, seed=3, head_dim=16)
    leaves.update({name: _head_dim_strided(leaves[name]) for name in "qkv"})
    assert all(leaves[name].stride(-1) == 2 for name in "qkv")
    assert_matches_reference(prompt_attention, leaves, 2)


@interpreter_only
def test_output_stays_finite_when_every_score_is_far_below_zero():
    """Softmax is shift-invariant: with every score of a query (own and prompt keys) shifted far below
    zero (by -156, -225 in the kernels' base 2), the output is the reference's. The running max starts at -inf,
    so no exp2 of a score underflows to a zero sum (a start at 0 gave NaN)."""
    head_dim, shift = 16, 25.0
    leaves = make_inputs(2, 2, 21, 1, 2, 3, True, seed=11, head_dim=head_dim)
    # component 0 of every query is +shift and of every key -shift: each score drops by shift**2 / sqrt(Dh)
    leaves["qkv"][..., 0, :, 0] = shift
    leaves["qkv"][..., 1, :, 0] = -shift
    for name in ("local_k", "global_k", "summary_k"):
        leaves[name][..., 0] = -shift
    want = call(naive.prompt_attention, leaves, 2)
    got = call("qkv", {name: t.float() for name, t in leaves.items()}, 2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_frame_offsets_fit_int32_only_below_two_to_the_31():
    """The kernels index within a frame in int32: a frame whose last element lies 2**31 - 1 elements
    after its first goes as is; one 2**31 after would wrap, so it is copied first (meta tensors:
    only shapes and strides matter)."""
    storage = torch.empty(2 ** 33, device="meta")
    fits = storage.as_strided((2, 2, 1, 1), (1, 2 ** 31 - 1, 1, 1))
    wraps = storage.as_strided((2, 2, 1, 1), (1, 2 ** 31, 1, 1))
    assert attention.MAX_FRAME_OFFSET == 2 ** 31
    assert attention._frame_offsets_fit(fits)
    assert not attention._frame_offsets_fit(wraps)


@pytest.mark.parametrize("frames_per_group", [0, -1])
def test_frames_per_group_below_one_is_rejected_without_local_prompts(frames_per_group):
    """frames_per_group is checked whatever prompts are given (without local prompts nothing else
    divides by it before the kernels do)."""
    q = torch.zeros(2, 5, 1, 16)
    g = torch.zeros(1, 1, 16)
    with pytest.raises(ValueError, match="frames_per_group must be a positive int"):
        prompt_attention(q, q, q, global_k=g, global_v=g, frames_per_group=frames_per_group)


@pytest.mark.parametrize("kind", ["local", "global", "summary"])
def test_prompt_values_of_another_shape_than_their_keys_are_rejected(kind):
    """Each prompt kind's values must have its keys' shape (the kernels index both with the keys'
    sizes): one prompt fewer in the values is named, not read past their end."""
    leaves = make_inputs(2, 2, 5, 1, 2, 3, True, dtype=torch.float32, head_dim=16)
    leaves[f"{kind}_v"] = leaves[f"{kind}_v"][:-1] if kind != "local" else leaves["local_v"][:, :-1]
    with pytest.raises(ValueError, match=f"{kind}_k/v must be"):
        call("qkv", leaves, 2)


@interpreter_only
@pytest.mark.parametrize("backward", BACKWARDS)
def test_a_non_contiguous_output_gradient_gets_the_reference_gradients(monkeypatch, backward):
    """The backward kernels index the output gradient as contiguous [F, S, H, Dh]: a gradient that
    reaches them in another layout (here the head dim strided) is made contiguous first."""
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    leaves = make_inputs(2, 2, 21, 2, 2, 3, True, seed=13, head_dim=16)
    grad_out = _head_dim_strided(torch.randn(4, 21, 2, 16, dtype=torch.float64))
    want_out, want_grads = outputs_and_grads(naive.prompt_attention, leaves, 2, grad_out)
    out, grads = outputs_and_grads("qkv", {name: t.float() for name, t in leaves.items()}, 2, grad_out)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-4)
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name].double(), want, atol=1e-5, rtol=1e-4, msg=name)


def test_the_interpreter_takes_cpu_tensors_only(monkeypatch):
    """Under TRITON_INTERPRET=1 the kernels run on CPU tensors; tensors on other non-CUDA devices
    (here meta) go to the reference."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert uses_triton(torch.zeros(1, 3, 1, 16))
    assert not uses_triton(torch.zeros(1, 3, 1, 16, device="meta"))
