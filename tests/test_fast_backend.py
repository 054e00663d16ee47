"""The "fast" backend (fused QKV + Triton prompt attention) against the reference layer, whole model.

The fast model in fp32 is compared with the reference model in float64 (on CPU the Triton
kernels run under the interpreter, see conftest.py): logits and the gradient of every
trainable parameter. On CUDA also ViT-B/16 under bf16 autocast.
"""
import copy
import dataclasses
import pickle

import pytest
import torch

from conftest import check_user_compile, needs_triton_kernels, randomize_, run_in_own_process
from vitaclip import VitaCLIPConfig, backends, compiling, fast, vision
from vitaclip.model import VitaCLIP
from vitaclip.text import TextEncoder
from vitaclip.vision import VisionTransformer

pytestmark = needs_triton_kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CLASSNAMES = ["archery", "baking_cookies", "juggling balls"]


@pytest.fixture
def fast_anywhere(monkeypatch):
    """Make the fast backends selectable on this device (they are offered only on CUDA: on CPU
    they run the interpreter). On CPU, "fast-compiled" compiles with aot_eager: the same graph
    capture (fullgraph for the layer) and autograd, without inductor's slow CPU code generation."""
    backends.available_backends()  # imports vitaclip.fast, which registers the backends
    for name in ("fast", "fast-compiled"):
        monkeypatch.setitem(backends._BACKENDS, name,
                            dataclasses.replace(backends._BACKENDS[name], is_available=lambda device: True))
    if DEVICE == "cpu":
        aot_eager = torch.compile(fast._layer, backend="aot_eager", dynamic=False, fullgraph=True)
        monkeypatch.setattr(fast, "compiled_layer", lambda: aot_eager)
        last = torch.compile(fast._class_token_layer, backend="aot_eager", dynamic=False, fullgraph=True)
        monkeypatch.setattr(fast, "compiled_class_token_layer", lambda: last)
        monkeypatch.setattr(TextEncoder, "compiled_transformer",
                            lambda self: torch.compile(self.transformer, backend="aot_eager", dynamic=False))
        embed = torch.compile(VisionTransformer.embed, backend="aot_eager", dynamic=False)
        monkeypatch.setattr(vision, "compiled_embed", lambda: embed)
    torch._dynamo.reset()


def tiny_config(**prompts):
    # 7x7 patches, two heads of dim 64, T0 = 3
    return VitaCLIPConfig(image_size=56, patch_size=8, width=128, layers=2, heads=2, embed_dim=32,
                          num_frames=3, text_width=64, text_layers=1, text_heads=1,
                          num_global_prompts=2, n_ctx=2, **prompts)


def layer_output(x, pending):
    """A layer's output from what its block_forward returns (see vision.BlockForward)."""
    return x if pending is None else x + pending


def logits_and_grads(model, video):
    model.zero_grad(set_to_none=True)
    logits = model(video)
    (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype, device=logits.device)
     .view_as(logits)).sum().backward()
    return logits.detach(), {name: p.grad for name, p in model.named_trainable_parameters()}


@pytest.mark.parametrize("backend,prompts", [
    ("fast", dict()),  # summary + local + global
    ("fast", dict(use_summary=False, use_local=False)),  # global only
    ("fast", dict(use_global=False, use_summary=False)),  # local only
    ("fast-compiled", dict()),
    ("fast backward=fused", dict()),  # "fast", with VITACLIP_ATTENTION_BACKWARD=fused
    ("fast backward=split-apart", dict()),
])
def test_fast_model_matches_reference(fast_anywhere, monkeypatch, backend, prompts):
    if " backward=" in backend:
        backend, attention_backward = backend.split(" backward=")
        monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", attention_backward)
    torch.manual_seed(0)
    # randomised: no LayerNorm is the identity, no bias zero, so a norm or bias mixed up shows
    model = randomize_(VitaCLIP(tiny_config(**prompts), classnames=CLASSNAMES, backend=backend)).to(DEVICE)
    reference = copy.deepcopy(model).double()
    reference.set_backend("reference")
    video = torch.randn(1, 3, 6, 56, 56, device=DEVICE)  # T = 6: two groups of T0 = 3

    logits, grads = logits_and_grads(model, video)
    ref_logits, ref_grads = logits_and_grads(reference, video.double())
    torch.testing.assert_close(logits.double(), ref_logits.double(), atol=1e-4, rtol=1e-4)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert grads[name] is not None, f"{name} got no gradient"
        scale = ref.abs().max().item()
        torch.testing.assert_close(grads[name].double(), ref, atol=1e-4 * scale + 1e-7, rtol=1e-3, msg=name)


