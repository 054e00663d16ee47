"""Properties of the fast-path wrappers that the other tests left open (found by mutation testing):
prompt keys/values of any strides, the custom ops' result dtypes in half precision (real and fake
alike), rejection of prompts of another dtype, the QuickGELU backward's fake strides, and lse
staying out of autograd, prompt and qkv shape checks, a plain-GELU model's activation on the fast path."""
import copy
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import CLASSES, interpreter_only, random_video, randomize_, tiny_config
from vitaclip import VitaCLIP, backends
from vitaclip.ops import naive
from vitaclip.ops.attention import prompt_attention, prompt_attention_qkv, triton_available

pytestmark = [
    pytest.mark.skipif(not triton_available(), reason="Triton is not installed"),
    interpreter_only,
]

DH = 16
PROMPT_NAMES = ("local_k", "local_v", "global_k", "global_v", "summary_k", "summary_v")


def _inputs(dtype=torch.float64, n_groups=2, fpg=2, seq=20, heads=2, n_local=2, n_global=3, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    n_frames = n_groups * fpg
    return dict(qkv=rand(n_frames, seq, 3, heads, DH),
                local_k=rand(n_groups, n_local, heads, DH), local_v=rand(n_groups, n_local, heads, DH),
                global_k=rand(n_global, heads, DH), global_v=rand(n_global, heads, DH),
                summary_k=rand(n_frames, heads, DH), summary_v=rand(n_frames, heads, DH))


def _strided(t):
    """The same values in a non-contiguous layout: the last two dims swapped in memory."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def test_prompt_keys_and_values_of_any_strides_match_the_reference():
    """The kernels index prompts as contiguous: strided prompt views (e.g. of a bigger projection) must
    be made so, not read as if they were."""
    fpg = 2
    leaves = _inputs()
    grad_out = torch.randn(4, 20, 2, DH, dtype=torch.float64)

    def run(leaves, fn):
        leaves = {n: t.detach().requires_grad_(True) for n, t in leaves.items()}
        prompts = {n: _strided(leaves[n]) for n in PROMPT_NAMES}
        assert not any(p.is_contiguous() for p in prompts.values())
        q, k, v = leaves["qkv"].unbind(2)
        out = fn(q, k, v, **prompts, frames_per_group=fpg)
        return out, dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))))

    want, want_grads = run(leaves, naive.prompt_attention)
    got, got_grads = run({n: t.float() for n, t in leaves.items()}, prompt_attention)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    for name, want_grad in want_grads.items():
        torch.testing.assert_close(got_grads[name].double(), want_grad, atol=1e-5, rtol=1e-4, msg=name)


def _op_args(leaves, fpg):
    return (leaves["qkv"], None, None, *(leaves[n] for n in PROMPT_NAMES), fpg)


def test_forward_op_fake_says_the_real_dtypes_in_half_precision():
    """lse is fp32 whatever the inputs' dtype, in the real op and its fake implementation."""
    args = _op_args(_inputs(torch.float16), 2)
    real = torch.ops.vitaclip.prompt_attention.default(*args)
    assert [t.dtype for t in real] == [torch.float16, torch.float32]
    with FakeTensorMode() as mode:
        fake = torch.ops.vitaclip.prompt_attention.default(
            *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


def test_backward_op_returns_gradients_in_the_inputs_dtype_as_its_fake_says():
    """Shared prompt gradients are reduced in fp32 and cast back: every gradient the backward op
    returns has the inputs' dtype (and the fake's shape and dtype)."""
    leaves = _inputs(torch.float16)
    args = _op_args(leaves, 2)
    out, lse = torch.ops.vitaclip.prompt_attention.default(*args)
    grad_out = torch.randn_like(out)
    bwd_args = (grad_out, *args[:-1], out, lse, 2)
    real = torch.ops.vitaclip.prompt_attention_backward.default(*bwd_args)
    assert all(t.dtype == torch.float16 for t in real), [t.dtype for t in real]
    with FakeTensorMode() as mode:
        fake = torch.ops.vitaclip.prompt_attention_backward.default(
            *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in bwd_args))
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]


@pytest.mark.parametrize("name", PROMPT_NAMES)
def test_prompts_of_another_dtype_are_rejected(name):
    leaves = _inputs(torch.float32)
    leaves[name] = leaves[name].double()
    prompts = {n: leaves[n] for n in PROMPT_NAMES}
    with pytest.raises(ValueError, match=f"{name} is torch.float64"):
        prompt_attention_qkv(leaves["qkv"], **prompts, frames_per_group=2)


def test_lse_is_not_differentiable():
    leaves = {n: t.float().requires_grad_(True) for n, t in _inputs().items()}
    out, lse = torch.ops.vitaclip.prompt_attention.default(*_op_args(leaves, 2))
    assert out.requires_grad and not lse.requires_grad


def test_quick_gelu_backward_fake_matches_real_for_a_non_contiguous_grad():
    from vitaclip.ops import activation  # registers the ops

    assert activation.triton_available()
    op = torch.ops.vitaclip.quick_gelu_backward.default
    x, grad_out = torch.randn(10, 6), torch.randn(6, 10).t()
    real = op(x, grad_out)
    with FakeTensorMode() as mode:
        fake = op(mode.from_tensor(x), mode.from_tensor(grad_out))
    assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)


def test_fast_model_with_plain_gelu_keeps_gelu(monkeypatch):
    """Only a QuickGELU MLP gets the fused Triton QuickGELU: act="gelu" stays nn.GELU."""
    backends.available_backends()  # registers the fast backends
    monkeypatch.setitem(backends._BACKENDS, "fast",
                        dataclasses.replace(backends._BACKENDS["fast"], is_available=lambda device: True))
    config = tiny_config(act="gelu")
    model = randomize_(VitaCLIP(config, classnames=CLASSES, backend="fast"))
    reference = copy.deepcopy(model).double()
    reference.set_backend("reference")
    video = random_video(config, batch=1)
    with torch.no_grad():
        got, want = model(video), reference(video.double())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name,shape,match", [
    ("global", (3, 3, DH), "global_k/v must be"),      # another head count
    ("global", (3, 2, 2 * DH), "global_k/v must be"),  # another head dim
    ("local", (3, 2, 2, DH), "local_k/v must be"),     # 3 groups of prompts for 2 groups of frames
    ("local", (2, 2, 1, DH), "local_k/v must be"),     # another head count
])
def test_prompts_of_other_shapes_are_rejected(name, shape, match):
    leaves = _inputs(torch.float32)
    leaves[f"{name}_k"], leaves[f"{name}_v"] = torch.zeros(shape), torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        prompt_attention_qkv(leaves["qkv"], **{n: leaves[n] for n in PROMPT_NAMES}, frames_per_group=2)


@pytest.mark.parametrize("packed", [2, 4])
def test_qkv_not_packed_in_threes_is_rejected(packed):
    with pytest.raises(ValueError, match="qkv must be"):
        prompt_attention_qkv(torch.zeros(2, 5, packed, 2, DH))
