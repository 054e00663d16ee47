"""Review of the compiled summary op (csrc/, vitaclip/ops/summary_ext.py, summary.py): cases the
first tests did not reach, each against the plain PyTorch path where it computes something."""
import os

import pytest
import torch

from test_summary_ext import make_summary_layer, parameters_of
from vitaclip.ops import naive, summary, summary_ext

needs_ext = pytest.mark.skipif(os.environ.get(summary.DISABLE_ENV) == "1" or not summary_ext.is_built(),
                               reason="needs the built extension, switched on")


@needs_ext
@pytest.mark.parametrize("trainable", ["q_proj.weight", "v_proj.bias", "norm.bias"])
def test_create_graph_is_refused_when_only_projections_need_grad(trainable):
    """The double-backward refusal looked at the backward op's inputs only (c, LN weight, out weight
    and the incoming gradient): with those not needing grad (a loss linear in the output, c and the
    LN weight frozen) create_graph=True returned a q/k/v gradient with no graph, so a gradient
    penalty silently lost the op's second-order term. The PyTorch path keeps it."""
    norm, attn = make_summary_layer(16, 2)
    params = dict(zip(["norm.weight", "norm.bias", "q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                       "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias"],
                      parameters_of(norm, attn)))
    for name, p in params.items():
        p.requires_grad_(name == trainable)
    c, weights = torch.randn(2, 4, 16), torch.randn(2, 4, 16)
    ref = naive.summary_tokens(c, norm, attn, 2)
    grad, = torch.autograd.grad((ref * weights).sum(), params[trainable], create_graph=True)
    if trainable != "v_proj.bias":  # linear in v's bias: the PyTorch path's graph ends there too
        assert grad.requires_grad
    out = summary_ext.summary_tokens(c, norm, attn, 2)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad((out * weights).sum(), params[trainable], create_graph=True)
    # a first-order gradient is still the PyTorch path's
    got, = torch.autograd.grad((summary_ext.summary_tokens(c, norm, attn, 2) * weights).sum(), params[trainable])
    torch.testing.assert_close(got, grad.detach(), atol=5e-5, rtol=1e-4)
