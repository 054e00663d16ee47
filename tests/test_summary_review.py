"""Review of the compiled summary op (csrc/, vitaclip/ops/summary_ext.py, summary.py): cases the
first tests did not reach, each against the plain PyTorch path where it computes something."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from test_summary_ext import make_summary_layer, parameters_of
from vitaclip.ops import naive, summary, summary_ext

needs_ext = pytest.mark.skipif(os.environ.get(summary.DISABLE_ENV) == "1" or not summary_ext.is_built(),
                               reason="needs the built extension, switched on")
ROOT = Path(__file__).resolve().parents[1]


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


STALE_LIBRARY = """
import sys, types, warnings
import torch

# What an editable install pulled without a rebuild loads: the library of an older source, here
# the schema of 4ed9936 (q/k/v stacked, six outputs), with a CPU kernel that must never be called.
lib = torch.library.Library("vitaclip", "DEF")
lib.define("summary_attention(Tensor c, Tensor ln_weight, Tensor ln_bias, Tensor qkv_weight, Tensor qkv_bias, "
           "Tensor out_weight, Tensor out_bias, int num_heads, float eps) -> "
           "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
lib.define("summary_attention_backward(Tensor grad_out, Tensor c, Tensor normed, Tensor qkv, Tensor heads_out, "
           "Tensor mean, Tensor rstd, Tensor ln_weight, Tensor qkv_weight, Tensor qkv_bias, Tensor out_weight, "
           "int num_heads) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")

def never(*args):
    raise AssertionError("the stale library's kernel was called")

lib.impl("summary_attention", never, "CPU")
sys.modules["vitaclip._C"] = types.ModuleType("vitaclip._C")
sys.path.insert(0, "tests")

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from vitaclip.ops import naive, summary, summary_ext
assert not summary_ext.is_built(), "a library of other schemas counted as built"
assert "rebuild" in str(summary_ext.LOAD_ERROR), summary_ext.LOAD_ERROR
assert "summary_attention" in str(summary_ext.LOAD_ERROR), summary_ext.LOAD_ERROR
assert any("rebuild" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert not summary.extension_available() and not summary_ext.runs_on(torch.device("cpu"))
from test_summary_ext import make_summary_layer
norm, attn = make_summary_layer(16, 2)
c = torch.randn(2, 4, 16)
torch.testing.assert_close(summary.summary_tokens(c, norm, attn, 2), naive.summary_tokens(c, norm, attn, 2))
print("ok")
"""


def test_a_library_built_from_other_sources_takes_the_pytorch_path():
    """A vitaclip._C whose ops have other schemas than the Python side calls (built before a schema
    change, the source pulled since) counted as built: the model's first summary step failed with
    the dispatcher's argument error and torch.compile traced the wrong fake. It is now a load error
    that says to rebuild (with a warning), and the PyTorch path runs."""
    env = {**os.environ, summary.DISABLE_ENV: "0"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(STALE_LIBRARY)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@needs_ext
def test_the_built_library_has_the_schemas_the_python_side_calls():
    assert summary_ext.LOAD_ERROR is None
    for name, schema in summary_ext.SCHEMAS.items():
        assert str(getattr(torch.ops.vitaclip, name).default._schema) == schema
