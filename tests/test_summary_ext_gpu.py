"""The compiled summary op's CUDA kernels against a float64 reference (needs a GPU; seconds).

Criterion (assert_no_worse_than_pytorch): per output and gradient, the op's error against
float64 is at most twice the PyTorch path's error in the same dtype, plus a small floor.
"""
import pytest
import torch

from vitaclip.ops import naive, summary_ext
from conftest import run_in_own_process
from test_summary_ext import assert_no_worse_than_pytorch, make_summary_layer, output_and_grads

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not summary_ext.is_built(), reason="vitaclip._C not built")]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("width,heads", [(768, 12), (1024, 16), (256, 2), (1280, 16)],
                         ids=["768x12", "1024x16", "head-dim-128", "head-dim-80"])
@pytest.mark.parametrize("frames", [1, 3, 8, 16, 32, 33])
def test_cuda_matches_float64(frames, width, heads, dtype):
    norm, attn = make_summary_layer(width, heads, dtype=torch.float64, device="cuda", seed=frames)
    c = torch.randn(6, frames, width, dtype=torch.float64, device="cuda")
    grad = torch.randn_like(c)
    reference = output_and_grads(naive.summary_tokens, c, norm, attn, heads, grad)
    reference = [reference[0], *reference[1]]
    norm, attn = norm.to(dtype), attn.to(dtype)
    c, grad = c.to(dtype), grad.to(dtype)
    out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, heads, grad)
    ref_out, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, heads, grad)
    assert out.dtype == dtype and out.is_cuda
    floor = 1e-5 if dtype == torch.float32 else 1e-2
    assert_no_worse_than_pytorch([out, *grads], [ref_out, *ref_grads], reference, floor)


def test_shapes_past_the_shared_memory_take_the_pytorch_path():
    """One head of 1024 over 32 frames needs over 500 KB of shared memory in fp32: no GPU has it."""
    from vitaclip.ops import summary

    norm, attn = make_summary_layer(1024, 1, dtype=torch.float32, device="cuda", seed=0)
    c = torch.randn(2, 32, 1024, device="cuda")
    assert not summary_ext.shared_memory_fits(c, 1) and summary_ext.shared_memory_fits(c, 16)
    torch.testing.assert_close(summary.summary_tokens(c, norm, attn, 1), naive.summary_tokens(c, norm, attn, 1))


def test_float64_and_strided_input_on_cuda():
    norm, attn = make_summary_layer(96, 3, dtype=torch.float64, device="cuda", seed=1)
    c = torch.randn(96, 5, 4, dtype=torch.float64, device="cuda").permute(2, 1, 0)  # [4, 5, 96], not contiguous
    grad = torch.randn(4, 5, 96, dtype=torch.float64, device="cuda")
    out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, 3, grad)
    ref, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, 3, grad)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_hundreds_of_groups_as_a_multi_view_evaluation_batch():
    """32 videos x 12 views = 384 groups of 8 frames, 12 heads: 4,608 blocks."""
    norm, attn = make_summary_layer(768, 12, dtype=torch.float64, device="cuda", seed=2)
    c = torch.randn(384, 8, 768, dtype=torch.float64, device="cuda")
    grad = torch.randn_like(c)
    reference = output_and_grads(naive.summary_tokens, c, norm, attn, 12, grad)
    norm, attn, c, grad = norm.bfloat16(), attn.bfloat16(), c.bfloat16(), grad.bfloat16()
    out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, 12, grad)
    ref_out, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, 12, grad)
    assert_no_worse_than_pytorch([out, *grads], [ref_out, *ref_grads], [reference[0], *reference[1]], 1e-2)


def test_the_op_inside_a_cuda_autocast_region_runs_as_on_inputs_cast_to_its_dtype():
    norm, attn = make_summary_layer(256, 4, device="cuda", seed=3)
    args = (torch.randn(4, 8, 256, device="cuda"), *summary_ext.op_arguments(norm, attn))
    cast = torch.ops.vitaclip.summary_attention(*(a.bfloat16() for a in args), 4, norm.eps)[0]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        inside = torch.ops.vitaclip.summary_attention(*args, 4, norm.eps)[0]
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, cast.float(), rtol=0, atol=0)


def test_frame_counts_past_the_kernels_32_bit_sizes_are_refused():
    """65,536 frames: T x T wraps to 0 in 32 bits, which would launch with no shared memory."""
    printed = run_in_own_process("""
        import pytest, torch
        from test_summary_ext import make_summary_layer
        from vitaclip.ops import summary_ext
        norm, attn = make_summary_layer(64, 1, device="cuda", seed=4)
        c = torch.randn(1, 65536, 64, device="cuda")
        with pytest.raises(ValueError, match="65536 frames.*32-bit"):
            torch.ops.vitaclip.summary_attention(c, *summary_ext.op_arguments(norm, attn), 1, norm.eps)
        print("forward refused")
        rows, width = 65536, 64
        saved = [torch.randn(rows, width, device="cuda"), torch.randn(rows, 3 * width, device="cuda"),
                 torch.randn(rows, width, device="cuda"), torch.randn(rows, device="cuda"), torch.randn(rows, device="cuda")]
        weights = [p.detach() for p in summary_ext.op_arguments(norm, attn)]
        qkv_params = torch.cat([w.flatten() for w in weights[2:8:2] + weights[3:8:2]])
        with pytest.raises(ValueError, match="65536 frames.*32-bit"):
            torch.ops.vitaclip.summary_attention_backward(torch.randn_like(c), c, *saved, weights[0], qkv_params,
                                                          weights[8], 1)
        print("backward refused")
    """)
    assert printed.splitlines() == ["forward refused", "backward refused"]


def test_the_driver_says_the_kernels_run_on_this_gpu():
    """Else every summary row of the benchmarks would measure the PyTorch path."""
    assert summary_ext.runs_on(torch.device("cuda"))
