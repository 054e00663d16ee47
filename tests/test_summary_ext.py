"""The compiled summary op (vitaclip._C, csrc/) against the plain PyTorch path, on the CPU.

Run with the extension built (the editable install builds it). Setting VITACLIP_DISABLE_EXT=1
for the whole run skips the tests that need it; otherwise a missing build fails them.
"""
import copy
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import vitaclip
from conftest import CLASSES, random_video, zeros_made_during
from vitaclip import VitaCLIP, VitaCLIPConfig
from vitaclip.ops import naive, summary, summary_ext
from vitaclip.vision import Attention

needs_ext = pytest.mark.skipif(os.environ.get(summary.DISABLE_ENV) == "1",
                               reason="VITACLIP_DISABLE_EXT=1 for this run")
CSRC = Path(__file__).resolve().parents[1] / "csrc"


def make_summary_layer(width, heads, dtype=torch.float32, device="cpu", seed=0):
    """LayerNorm + attention with every parameter random (zero biases would hide bias bugs)."""
    torch.manual_seed(seed)
    norm, attn = nn.LayerNorm(width), Attention(width, heads)
    for module in (norm, attn):
        module.to(device=device, dtype=dtype)
        for p in module.parameters():
            nn.init.normal_(p, std=width ** -0.5 if p.dim() == 2 else 0.5)
    norm.weight.data += 1
    return norm, attn


def parameters_of(norm, attn):
    return [norm.weight, norm.bias, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight, attn.k_proj.bias,
            attn.v_proj.weight, attn.v_proj.bias, attn.out_proj.weight, attn.out_proj.bias]


def op_args(c, norm, attn, heads):
    return (c, *summary_ext.op_arguments(norm, attn), heads, norm.eps)