def test_a_float64_fast_model_computes_in_float64_under_autocast(fast_anywhere):
    """Autocast leaves float64 alone, and so do the fast layers (they cast their weights to autocast's
    dtype whatever the model's)."""
    torch.manual_seed(0)
    model = VitaCLIP(tiny_config(), classnames=CLASSNAMES, backend="fast").to(DEVICE).double()
    reference = copy.deepcopy(model)
    reference.set_backend("reference")
    video = torch.randn(1, 3, 3, 56, 56, device=DEVICE, dtype=torch.float64)
    with torch.autocast(video.device.type, dtype=torch.bfloat16):
        logits = model(video)
    torch.testing.assert_close(logits, reference(video), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["fast", "fast-compiled", pytest.param("fast-graphed", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")])])
def test_the_model_compiled_whole_by_its_user_gives_its_results(fast_anywhere, backend):
    """The fast backends with their own compiling and CUDA graphs trace as "fast": the user's compile
    takes the whole pass, the prompt attention and summary ops inside its graph."""
    torch.manual_seed(5)
    model = randomize_(VitaCLIP(tiny_config(), classnames=CLASSNAMES, backend=backend)).to(DEVICE)
    check_user_compile(model, torch.randn(2, 3, 3, 56, 56, device=DEVICE))


@pytest.mark.parametrize("backend", ["fast", "fast-compiled"])
@pytest.mark.parametrize("layers", [1, 2])
def test_the_last_layer_computes_the_class_tokens_alone(fast_anywhere, monkeypatch, backend, layers):
    """After the last layer only the class tokens are read: it runs the one-query layer (a
    single-layer model too, whose only layer is also its first)."""
    shapes = []
    one_query = fast.class_token_attention
    monkeypatch.setattr(fast, "class_token_attention", lambda q, *a: shapes.append(tuple(q.shape)) or one_query(q, *a))
    torch.manual_seed(3)
    config = dataclasses.replace(tiny_config(), layers=layers)
    model = randomize_(VitaCLIP(config, classnames=CLASSNAMES, backend=backend)).to(DEVICE)
    reference = copy.deepcopy(model).double()
    reference.set_backend("reference")
    video = torch.randn(2, 3, 3, 56, 56, device=DEVICE)
    logits, grads = logits_and_grads(model, video)
    assert shapes == [(6, 2, 64)]  # once per forward, 2 clips x 3 frames, 2 heads of 64
    ref_logits, ref_grads = logits_and_grads(reference, video.double())
    torch.testing.assert_close(logits.double(), ref_logits.double(), atol=1e-4, rtol=1e-4)
    for name, ref in ref_grads.items():
        scale = ref.abs().max().item()
        torch.testing.assert_close(grads[name].double(), ref, atol=1e-4 * scale + 1e-7, rtol=1e-3, msg=name)


@pytest.mark.parametrize("backend", ["fast", "fast-compiled"])
def test_global_prompts_alone_take_any_frame_count(fast_anywhere, backend):
    """Without summary and local prompts T need not be a multiple of T0, in the last layer too."""
    torch.manual_seed(4)
    model = VitaCLIP(tiny_config(use_summary=False, use_local=False), classnames=CLASSNAMES, backend=backend).to(DEVICE)
    reference = copy.deepcopy(model).double()
    reference.set_backend("reference")
    video = torch.randn(1, 3, 4, 56, 56, device=DEVICE)  # T = 4, T0 = 3
    with torch.no_grad():
        torch.testing.assert_close(model(video).double(), reference(video.double()).double(), atol=1e-4, rtol=1e-4)


def test_compiled_backends_compile_the_video_embedding(fast_anywhere, monkeypatch):
    compiled_calls = []
    monkeypatch.setattr(vision, "compiled_embed", lambda: compiled_calls.append(1) or VisionTransformer.embed)
    model = VitaCLIP(tiny_config(), classnames=CLASSNAMES, backend="fast-compiled").to(DEVICE).eval()
    video = torch.randn(1, 3, 3, 56, 56, device=DEVICE)
    with torch.no_grad():
        model(video)
        assert compiled_calls == [1]
        model.set_backend("fast")
        model(video)
    assert compiled_calls == [1]


def test_fused_qkv_follows_weight_updates(fast_anywhere):
    torch.manual_seed(1)
    model = VitaCLIP(tiny_config(use_summary=False, use_local=False), classnames=CLASSNAMES,
                     backend="fast").to(DEVICE).eval()
    video = torch.randn(1, 3, 3, 56, 56, device=DEVICE)
    with torch.no_grad():
        before = model(video)
        model.visual.blocks[1].attn.k_proj.weight.mul_(2.0)  # in place: same storage, new version
        after = model(video)
        model.set_backend("reference")
        expected = model(video)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-4, rtol=1e-4)


def test_fast_layer_weights_of_a_model_made_under_inference_mode(fast_anywhere):
    """Its tensors keep no version counter, which the cached layer weights' key reads."""
    with torch.inference_mode():
        model = VitaCLIP(tiny_config(), classnames=CLASSNAMES, backend="fast").to(DEVICE)
        video = torch.randn(1, 3, 3, 56, 56, device=DEVICE)
        fast_logits = model(video)
        model.set_backend("reference")
        torch.testing.assert_close(fast_logits, model(video), atol=1e-4, rtol=1e-4)


def test_compiled_layers_leave_the_residual_add_to_the_next_only_without_gradients(monkeypatch):
    """Without gradients the first layer gets zeros for its pending part, so that every layer runs the
    same compiled graph (a None would be a second one); with them every layer gets the stream alone
    (given x and pending apart, a compiled layer keeps both for the backward: test_fast_memory.py)."""
    calls = []
    monkeypatch.setattr(fast, "compiled_layer", lambda: lambda *args: calls.append(args) or (args[0], args[1]))
    block = VitaCLIP(tiny_config(), classnames=CLASSNAMES).visual.blocks[0]
    x = torch.randn(3, 50, 128)
    with torch.no_grad():
        fast.fast_compiled_block_forward(block, x, None, None)
    pending, defer = calls[0][1], calls[0][-1]
    assert pending.shape == x.shape and pending.dtype == torch.float32 and not pending.any() and defer is True
    fast.fast_compiled_block_forward(block, x, None, None)
    assert calls[1][1] is None and calls[1][-1] is False


@pytest.mark.parametrize("grad", [False, True])
def test_a_layer_hands_on_the_same_stream_whether_it_leaves_the_residual_add_or_not(grad):
    model = randomize_(VitaCLIP(tiny_config(), classnames=CLASSNAMES, backend="reference"))
    block = model.visual.blocks[0]
    x, pending = torch.randn(6, 50, 128, dtype=torch.float64), torch.randn(6, 50, 128, dtype=torch.float64)
    model.double()
    weights = fast.layer_weights(block, torch.float64)
    with torch.set_grad_enabled(grad):
        parts = fast._layer(x, pending, None, weights, block, True)
        whole, none = fast._layer(x, pending, None, weights, block, False)
        want, _ = vision.reference_block_forward(block, x + pending, None, None)
    assert none is None
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whole, want, rtol=1e-10, atol=1e-10)


def test_frozen_weights_are_made_once_per_compute_dtype():
    block = VitaCLIP(tiny_config(), classnames=CLASSNAMES).visual.blocks[0]
    linears = (block.attn.out_proj, block.mlp.fc1, block.mlp.fc2)
    low = fast.layer_weights(block, torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in low)
    assert torch.equal(low.fc1_weight, block.mlp.fc1.weight.to(torch.bfloat16))
    assert torch.equal(low.qkv_weight[128:256], block.attn.k_proj.weight.to(torch.bfloat16))
    assert fast.layer_weights(block, torch.bfloat16).fc2_weight is low.fc2_weight  # cached: no cast per step
    full = fast.layer_weights(block, torch.float32)  # the parameters themselves where no cast is needed
    assert all(got is lin.weight for got, lin in zip((full.out_weight, full.fc1_weight, full.fc2_weight), linears))
    assert fast.layer_weights(block, torch.bfloat16).fc2_weight is low.fc2_weight  # each dtype kept
    with torch.no_grad():
        block.mlp.fc2.weight.mul_(2.0)  # in place: a new version, so a rebuild
    rebuilt = fast.layer_weights(block, torch.bfloat16)
    assert rebuilt.fc2_weight is not low.fc2_weight
    assert torch.equal(rebuilt.fc2_weight, block.mlp.fc2.weight.to(torch.bfloat16))


def test_derived_weights_go_with_a_move_and_stay_out_of_copies():
    block = VitaCLIP(tiny_config(), classnames=CLASSNAMES).visual.blocks[0]
    kept = fast.layer_weights(block, torch.bfloat16)
    block.to(torch.float32)  # changes nothing: kept (a CUDA graph may read them)
    assert fast.layer_weights(block, torch.bfloat16).fc1_weight is kept.fc1_weight
    assert not copy.deepcopy(block).derived and not pickle.loads(pickle.dumps(block)).derived
    assert block.derived  # the original keeps its own
    block.double()  # new memory: what was derived from the old weights goes (with its device memory)
    assert not block.derived


def test_trainable_backbone_gets_the_reference_gradients(fast_anywhere):
    """With the layer's own weights trainable too (not the default), every gradient matches."""
    from vitaclip.vision import reference_block_forward

    torch.manual_seed(2)
    block = randomize_(VitaCLIP(tiny_config(), classnames=CLASSNAMES).visual.blocks[0]).to(DEVICE).requires_grad_(True)
    x = torch.randn(3, 50, 128, device=DEVICE, requires_grad=True)
    pending = torch.randn(3, 50, 128, device=DEVICE, requires_grad=True)  # the previous layer's MLP output
    global_prompts = torch.randn(2, 128, device=DEVICE)
    grads = {}
    for name, forward in (("fast", fast.fast_block_forward), ("reference", reference_block_forward)):
        out = layer_output(*forward(block, x, pending, global_prompts))
        grads[name] = torch.autograd.grad(out.square().sum(), [x, pending, *block.parameters()])
    names = ["x", "pending"] + [name for name, _ in block.named_parameters()]
    for name, got, want in zip(names, grads["fast"], grads["reference"]):
        # k_proj.bias has a zero gradient (softmax ignores a shift shared by all keys): rounding only
        torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item() + 1e-5, rtol=1e-4, msg=name)


