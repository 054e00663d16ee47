"""The fused Triton prompt attention against the naive reference: forward and every gradient.

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by conftest.py) in fp32 against a float64
reference at tiny odd shapes. GPU (marked `gpu`): bf16/fp16 at ViT-B/16 shapes.
"""

import pytest
import torch

from conftest import interpreter_only, zeros_made_during
from vitaclip.ops import naive
from vitaclip.ops.attention import BACKWARDS, prompt_attention, prompt_attention_qkv, triton_available, uses_triton
from vitaclip.ops.attention_tiles import AttentionTiles, KernelTiles, tiles_for, use_tiles

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

HEAD_DIM = 64
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def make_inputs(n_groups, frames_per_group, seq, heads, n_local, n_global, summary,
                dtype=torch.float64, device="cpu", packed=True, seed=0, head_dim=HEAD_DIM):
    """Fresh random inputs; with `packed`, q/k/v come as one fused qkv [F, S, 3, H, Dh]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n_frames = n_groups * frames_per_group

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    leaves = {}
    if packed:
        leaves["qkv"] = rand(n_frames, seq, 3, heads, head_dim)
    else:
        for name in "qkv":
            leaves[name] = rand(n_frames, seq, heads, head_dim)
    if n_local:
        leaves["local_k"], leaves["local_v"] = (rand(n_groups, n_local, heads, head_dim) for _ in range(2))
    if n_global:
        leaves["global_k"], leaves["global_v"] = (rand(n_global, heads, head_dim) for _ in range(2))
    if summary:
        leaves["summary_k"], leaves["summary_v"] = (rand(n_frames, heads, head_dim) for _ in range(2))
    return leaves


def call(fn, leaves, frames_per_group):
    """fn(q, k, v, ...) with q/k/v strided views of qkv when packed; fn = "qkv": the packed op."""
    prompts = {name: t for name, t in leaves.items() if name not in ("qkv", "q", "k", "v")}
    if fn == "qkv":
        return prompt_attention_qkv(leaves["qkv"], frames_per_group=frames_per_group, **prompts)
    if "qkv" in leaves:
        q, k, v = leaves["qkv"].unbind(2)
    else:
        q, k, v = leaves["q"], leaves["k"], leaves["v"]
    return fn(q, k, v, frames_per_group=frames_per_group, **prompts)


def outputs_and_grads(fn, leaves, frames_per_group, grad_out):
    leaves = {name: t.detach().requires_grad_(True) for name, t in leaves.items()}
    out = call(fn, leaves, frames_per_group)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(out.dtype))
    return out, dict(zip(leaves, grads))


# (frames_per_group, n_global, local on, summary on, heads, layout of q/k/v)
CPU_CASES = [
    (1, 0, True, False, 1, "views"),
    (3, 1, True, True, 2, "qkv"),
    (8, 8, False, True, 1, "views"),
    (3, 8, True, False, 1, "separate"),
    (2, 0, False, False, 1, "qkv"),
]


@interpreter_only
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("frames_per_group,n_global,local,summary,heads,layout", CPU_CASES)
def test_interpreter_matches_reference(monkeypatch, frames_per_group, n_global, local, summary, heads, layout,
                                       backward):
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    seq = 50  # 7x7 patches + cls: two tiles of 32, the second partial
    leaves = make_inputs(2, frames_per_group, seq, heads, frames_per_group if local else 0,
                         n_global, summary, packed=layout != "separate", seed=frames_per_group * 10 + n_global)
    grad_out = torch.randn(2 * frames_per_group, seq, heads, HEAD_DIM, dtype=torch.float64)
    ref_out, ref_grads = outputs_and_grads(naive.prompt_attention, leaves, frames_per_group, grad_out)
    leaves32 = {name: t.float() for name, t in leaves.items()}
    assert uses_triton(next(iter(leaves32.values())))
    fast = "qkv" if layout == "qkv" else prompt_attention
    out, grads = outputs_and_grads(fast, leaves32, frames_per_group, grad_out)
    assert out.is_contiguous() and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name].double(), ref, atol=1e-5, rtol=1e-4, msg=name)


def assert_matches_reference(fast, leaves, frames_per_group, seed=0):
    """fast(...) in fp32 against the float64 reference: the output and every gradient."""
    out_shape = call(naive.prompt_attention, leaves, frames_per_group).shape
    grad_out = torch.randn(out_shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    ref_out, ref_grads = outputs_and_grads(naive.prompt_attention, leaves, frames_per_group, grad_out)
    out, grads = outputs_and_grads(fast, {name: t.float() for name, t in leaves.items()}, frames_per_group, grad_out)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name].double(), ref, atol=1e-5, rtol=1e-4, msg=name)


@interpreter_only
@pytest.mark.parametrize("backward", BACKWARDS)
def test_interpreter_matches_reference_with_vit_b16_s_17_prompt_keys(monkeypatch, backward):
    """8 local + 8 global + the summary: one past a power of two, so the prompt tile is 32 rows."""
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    assert_matches_reference("qkv", make_inputs(1, 8, 20, 1, 8, 8, True, seed=17), 8)


@interpreter_only
@pytest.mark.parametrize("backward", BACKWARDS)
def test_interpreter_matches_reference_with_q_k_v_of_different_layouts(monkeypatch, backward):
    """Each of q, k, v goes with its own strides."""
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    leaves = make_inputs(2, 2, 37, 2, 2, 3, True, packed=False, seed=5)
    leaves["k"] = leaves["k"].transpose(0, 1).contiguous().transpose(0, 1)  # sequence-major memory
    leaves["v"] = leaves["v"].transpose(1, 2).contiguous().transpose(1, 2)  # head-major memory
    assert_matches_reference(prompt_attention, leaves, 2)


def test_fp32_dots_are_ieee_and_half_precision_dots_tf32():
    """The interpreter computes fp32 dots exactly whatever the precision asked: checked here."""
    from vitaclip.ops.attention import _launch_config

    tiles = KernelTiles(64, 64)
    assert _launch_config(torch.zeros(1, 1, 1, 64), 3, tiles)["PRECISION"] == "ieee"
    assert _launch_config(torch.zeros(1, 1, 1, 64, dtype=torch.float16), 3, tiles)["PRECISION"] == "tf32"


@interpreter_only
@pytest.mark.parametrize("prompts", [dict(local=True, n_global=2, summary=True), dict(local=False, n_global=0,
                                                                                      summary=False)])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_interpreter_tails_match_reference(monkeypatch, prompts, backward):
    """S = 65 (8x8 patches + cls) with 32-row tiles: two full tiles and a 16-row tail everywhere
    (a second launch of tail tiles, a tail step in every loop), as S = 197 with 64-row tiles."""
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    frames_per_group, seq, heads = 2, 65, 2
    leaves = make_inputs(2, frames_per_group, seq, heads, frames_per_group if prompts["local"] else 0,
                         prompts["n_global"], prompts["summary"], seed=65)
    assert_matches_reference("qkv", leaves, frames_per_group)


@interpreter_only
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("head_dim", [32, 80])
def test_interpreter_matches_reference_at_other_head_dims(monkeypatch, head_dim, backward):
    """Head dims other than 64: 80 (ViT-H/14) pads to 128 columns, masked, in every kernel."""
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    assert_matches_reference("qkv", make_inputs(2, 2, 37, 2, 2, 3, True, seed=head_dim, head_dim=head_dim), 2)


@interpreter_only
@pytest.mark.parametrize("packed", [True, False])
def test_inputs_whose_frame_offsets_overflow_int32_reach_the_kernels_contiguous(monkeypatch, packed):
    """The kernels index within a frame in int32: seq-first views of thousands of frames (row stride
    3 * F * C) would wrap. Such inputs are copied first; shown here with the limit lowered."""
    from vitaclip.ops import attention

    frames_per_group, seq, heads = 3, 50, 2
    leaves = make_inputs(1, frames_per_group, seq, heads, frames_per_group, 1, True, seed=7)
    grad_out = torch.randn(frames_per_group, seq, heads, HEAD_DIM, dtype=torch.float64)
    ref_out, ref_grads = outputs_and_grads(naive.prompt_attention, leaves, frames_per_group, grad_out)
    fast_leaves = {name: t.float() for name, t in leaves.items()}
    # the same values, seq-first in memory ([S, F, 3, H, Dh], as CLIP's LND layout), viewed frame-first
    fast_leaves["qkv"] = fast_leaves["qkv"].transpose(0, 1).contiguous().transpose(0, 1)
    monkeypatch.setattr(attention, "MAX_FRAME_OFFSET", (seq - 1) * fast_leaves["qkv"].stride(1))
    seen = []
    op = attention._prompt_attention_op

    def spy(*args):
        seen.append([t.is_contiguous() for t in args[:3] if t is not None])
        return op(*args)

    monkeypatch.setattr(attention, "_prompt_attention_op", spy)
    out, grads = outputs_and_grads("qkv" if packed else prompt_attention, fast_leaves, frames_per_group, grad_out)
    assert seen == [[True] * (1 if packed else 3)]
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name].double(), ref, atol=1e-5, rtol=1e-4, msg=name)


def test_rows_split_into_full_tiles_and_one_tail():
    from vitaclip.ops.attention import _row_tiles, _tail

    assert _row_tiles(197, 64) == [(0, 3, 64), (192, 1, 16)]  # ViT-B/16: 5 rows left over
    assert _row_tiles(197, 128) == [(0, 1, 128), (128, 1, 64), (192, 1, 16)]
    assert _row_tiles(65, 32) == [(0, 2, 32), (64, 1, 16)]
    assert _row_tiles(50, 32) == [(0, 2, 32)]  # 18 left: one 32-row tile spares 14
    assert _row_tiles(10, 64) == [(0, 1, 16)]  # no full tile at all
    assert _row_tiles(40, 64) == [(0, 1, 32), (32, 1, 16)]
    assert _row_tiles(256, 64) == [(0, 4, 64)]
    for rows in range(1, 300):  # every row in exactly one tile, tiles in order
        for block in (16, 32, 64, 128):
            launches = _row_tiles(rows, block)
            starts = [start + i * tile for start, n, tile in launches for i in range(n)]
            ends = [start + tile for start, n, tile in launches for start in [start + i * tile for i in range(n)]]
            assert starts[0] == 0 and all(e == s for e, s in zip(ends, starts[1:])) and ends[-1] >= rows > starts[-1]
    assert [_tail(197, 64), _tail(197 + 40, 64), _tail(256, 64)] == [16, 64, 64]


@interpreter_only
@pytest.mark.parametrize("backward", BACKWARDS)
def test_interpreter_matches_reference_with_other_tiles_per_kernel(monkeypatch, backward):
    """Each kernel tiles independently: forward, dQ and dK/dV (or the fused backward) with
    different tilings (at S = 65 each with its own tails)."""
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    frames_per_group, seq, heads = 2, 65, 1
    leaves = make_inputs(2, frames_per_group, seq, heads, 2, 3, True, seed=7)
    grad_out = torch.randn(2 * frames_per_group, seq, heads, HEAD_DIM, dtype=torch.float64)
    ref_out, ref_grads = outputs_and_grads(naive.prompt_attention, leaves, frames_per_group, grad_out)
    tiles = AttentionTiles(fwd=KernelTiles(32, 64), bwd_dq=KernelTiles(64, 32), bwd_dkdv=KernelTiles(32, 64),
                           bwd_fused=KernelTiles(16, 64))
    with use_tiles(tiles):
        assert tiles_for(HEAD_DIM, interpreting=True) == tiles
        out, grads = outputs_and_grads("qkv", {n: t.float() for n, t in leaves.items()}, frames_per_group, grad_out)
    assert tiles_for(HEAD_DIM, interpreting=True) != tiles
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-4)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name].double(), ref, atol=1e-5, rtol=1e-4, msg=name)


def test_an_unknown_backward_is_named(monkeypatch):
    from vitaclip.ops.attention import backward_kind

    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", "fast")
    with pytest.raises(ValueError, match="VITACLIP_ATTENTION_BACKWARD.*'fast'"):
        backward_kind()


def test_bad_tiles_are_rejected():
    for bad in (dict(block_m=8, block_n=64), dict(block_m=64, block_n=48), dict(block_m=64, block_n=64, num_warps=3),
                dict(block_m=64, block_n=64, num_stages=0)):
        with pytest.raises(ValueError, match="KernelTiles"):
            KernelTiles(**bad)
    with pytest.raises(ValueError, match="AttentionTiles"):
        with use_tiles(KernelTiles(64, 64)):
            pass


@interpreter_only
def test_interpreter_opcheck_and_compile_without_graph_breaks():
    leaves = make_inputs(1, 2, 20, 1, 2, 1, True, dtype=torch.float32)
    check_op_and_compile(leaves, 2)


@interpreter_only
def test_backward_fills_no_zero_gradient_for_the_log_sum_exp():
    """lse is saved for the backward only: no zero gradient [F, H, S] for it in every layer."""
    leaves = {name: t.requires_grad_() for name, t in make_inputs(1, 2, 20, 1, 2, 1, True, dtype=torch.float32).items()}
    out = call("qkv", leaves, 2)
    assert zeros_made_during(lambda: torch.autograd.grad(out, list(leaves.values()), torch.randn_like(out))) == 0


def check_op_and_compile(leaves, frames_per_group):
    """opcheck of the custom op in both layouts, then torch.compile(fullgraph=True) of both APIs."""
    prompts = [leaves[name] for name in ("local_k", "local_v", "global_k", "global_v", "summary_k", "summary_v")]
    for qkv_args in (leaves["qkv"].unbind(2), (leaves["qkv"], None, None)):
        torch.library.opcheck(torch.ops.vitaclip.prompt_attention.default,
                              (*qkv_args, *prompts, frames_per_group),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    for fn in (prompt_attention, "qkv"):
        check_compiles_without_graph_breaks(fn, leaves, frames_per_group, backend="aot_eager")


def check_compiles_without_graph_breaks(fn, leaves, frames_per_group, backend):
    """fullgraph=True fails on any graph break; AOT autograd also traces the backward op."""
    def loss(leaves):
        return call(fn, leaves, frames_per_group).float().square().sum()

    def grads(fn):
        fresh = {name: t.detach().requires_grad_(True) for name, t in leaves.items()}
        fn(fresh).backward()
        return [t.grad for t in fresh.values()]

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    for got, want in zip(grads(compiled), grads(loss)):
        torch.testing.assert_close(got, want)


def test_bad_inputs_are_rejected():
    q = torch.zeros(4, 5, 2, HEAD_DIM)
    with pytest.raises(ValueError, match="must match q"):
        prompt_attention(q, q[:, :3], q)
    with pytest.raises(ValueError, match="both be given"):
        prompt_attention(q, q, q, global_k=torch.zeros(3, 2, HEAD_DIM))
    with pytest.raises(ValueError, match="whole number of groups"):
        local = torch.zeros(1, 3, 2, HEAD_DIM)
        prompt_attention(q, q, q, local_k=local, local_v=local, frames_per_group=3)
    with pytest.raises(ValueError, match="summary_k/v must be"):
        summary = torch.zeros(2, 2, HEAD_DIM)
        prompt_attention(q, q, q, summary_k=summary, summary_v=summary)
    with pytest.raises(ValueError, match="is torch.float64"):
        prompt_attention(q, q, q.double())
    with pytest.raises(ValueError, match="floating point"):
        prompt_attention(q.int(), q.int(), q.int())
    with pytest.raises(ValueError, match="k must be a tensor"):
        prompt_attention(q, None, q)
    with pytest.raises(ValueError, match="non-empty"):
        prompt_attention(q[..., :0], q[..., :0], q[..., :0])


# ViT-B/16: batch 4 clips x 8 frames, 1 + 14x14 tokens, 12 heads, 8 global and 8 local prompts
@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype,layout", [(torch.bfloat16, "qkv"), (torch.float16, "views"), (torch.float32, "qkv")])
def test_gpu_matches_float64_reference(monkeypatch, dtype, layout, backward):
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
    frames_per_group, heads, seq = 8, 12, 197
    leaves = make_inputs(4, frames_per_group, seq, heads, 8, 8, True, device="cuda")
    grad_out = torch.randn(32, seq, heads, HEAD_DIM, device="cuda", dtype=torch.float64)
    ref_out, ref_grads = outputs_and_grads(naive.prompt_attention, leaves, frames_per_group, grad_out)
    low = {name: t.to(dtype) for name, t in leaves.items()}
    fast = "qkv" if layout == "qkv" else prompt_attention
    out, grads = outputs_and_grads(fast, low, frames_per_group, grad_out)
    # the same computation in plain PyTorch at this precision sets the error budget
    naive_out, naive_grads = outputs_and_grads(naive.prompt_attention, low, frames_per_group, grad_out)

    def check(name, got, naive_got, want):
        err = (got.double() - want).abs().max().item()
        budget = (naive_got.double() - want).abs().max().item()
        assert err <= 2 * budget + 1e-3 * want.abs().max().item(), f"{name}: error {err} vs budget {budget}"

    check("out", out, naive_out, ref_out)
    for name in ref_grads:
        check(name, grads[name], naive_grads[name], ref_grads[name])
    # deterministic: no atomics, the same bits on a second run
    _, again = outputs_and_grads(fast, low, frames_per_group, grad_out)
    for name in grads:
        assert torch.equal(grads[name], again[name]), name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_the_tensors_gpu_not_the_current_one():
    leaves = make_inputs(2, 3, 50, 2, 2, 3, True, dtype=torch.float32, device="cuda:1")
    grad_out = torch.randn(6, 50, 2, HEAD_DIM, device="cuda:1")
    with torch.cuda.device(0):
        out, grads = outputs_and_grads("qkv", leaves, 3, grad_out)
    want_out, want_grads = outputs_and_grads(naive.prompt_attention, leaves, 3, grad_out)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-4)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-4, msg=name)


@cuda
@pytest.mark.gpu
def test_gpu_opcheck_and_compile_without_graph_breaks():
    check_op_and_compile(make_inputs(2, 8, 197, 12, 8, 8, True, dtype=torch.bfloat16, device="cuda"), 8)


def test_cpu_without_interpreter_falls_back_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    leaves = make_inputs(2, 2, 9, 2, 2, 3, True, dtype=torch.float32)
    prompts = {name: t for name, t in leaves.items() if name != "qkv"}
    q = leaves["qkv"][:, :, 0]
    assert not uses_triton(q)
    out = prompt_attention_qkv(leaves["qkv"], frames_per_group=2, **prompts)
    assert torch.equal(out, naive.prompt_attention(*leaves["qkv"].unbind(2), frames_per_group=2, **prompts))
    assert out.is_contiguous()  # as the Triton op's: the fast layer views it as [F, S, C]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_dtypes_the_kernels_do_not_take_here_use_the_reference(dtype):
    """float64 anywhere (e.g. a .double() model under the fast backend), bf16 in the CPU
    interpreter (whose dot of bf16 operands is wrong): the reference computes them."""
    leaves = make_inputs(1, 2, 9, 2, 2, 1, True, dtype=dtype)
    assert not uses_triton(leaves["qkv"])
    grad_out = torch.randn(2, 9, 2, HEAD_DIM, dtype=dtype)
    out, grads = outputs_and_grads("qkv", leaves, 2, grad_out)
    want_out, want_grads = outputs_and_grads(naive.prompt_attention, leaves, 2, grad_out)
    assert torch.equal(out, want_out)
    for name in grads:
        assert torch.equal(grads[name], want_grads[name]), name


@interpreter_only
def test_empty_prompt_sets_get_empty_gradients():
    """Zero local prompts per group and zero global prompts, given as tensors: the kernels' result
    and gradients of every shape, as the fake implementation says."""
    leaves = make_inputs(2, 2, 20, 1, 1, 1, True, dtype=torch.float32)
    leaves["local_k"], leaves["local_v"] = (t[:, :0] for t in (leaves["local_k"], leaves["local_v"]))
    leaves["global_k"], leaves["global_v"] = (t[:0] for t in (leaves["global_k"], leaves["global_v"]))
    grad_out = torch.randn(4, 20, 1, HEAD_DIM)
    out, grads = outputs_and_grads("qkv", leaves, 2, grad_out)
    want_out, want_grads = outputs_and_grads(naive.prompt_attention, {k: t.double() for k, t in leaves.items()}, 2,
                                             grad_out.double())
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    for name, want in want_grads.items():
        assert grads[name].shape == leaves[name].shape, name
        torch.testing.assert_close(grads[name].double(), want, atol=1e-5, rtol=1e-5, msg=name)