def relative_error(got, want):
    """max |got - want| relative to max |want|, at least 1: the gradient of k's bias is exactly
    zero (softmax ignores a shift shared by all keys), so only its absolute error means anything."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1.0))


def output_and_grads(fn, c, norm, attn, heads, grad):
    c = c.detach().requires_grad_()
    out = fn(c, norm, attn, heads)
    return out, torch.autograd.grad(out, [c, *parameters_of(norm, attn)], grad)


@needs_ext
def test_extension_is_built_and_active():
    assert summary_ext.is_built(), f"vitaclip._C did not load: {summary_ext.LOAD_ERROR}"
    assert vitaclip.extension_available()
    assert torch.ops.vitaclip.summary_attention.default is not None


@needs_ext
@pytest.mark.parametrize("groups", [1, 5])
@pytest.mark.parametrize("heads", [1, 2, 4])
@pytest.mark.parametrize("width", [64, 96])
@pytest.mark.parametrize("frames", [1, 3, 8])
def test_matches_pytorch_path(groups, frames, width, heads):
    norm, attn = make_summary_layer(width, heads, seed=groups * 1000 + frames * 100 + width + heads)
    c = torch.randn(groups, frames, width)
    grad = torch.randn(groups, frames, width)
    out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, heads, grad)
    ref, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, heads, grad)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    with torch.no_grad():  # inference skips the autograd node
        inference = summary_ext.summary_tokens(c, norm, attn, heads)
    assert inference.grad_fn is None
    torch.testing.assert_close(inference, out.detach(), atol=0, rtol=0)
    names = ["c", "ln.weight", "ln.bias", "q.weight", "q.bias", "k.weight", "k.bias", "v.weight", "v.bias",
             "out.weight", "out.bias"]
    for name, g, ref_g in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, ref_g, atol=5e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@needs_ext
def test_gradcheck_float64():
    norm, attn = make_summary_layer(4, 2, dtype=torch.float64)
    args = list(op_args(torch.randn(2, 3, 4, dtype=torch.float64), norm, attn, 2))
    tensors = [a.detach().requires_grad_() for a in args[:11]]
    assert torch.autograd.gradcheck(
        lambda *t: torch.ops.vitaclip.summary_attention(*t, *args[11:])[0], tensors)


def backward_arguments(args, grad_out=None):
    """The backward op's arguments for the forward op's `args` (tensors detached)."""
    _, normed, qkv, heads_out, mean, rstd, qkv_params = torch.ops.vitaclip.summary_attention(*args)
    c, ln_weight, o_w, heads = args[0], args[1], args[9], args[11]
    grad_out = torch.randn(c.shape) if grad_out is None else grad_out
    return [grad_out, c.detach(), normed, qkv, heads_out, mean, rstd, ln_weight.detach(), qkv_params, o_w.detach(),
            heads]


@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_opcheck(layout):
    norm, attn = make_summary_layer(16, 2)
    c = torch.randn(3, 4, 16) if layout == "contiguous" else torch.randn(4, 3, 16).transpose(0, 1)
    args = op_args(c.requires_grad_(), norm, attn, 2)
    torch.library.opcheck(torch.ops.vitaclip.summary_attention.default, args)
    torch.library.opcheck(torch.ops.vitaclip.summary_attention_backward.default, backward_arguments(args))


@needs_ext
def test_backward_op_checks_its_inputs():
    """The backward op is public: a mismatched call is a clear error, not an out-of-bounds read."""
    norm, attn = make_summary_layer(16, 2)
    good = backward_arguments(op_args(torch.randn(3, 4, 16), norm, attn, 2))
    bad = {10: (0, "divisible"), 7: (torch.randn(5), "ln_weight has shape"),
           8: (torch.randn(3 * 16 * 16), "qkv_params has shape"), 9: (torch.randn(16, 32), "out_weight has shape"),
           0: (torch.randn(3, 4, 8), "grad_out has shape"), 5: (torch.randn(12, dtype=torch.float64), "mean must be")}
    for index, (value, message) in bad.items():
        args = list(good)
        args[index] = value
        with pytest.raises(ValueError, match=message):
            torch.ops.vitaclip.summary_attention_backward(*args)
    args = list(good)
    args[10] = 3  # 16 is not a whole number of 3 heads
    with pytest.raises(ValueError, match="divisible"):
        torch.ops.vitaclip.summary_attention_backward(*args)


@needs_ext
def test_backward_fills_no_zero_gradients_for_its_saved_outputs():
    """The op's other outputs (normed, qkv, ...) are for its backward only: autograd must not make
    zero gradients for them (six more launches per layer on the GPU)."""
    norm, attn = make_summary_layer(64, 2)
    c = torch.randn(2, 3, 64, requires_grad=True)
    out = summary_ext.summary_tokens(c, norm, attn, 2)
    assert zeros_made_during(lambda: torch.autograd.grad(out, [c, *parameters_of(norm, attn)],
                                                         torch.randn_like(out))) == 0


@needs_ext
def test_double_backward_is_refused():
    norm, attn = make_summary_layer(16, 2)
    c = torch.randn(3, 4, 16, requires_grad=True)
    out = summary_ext.summary_tokens(c, norm, attn, 2)
    with pytest.raises(RuntimeError, match="double backward"):  # not a grad that silently lacks a term
        torch.autograd.grad(out.square().sum(), c, create_graph=True)
    torch.autograd.grad(summary_ext.summary_tokens(c, norm, attn, 2).square().sum(), c)  # a plain one works


@pytest.fixture
def paths_taken(monkeypatch):
    """The summary paths `summary.summary_tokens` takes, in order ("naive" or "ext")."""
    ran = []
    monkeypatch.setattr(naive, "summary_tokens", lambda *a: ran.append("naive") or a[0])
    monkeypatch.setattr(summary_ext, "summary_tokens", lambda *a: ran.append("ext") or a[0])
    return ran


@needs_ext
def test_a_device_the_build_has_no_kernels_for_takes_the_pytorch_path(monkeypatch, paths_taken):
    """A CPU-only build (no CUDA toolkit at install time) on CUDA tensors: PyTorch, not an error."""
    norm, attn = make_summary_layer(8, 2)
    assert summary_ext.runs_on(torch.device("cpu")) and not summary_ext.runs_on(torch.device("meta"))
    monkeypatch.setattr(summary_ext, "KERNEL_DEVICES", frozenset({"cuda"}))  # as if built without CPU kernels
    assert not summary_ext.runs_on(torch.device("cpu"))
    summary.summary_tokens(torch.randn(1, 2, 8), norm, attn, 2)
    assert paths_taken == ["naive"]


@needs_ext
def test_a_gpu_the_build_has_no_code_for_takes_the_pytorch_path(monkeypatch):
    """A V100 or T4 with the default build for 8.0 and 9.0 failed at launch ("no kernel image"):
    the driver is asked once per GPU whether the kernels run there."""
    if "cuda" not in summary_ext.KERNEL_DEVICES:
        pytest.skip("built without CUDA kernels")
    if not torch.cuda.is_available():  # the driver's answer where there is no GPU
        assert torch.ops.vitaclip.cuda_kernels_run_on(0) is False
    asked = []
    monkeypatch.setattr(summary_ext, "_RUNS_ON_GPU", {})
    monkeypatch.setattr(torch.ops.vitaclip, "cuda_kernels_run_on", lambda index: asked.append(index) or index == 1,
                        raising=False)
    assert [summary_ext.runs_on(torch.device("cuda", i)) for i in (0, 1, 0)] == [False, True, False]
    assert asked == [0, 1]


@needs_ext
def test_the_gpu_question_is_answered_while_tracing_not_in_the_graph():
    """The compiled layers call the summary step: asking the driver must not break their graph."""
    if "cuda" not in summary_ext.KERNEL_DEVICES:
        pytest.skip("built without CUDA kernels")
    answer = summary_ext.runs_on(torch.device("cuda", 0))

    def step(x):
        return x + 1 if summary_ext.runs_on(torch.device("cuda", 0)) else x - 1

    assert torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(2)).tolist() == [1 if answer else -1] * 2


def test_a_gpus_shared_memory_is_asked_once_and_while_tracing(monkeypatch):
    asked = []
    monkeypatch.setattr(summary_ext, "_SHARED_MEMORY", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: asked.append(index)
                        or SimpleNamespace(shared_memory_per_block_optin=1000 * index))
    assert [summary_ext.shared_memory_per_block(i) for i in (2, 1, 2)] == [2000, 1000, 2000]
    assert asked == [2, 1]

    def step(x):
        return x + 1 if summary_ext.shared_memory_per_block(3) > 2500 else x - 1

    assert torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(2)).tolist() == [1, 1]
    assert asked == [2, 1, 3]


@needs_ext
def test_a_library_built_before_the_gpu_question_existed_takes_the_pytorch_path_with_a_warning(monkeypatch):
    if "cuda" not in summary_ext.KERNEL_DEVICES:
        pytest.skip("built without CUDA kernels")
    monkeypatch.setattr(summary_ext, "_RUNS_ON_GPU", {})

    def missing(index):
        raise AttributeError("'_OpNamespace' 'vitaclip' object has no attribute 'cuda_kernels_run_on'")

    monkeypatch.setattr(torch.ops.vitaclip, "cuda_kernels_run_on", missing, raising=False)
    with pytest.warns(UserWarning, match="rebuild the package"):
        assert not summary_ext.runs_on(torch.device("cuda", 0))


@needs_ext
@pytest.mark.parametrize("autocast", [False, True])
def test_torch_compile_matches_eager(autocast):
    """Also under autocast, where tracing goes through the op's autocast kernel (its casts)."""
    norm, attn = make_summary_layer(32, 4)
    c, grad = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    torch._dynamo.reset()
    compiled = torch.compile(summary_ext.summary_tokens, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, grads = output_and_grads(compiled, c, norm, attn, 4, grad)
        ref, ref_grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, 4, grad)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def assert_no_worse_than_pytorch(fast, slow, reference, floor):
    """Each of the op's outputs/gradients is at most twice as far from the float64 reference as
    the PyTorch path's in the same dtype (plus `floor`): judged by what PyTorch itself achieves."""
    names = ["out", "c", "ln.weight", "ln.bias", "q.weight", "q.bias", "k.weight", "k.bias", "v.weight",
             "v.bias", "out.weight", "out.bias"]
    for name, got, baseline, want in zip(names, fast, slow, reference):
        err, baseline_err = relative_error(got, want), relative_error(baseline, want)
        assert err <= 2 * baseline_err + floor, f"{name}: relative error {err:.3g}, PyTorch {baseline_err:.3g}"


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float64(dtype):
    """Half-precision inputs with fp32 accumulation on the CPU."""
    norm, attn = make_summary_layer(64, 4, dtype=torch.float64)
    c, grad = torch.randn(3, 8, 64, dtype=torch.float64), torch.randn(3, 8, 64, dtype=torch.float64)
    out, grads = output_and_grads(naive.summary_tokens, c, norm, attn, 4, grad)
    norm, attn, c, grad = norm.to(dtype), attn.to(dtype), c.to(dtype), grad.to(dtype)
    fast, fast_grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, 4, grad)
    slow, slow_grads = output_and_grads(naive.summary_tokens, c, norm, attn, 4, grad)
    assert fast.dtype == dtype
    assert_no_worse_than_pytorch([fast, *fast_grads], [slow, *slow_grads], [out, *grads], floor=1e-2)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autocast_matches_pytorch_path(dtype):
    """Under bf16 autocast the op is as close to the float64 computation as the PyTorch path under it,
    give or take a few of bf16's roundings (2**-8 each; `floor`). Compared with each other, the two
    differed by up to 3.4% (torch 2.11) in the gradient of k's bias, which is exactly zero: rounding
    noise is all there is in it, and its size depends on torch's version."""
    norm, attn = make_summary_layer(32, 2)
    c, grad = torch.randn(2, 8, 32, dtype=dtype), torch.randn(2, 8, 32, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, 2, grad)
        ref, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, 2, grad)
    assert out.dtype == ref.dtype == dtype
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads]
    exact = output_and_grads(naive.summary_tokens, c.double(), copy.deepcopy(norm).double(),
                             copy.deepcopy(attn).double(), 2, grad.double())
    assert_no_worse_than_pytorch([out, *grads], [ref, *ref_grads], [exact[0], *exact[1]], floor=2e-2)