def test_training_after_inference_mode(fast_anywhere):
    """The fused QKV weight cached under inference_mode must still serve a training step."""
    model = VitaCLIP(tiny_config(use_summary=False, use_local=False), classnames=CLASSNAMES,
                     backend="fast").to(DEVICE)
    video = torch.randn(1, 3, 3, 56, 56, device=DEVICE)
    with torch.inference_mode():
        model(video)
    model(video).sum().backward()
    assert model.visual.time_embed.grad.abs().sum() > 0


def test_training_keeps_only_input_qkv_and_attention_output(fast_anywhere):
    """Of the layer's large activations only its input, the packed qkv and the attention output
    are saved for the backward; the rest (4C-wide MLP hidden included) is recomputed."""
    block = VitaCLIP(tiny_config(), classnames=CLASSNAMES).visual.blocks[0].to(DEVICE)
    x = torch.randn(3, 50, 128, device=DEVICE, requires_grad=True)
    pending = torch.randn(3, 50, 128, device=DEVICE, requires_grad=True)
    global_prompts = torch.randn(2, 128, device=DEVICE, requires_grad=True)
    saved = {}

    def pack(t):
        if t.dim() >= 3 and t.shape[0] == x.shape[0]:  # per-frame activations, not weights
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = layer_output(*fast.fast_block_forward(block, x, pending, global_prompts))
    stream = x.numel() * x.element_size()
    large = sorted(n for n in saved.values() if n >= stream)
    assert large == [stream, stream, 3 * stream], saved  # input x + pending, attention output, packed qkv
    out.sum().backward()  # the recomputation carries the gradient through
    assert x.grad.abs().sum() > 0 and pending.grad.abs().sum() > 0 and global_prompts.grad.abs().sum() > 0


