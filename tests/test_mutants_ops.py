"""Behaviour of the smaller ops (ops/attention_tiles.py, ops/class_attention.py, ops/activation.py with
kernels/quick_gelu.py, ops/naive.py and ops/summary.py) that mutation testing found unpinned by the
other tests: each test checks it against a small computation or a stated fact of its own.

CPU: tiny shapes; the Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py) and their tests skip where neither it nor CUDA runs them."""

import pytest
import torch

from conftest import needs_triton_kernels
from test_class_attention import inputs, one_query, reference
from test_summary_ext import make_summary_layer
from vitaclip.ops import summary, summary_ext
from vitaclip.ops.attention_tiles import (BASELINE, FP32_TILES, GPU_TILES, INTERPRETER_TILES, AttentionTiles,
                                          KernelTiles, tiles_for, use_tiles)


def test_kernel_tiles_take_1_to_32_warps_in_powers_of_two():
    """A CUDA block has 1 to 32 warps (1024 threads): 32 is a launch Triton takes, 0 warps none."""
    for warps in (1, 2, 32):
        assert KernelTiles(16, 16, num_warps=warps).num_warps == warps
    for warps in (0, 64):
        with pytest.raises(ValueError, match="num_warps"):
            KernelTiles(16, 16, num_warps=warps)


def test_kernel_tiles_of_a_float_size_are_a_value_error_naming_the_field():
    """Tile sizes are ints (tl.arange and the launch take constexpr ints): a 64.0 is refused as the
    bad configuration it is (ValueError naming KernelTiles.block_m), not a TypeError from the bit test."""
    with pytest.raises(ValueError, match="KernelTiles.block_m"):
        KernelTiles(64.0, 64)
    with pytest.raises(ValueError, match="KernelTiles.num_warps"):
        KernelTiles(64, 64, num_warps=4.0)


def test_launch_args_give_block_m_as_the_query_tile_and_block_n_as_the_key_tile():
    """KernelTiles(block_m queries, block_n keys) launches BLOCK_M = block_m, BLOCK_N = block_n: the
    kernels' results do not depend on the tiles, so swapped ones would only show as another launch
    (another speed, or too much shared memory for the GPU) than the one benchmarked."""
    assert KernelTiles(16, 64, 2, 3).launch_args() == dict(BLOCK_M=16, BLOCK_N=64, num_warps=2, num_stages=3)


def test_the_gpu_takes_fp32_tiles_for_fp32_and_the_baseline_for_head_dims_without_a_default():
    """tiles_for's documented choice outside the interpreter: fp32 inputs get FP32_TILES (bf16's
    tiles overflow the shared memory of sm_86/sm_89 in fp32), a head dim GPU_TILES has no entry for
    gets BASELINE, and the interpreter its own small tiles whatever the dtype."""
    head_dim = next(d for d in range(8, 1024, 8) if d not in GPU_TILES)
    assert tiles_for(head_dim, interpreting=False) is BASELINE
    for known in GPU_TILES:
        assert tiles_for(known, interpreting=False) is GPU_TILES[known]
        assert tiles_for(known, interpreting=False, fp32=True) is FP32_TILES
    assert tiles_for(head_dim, interpreting=False, fp32=True) is FP32_TILES
    assert tiles_for(head_dim, interpreting=True, fp32=True) is INTERPRETER_TILES


def test_nested_use_tiles_restore_the_outer_override():
    """Leaving an inner use_tiles block brings back the enclosing block's tiles, not the defaults."""
    outer = AttentionTiles(*(KernelTiles(16, 16),) * 4)
    inner = AttentionTiles(*(KernelTiles(32, 16),) * 4)
    with use_tiles(outer):
        with use_tiles(inner):
            assert tiles_for(64, interpreting=True) == inner
        assert tiles_for(64, interpreting=True) == outer
    assert tiles_for(64, interpreting=True) is INTERPRETER_TILES


def _class_token_case():
    """Two groups of 3 frames with local, 2 global and summary prompts, as test_class_attention builds them."""
    return inputs(3, 2, True, True, 2)


def test_class_token_attention_rejects_v_of_another_shape_than_k():
    """v [F, 1, H, Dh] broadcast over k's S keys silently (every key given the first token's value)
    where the reference raises: the op names it, as it does for q's F, H and Dh."""
    leaves = _class_token_case()
    leaves["v"] = leaves["v"][:, :1]
    with pytest.raises(ValueError, match="needs k and v"):
        one_query(frames_per_group=3, **leaves)