@needs_ext
def test_the_op_under_autocast_runs_as_on_inputs_cast_to_its_dtype():
    """Called under autocast, the op runs as on its inputs cast to autocast's dtype (as the
    projections it replaces would) and returns `out` in the dtype of the residual sum (fp32 for an
    fp32 c); its backward, which runs in the caller's autocast state, computes in the saved inputs'
    dtype whatever that state (the matmuls inside would otherwise run in bf16 and the kernels read
    their outputs as fp32)."""
    norm, attn = make_summary_layer(32, 2)
    c, grad = torch.randn(2, 8, 32), torch.randn(2, 8, 32)
    leaves = [c.requires_grad_(), *summary_ext.op_arguments(norm, attn)]

    def run(inputs, autocast_forward, autocast_backward):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_forward):
            out = torch.ops.vitaclip.summary_attention(*inputs, 2, norm.eps)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_backward):
            return [out, *torch.autograd.grad(out, inputs, grad.to(out.dtype))]

    cast = [t.detach().bfloat16().requires_grad_() for t in leaves]
    expected = [t.float() for t in run(cast, False, False)]
    for got, want in zip(run(leaves, True, False), expected):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = run(leaves, False, False)
    for got, want in zip(run(leaves, False, True), plain):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert (plain[0] - expected[0]).abs().max() > 0  # the autocast run did compute in bf16


