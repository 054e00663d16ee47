"""Review of the custom ops' wrappers and kernels (ops/attention.py, ops/activation.py,
ops/class_attention.py): inputs the public entry points do not make themselves, called through
the registered ops or given odd layouts, against the plain PyTorch references in float64.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py), tiny shapes, fp32."""

import pytest
import torch

from conftest import needs_triton_kernels
from vitaclip.vision import QuickGELU

pytestmark = needs_triton_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _quick_gelu_op():
    import vitaclip.ops.activation  # noqa: F401  (registers the op)

    return torch.ops.vitaclip.quick_gelu.default


@pytest.mark.parametrize("layout", ["sliced", "transposed", "expanded"])
def test_quick_gelu_op_of_a_non_contiguous_input(layout):
    """The registered op is public (torch.ops.vitaclip.quick_gelu, and what torch.compile and opcheck
    call); its kernels index memory linearly. A sliced input was read as if contiguous (wrong values),
    a transposed one got its gradient in the wrong order (grad_out made contiguous, x not)."""
    leaf = (torch.randn(6, 10, device=DEVICE) * 3).requires_grad_(True)
    x = {"sliced": leaf[:, ::2], "transposed": leaf.t(), "expanded": leaf[:1].expand(4, -1)}[layout]
    y = _quick_gelu_op()(x)
    grad_out = torch.randn(y.shape, device=DEVICE)
    (got_grad,) = torch.autograd.grad(y, leaf, grad_out)
    leaf64 = leaf.detach().double().requires_grad_(True)
    x64 = {"sliced": leaf64[:, ::2], "transposed": leaf64.t(), "expanded": leaf64[:1].expand(4, -1)}[layout]
    want = QuickGELU()(x64)
    (want_grad,) = torch.autograd.grad(want, leaf64, grad_out.double())
    torch.testing.assert_close(y.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_grad.double(), want_grad, atol=1e-6, rtol=1e-5)


def test_quick_gelu_fake_matches_real_for_a_non_contiguous_input():
    """The fake implementation says what the real op returns (shape, strides, dtype)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    op = _quick_gelu_op()
    x = torch.randn(6, 10, device=DEVICE).t()
    real = op(x)
    with FakeTensorMode() as mode:
        fake = op(mode.from_tensor(x))
    assert (fake.shape, fake.stride(), fake.dtype) == (real.shape, real.stride(), real.dtype)
    torch.library.opcheck(op, (x.detach().requires_grad_(True),))
    torch.library.opcheck(op, (torch.randn(6, 10, device=DEVICE)[:, ::3].requires_grad_(True),))


@pytest.mark.parametrize("kind,shape", [
    ("local", (1, 3, 2, 8)),   # one group's local prompts for 2 groups: broadcast to both
    ("local", (4, 3, 2, 8)),   # one group per frame while frames_per_group = 2
    ("global", (3, 1, 8)),     # one head's prompts for 2 heads: broadcast to both
    ("summary", (1, 2, 8)),    # one frame's summary token for 4 frames: broadcast to all
    ("summary", (4, 2, 4)),    # another head dim
])
def test_class_token_attention_rejects_prompts_of_other_shapes(kind, shape):
    """The last layer's one-query attention broadcast prompts of the wrong shape silently (an answer
    where the reference and the Triton op raise): it now names them, as `prompt_attention` does."""
    from vitaclip.ops.class_attention import class_token_attention

    n_frames, seq, heads, dim = 4, 5, 2, 8
    q, k, v = torch.randn(n_frames, heads, dim), *torch.randn(2, n_frames, seq, heads, dim)
    prompts = dict(local=(None, None), global_=(None, None), summary=(None, None))
    bad = torch.randn(shape)
    prompts["global_" if kind == "global" else kind] = (bad, bad)
    with pytest.raises(ValueError, match=f"{kind}_k/v must be"):
        class_token_attention(q, k, v, [t for pair in prompts.values() for t in pair], frames_per_group=2)
    with pytest.raises(ValueError, match="both be given"):
        class_token_attention(q, k, v, [None, None, None, None, torch.randn(n_frames, heads, dim), None])


PROMPT_NAMES = ("local_k", "local_v", "global_k", "global_v", "summary_k", "summary_v")


def test_prompt_attention_backward_op_reads_any_layout_of_out_and_lse():
    """The registered backward op read the saved output and LSE as contiguous whatever their strides
    (its other inputs it takes strided or makes contiguous): given the same values in another
    layout it returned wrong gradients, silently."""
    from test_prompt_attention import make_inputs

    leaves = make_inputs(1, 2, 9, 2, 2, 1, True, dtype=torch.float32, head_dim=16, device=DEVICE)
    prompts = [leaves.get(name) for name in PROMPT_NAMES]
    out, lse = torch.ops.vitaclip.prompt_attention(leaves["qkv"], None, None, *prompts, 2)
    grad_out = torch.randn_like(out)
    backward = torch.ops.vitaclip.prompt_attention_backward
    want = backward(grad_out, leaves["qkv"], None, None, *prompts, out, lse, 2)
    out_seq_major = out.transpose(0, 1).contiguous().transpose(0, 1)
    lse_seq_major = lse.transpose(1, 2).contiguous().transpose(1, 2)
    got = backward(grad_out, leaves["qkv"], None, None, *prompts, out_seq_major, lse_seq_major, 2)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