@pytest.mark.parametrize("kind", ["local", "global", "summary"])
def test_class_token_attention_rejects_prompt_values_of_another_shape_than_their_keys(kind):
    """Prompt values of one key's (or one frame's) shape, keys of the full one: the products would
    broadcast the values over the keys silently (global: [1, H, Dh] against G keys)."""
    leaves = _class_token_case()
    leaves[f"{kind}_v"] = leaves[f"{kind}_v"][:1] if kind != "local" else leaves["local_v"][:, :1]
    with pytest.raises(ValueError, match=f"{kind}_k/v must be"):
        one_query(frames_per_group=3, **leaves)


def test_class_token_attention_computes_bf16_inputs_in_fp32():
    """The module computes in at least fp32 whatever the inputs' dtype (outside autocast too): from bf16
    inputs with large scores (q x 8) its output is the float64 reference on the same rounded inputs
    to about the output's own bf16 rounding (2^-8), where bf16 scores are off by about three times that."""
    leaves = _class_token_case()
    leaves["q"] = leaves["q"] * 8
    low = {name: t.to(torch.bfloat16) for name, t in leaves.items()}
    got = one_query(frames_per_group=3, **low)
    exact = reference(frames_per_group=3, **{name: t.double() for name, t in low.items()})
    assert got.dtype == torch.bfloat16
    assert float((got.double() - exact).abs().max() / exact.abs().max()) <= 2 * 2 ** -8


def test_only_disable_ext_1_switches_the_compiled_summary_op_off(monkeypatch):
    """summary.py: the compiled op runs whenever it is built "unless the environment sets
    VITACLIP_DISABLE_EXT=1"; other values (unset, "0", "", "yes") leave it on."""
    if not summary_ext.is_built():
        pytest.skip("needs the built extension")
    monkeypatch.delenv(summary.DISABLE_ENV, raising=False)
    assert summary.extension_available()
    for value in ("0", "", "yes", "true"):
        monkeypatch.setenv(summary.DISABLE_ENV, value)
        assert summary.extension_available(), value
    monkeypatch.setenv(summary.DISABLE_ENV, "1")
    assert not summary.extension_available()


@pytest.mark.parametrize("disable", ["1", "0"])
@pytest.mark.parametrize("shape", [(2, 8), (1, 1, 2, 8)])
def test_summary_tokens_of_a_c_not_3d_is_its_own_value_error_on_either_path(monkeypatch, disable, shape):
    """c must be [n_groups, T, C]: a 2-D or 4-D c is named by summary_tokens itself, on the PyTorch
    path (where it would fail unpacking the shape) and the compiled one alike."""
    monkeypatch.setenv(summary.DISABLE_ENV, disable)
    norm, attn = make_summary_layer(8, 2)
    with pytest.raises(ValueError, match=r"must be \[n_groups, T, C\]"):
        summary.summary_tokens(torch.randn(shape), norm, attn, 2)


@needs_triton_kernels
def test_quick_gelu_of_half_precision_storage_is_computed_in_fp32():
    """kernels/quick_gelu.py computes in fp32 whatever the storage dtype: from fp16 inputs (the
    sigmoid of x down to -12 is far below fp16's normal range) value and gradient are the float64
    formula's to within an fp16 ulp (plus the smallest subnormal)."""
    from vitaclip.ops.activation import quick_gelu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.linspace(-12, 6, 301, dtype=torch.float64).to(device=device, dtype=torch.float16).requires_grad_(True)
    grad_out = torch.linspace(-2, 2, 301, dtype=torch.float64).to(device=device, dtype=torch.float16)
    got = quick_gelu(x)
    (got_grad,) = torch.autograd.grad(got, x, grad_out)
    assert got.dtype == got_grad.dtype == torch.float16
    x64 = x.detach().double()
    s = torch.sigmoid(1.702 * x64)
    for value, exact in ((got, x64 * s), (got_grad, grad_out.double() * (s + 1.702 * x64 * s * (1 - s)))):
        torch.testing.assert_close(value.double(), exact, rtol=2 ** -10, atol=2 ** -24)