@needs_ext
def test_autocast_leaves_float64_alone_as_for_the_pytorch_path():
    norm, attn = make_summary_layer(32, 2, dtype=torch.float64)
    c, grad = torch.randn(2, 8, 32, dtype=torch.float64), torch.randn(2, 8, 32, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = output_and_grads(summary_ext.summary_tokens, c, norm, attn, 2, grad)
        ref, ref_grads = output_and_grads(naive.summary_tokens, c, norm, attn, 2, grad)
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        assert got.dtype == want.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@needs_ext
def test_env_switch_picks_the_path(monkeypatch, paths_taken):
    norm, attn = make_summary_layer(8, 2)
    c = torch.randn(1, 2, 8)
    monkeypatch.setenv(summary.DISABLE_ENV, "1")
    assert not vitaclip.extension_available()
    summary.summary_tokens(c, norm, attn, 2)
    monkeypatch.setenv(summary.DISABLE_ENV, "0")
    assert vitaclip.extension_available()
    summary.summary_tokens(c, norm, attn, 2)
    assert paths_taken == ["naive", "ext"]


@needs_ext
def test_bad_input_is_a_value_error():
    norm, attn = make_summary_layer(8, 2)
    with pytest.raises(ValueError, match="divisible"):
        summary.summary_tokens(torch.randn(1, 2, 8), norm, attn, 3)
    with pytest.raises(ValueError, match=r"\[groups, frames, width\]"):
        torch.ops.vitaclip.summary_attention(*op_args(torch.randn(2, 8), norm, attn, 2))
    with pytest.raises(ValueError, match="dtype"):
        torch.ops.vitaclip.summary_attention(*op_args(torch.randn(1, 2, 8, dtype=torch.float64), norm, attn, 2))
    with pytest.raises(ValueError, match="k_weight has shape"):
        args = list(op_args(torch.randn(1, 2, 8), norm, attn, 2))
        args[5] = torch.randn(16, 8)
        torch.ops.vitaclip.summary_attention(*args)


@needs_ext
def test_parameters_are_read_as_the_modules_give_them():
    """The op reads parameters off the modules' tables directly (host time); a parametrized weight
    (a property, not in the table) is still the one the module computes with, gradients included,
    and a missing bias or projection is refused by name."""
    norm, attn = make_summary_layer(8, 2)
    assert summary_ext.op_arguments(norm, attn) == parameters_of(norm, attn)
    scale = nn.Parameter(torch.tensor(1.5))

    class Scaled(nn.Module):
        def forward(self, weight):
            return weight * scale

    nn.utils.parametrize.register_parametrization(attn.k_proj, "weight", Scaled())
    c, grad = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    out = summary_ext.summary_tokens(c, norm, attn, 2)
    ref = naive.summary_tokens(c, norm, attn, 2)
    torch.testing.assert_close(out, ref)
    got, want = (torch.autograd.grad(y, scale, grad) for y in (out, ref))
    torch.testing.assert_close(got, want)
    assert want[0].abs() > 0
    attn.v_proj.bias = None
    with pytest.raises(ValueError, match="biases"):
        summary_ext.op_arguments(norm, attn)
    del attn.out_proj
    with pytest.raises(ValueError, match="projections"):
        summary_ext.op_arguments(norm, attn)


@needs_ext
@pytest.mark.parametrize("autocast", [False, True])
def test_whole_model_same_with_extension_on_and_off(monkeypatch, autocast):
    """Also under bf16 autocast (the op's autocast kernel against the projections' own casts),
    there within bf16's rounding."""
    config = VitaCLIPConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, embed_dim=32, num_frames=3,
                            text_width=32, text_layers=1, text_heads=2, n_ctx=2, num_global_prompts=2)
    model = VitaCLIP(config, CLASSES)
    with torch.no_grad():  # the summary attention starts with zero biases: make every term count
        for name, p in model.named_trainable_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    video = random_video(config, batch=2, frames=6)  # two groups of T0 = 3 frames per video
    names, params = zip(*model.named_trainable_parameters())
    assert any("summary" in n for n in names)
    ext_calls = []
    compiled_summary = summary_ext.summary_tokens
    monkeypatch.setattr(summary_ext, "summary_tokens", lambda *a: ext_calls.append(1) or compiled_summary(*a))

    def logits_and_grads(disable):
        monkeypatch.setenv(summary.DISABLE_ENV, disable)
        assert vitaclip.extension_available() == (disable == "0")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(video)
        return logits, torch.autograd.grad(logits.float().square().sum(), params)

    logits, grads = logits_and_grads("0")
    assert len(ext_calls) == config.layers
    ref_logits, ref_grads = logits_and_grads("1")
    assert len(ext_calls) == config.layers
    if autocast:
        for name, got, want in zip(["logits", *names], [logits, *grads], [ref_logits, *ref_grads]):
            assert got.dtype == want.dtype and relative_error(got, want) < 1e-2, (name, relative_error(got, want))
        return
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name, g, ref_g in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, ref_g, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