def test_auto_picks_fast_graphed_on_cuda_only():
    assert backends.resolve_backend("auto", torch.device("cpu")).name == "reference"
    if torch.cuda.is_available():
        assert backends.resolve_backend("auto", torch.device("cuda")).name == "fast-graphed"


def test_auto_considers_the_fast_backends_in_a_fresh_process():
    # "auto" used to choose among the backends imported so far, so a script that never
    # named a backend ran the reference on CUDA
    code = ("import torch; from vitaclip import VitaCLIP, backends; "
            "backends.resolve_backend('auto', torch.device('cpu')); print(sorted(backends._BACKENDS))")
    out = run_in_own_process(code)
    assert "fast-compiled" in out, out


def relative_error(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# "split-apart" launches the split kernels otherwise grouped: checked at the op's level (test_prompt_attention)
@pytest.mark.parametrize("attention_backward", ["split", "fused"])
def test_gpu_fast_vit_b16_autocast_matches_reference(monkeypatch, attention_backward):
    """ViT-B/16 (random weights), 2 clips x 8 frames: the fast backend under autocast is as close to
    the fp32 reference as the reference itself under the same autocast, logits and every gradient
    (with either backward of the prompt attention)."""
    monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", attention_backward)
    torch.manual_seed(0)
    model = randomize_(VitaCLIP(VitaCLIPConfig.preset("ViT-B/16"), classnames=CLASSNAMES)).cuda()
    video = torch.randn(2, 3, 8, 224, 224, device="cuda")
    dtype = torch.bfloat16
    model.set_backend("reference")
    want_logits, want_grads = logits_and_grads(model, video)
    runs = {}
    for backend in ("reference", "fast"):
        model.set_backend(backend)
        with torch.autocast("cuda", dtype=dtype):
            runs[backend] = logits_and_grads(model, video)
    # k_proj.bias gets a zero gradient (softmax ignores a shift shared by all keys): rounding only.
    # The logit_scale gradient is the weighted logit sum itself (d/ds of sum w * e^s * cos), whose
    # weights of both signs cancel: its relative error is the logits' (checked) over a small total.
    skip = ("k_proj.bias", "logit_scale")
    for name in ["logits", *[n for n in want_grads if not n.endswith(skip)]]:
        pick = (lambda run: run[0]) if name == "logits" else (lambda run: run[1][name])
        want = want_logits if name == "logits" else want_grads[name]
        budget = relative_error(pick(runs["reference"]), want)
        err = relative_error(pick(runs["fast"]), want)
        assert err <= 2 * budget + 1e-3, f"{name}: fast error {err:.2e}, reference {dtype} error {budget:.2e}"



def test_compile_mode_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(compiling.COMPILE_MODE_ENV, raising=False)
    assert compiling.compile_mode() == "default"
    monkeypatch.setenv(compiling.COMPILE_MODE_ENV, "max-autotune-no-cudagraphs")
    modes, compile_kwargs = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compile_kwargs.append(kw) or modes.append(kw["mode"]) or fn)
    fast.compiled_layer.cache_clear()
    try:
        fast.compiled_layer()
    finally:
        fast.compiled_layer.cache_clear()  # the next user compiles for real
    assert modes == ["max-autotune-no-cudagraphs"]
    assert not compile_kwargs[0].get("fullgraph"), "one shape beyond the recompile limit would be a hard error"
    monkeypatch.setenv(compiling.COMPILE_MODE_ENV, "reduce-overhead")  # inductor's CUDA graphs: not offered
    with pytest.raises(ValueError, match="VITACLIP_COMPILE_MODE='reduce-overhead'"):
        compiling.compile_mode()


def test_compiled_layer_leaves_quick_gelu_to_the_compiler(fast_anywhere, monkeypatch):
    """Under torch.compile the layer's graph holds the plain QuickGELU (sigmoid), which inductor
    fuses with its neighbours, and the fused attention op; eagerly it calls the Triton QuickGELU."""
    block = VitaCLIP(tiny_config(), classnames=CLASSNAMES).visual.blocks[0].to(DEVICE)
    x = torch.randn(3, 50, 128, device=DEVICE)
    global_prompts = torch.randn(2, 128, device=DEVICE)
    targets = []

    def record(graph_module, example_inputs):  # the graph and its subgraphs (the recomputed MLP's)
        targets.extend(str(node.target) for module in graph_module.modules()
                       if isinstance(module, torch.fx.GraphModule) for node in module.graph.nodes)
        return graph_module

    compiled = torch.compile(fast._layer, backend=record, fullgraph=True, dynamic=False)
    out = compiled(x, None, global_prompts, fast.layer_weights(block, torch.float32), block, False)
    eager_calls = []
    triton_quick_gelu = fast.quick_gelu
    monkeypatch.setattr(fast, "quick_gelu", lambda t: eager_calls.append(t.shape) or triton_quick_gelu(t))
    torch.testing.assert_close(out, fast.fast_block_forward(block, x, None, global_prompts), atol=1e-5, rtol=1e-5)
    assert eager_calls == [(3, 50, 512)]
    assert any("prompt_attention" in t for t in targets), targets
    assert any("sigmoid" in t for t in targets) and not any("quick_gelu" in t for t in targets), targets