def test_cuda_sources_compile():
    """nvcc -c of the CUDA kernels for sm_80 and sm_90 (one call), as setup.py builds them."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS, include_paths
    objects = Path(os.environ.get("TMPDIR", "/tmp")) / f"vitaclip_nvcc_{os.getpid()}.o"
    command = [nvcc, "-c", str(CSRC / "cuda" / "summary_attention_kernels.cu"), "-o", str(objects),
               "-std=c++20", "-O3", "-Xcompiler", "-fPIC", *COMMON_NVCC_FLAGS,
               *(f"-I{p}" for p in include_paths()),
               "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        assert objects.stat().st_size > 0
    finally:
        objects.unlink(missing_ok=True)


@pytest.mark.skipif(not summary.extension_available(), reason="needs the built extension, switched on")
def test_shapes_whose_shared_memory_does_not_fit_take_the_pytorch_path(monkeypatch, paths_taken):
    """A shape the CUDA kernels' shared memory cannot hold (one wide head, many frames) must
    fall back to PyTorch; the check is asked per call (here made to say no, as a GPU would)."""
    norm, attn = nn.LayerNorm(8), Attention(8, 2)
    asked = []
    monkeypatch.setattr(summary_ext, "shared_memory_fits", lambda c, heads: asked.append((tuple(c.shape), heads)))
    summary.summary_tokens(torch.randn(1, 2, 8), norm, attn, 2)
    assert paths_taken == ["naive"] and asked == [((1, 2, 8), 2)]
    monkeypatch.setattr(summary_ext, "shared_memory_fits", lambda c, heads: True)
    summary.summary_tokens(torch.randn(1, 2, 8), norm, attn, 2)
    assert paths_taken == ["naive", "ext"]


@pytest.mark.parametrize("disable", ["1", "0"])
def test_a_width_not_divisible_by_the_heads_is_a_value_error_on_either_path(monkeypatch, disable):
    """The C++ op names this itself, so the existing test (extension on) passed without the
    Python check; on the PyTorch path (VITACLIP_DISABLE_EXT=1, or no build) it is what names it."""
    monkeypatch.setenv(summary.DISABLE_ENV, disable)
    norm, attn = nn.LayerNorm(8), Attention(8, 2)
    with pytest.raises(ValueError, match="divisible"):
        summary.summary_tokens(torch.randn(1, 2, 8), norm, attn, 3)
