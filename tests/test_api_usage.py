"""The model used from Python as a researcher uses any torch model: modes, devices, copies."""
import dataclasses

import pytest
import torch

from conftest import CLASSES, needs_triton_kernels, random_video, randomize_, tiny_config
from vitaclip import VitaCLIP, backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def fast_anywhere(monkeypatch):
    """The "fast" backend selectable on this device (offered only on CUDA: on CPU it runs the interpreter)."""
    backends.available_backends()  # imports vitaclip.fast, which registers it
    monkeypatch.setitem(backends._BACKENDS, "fast",
                        dataclasses.replace(backends._BACKENDS["fast"], is_available=lambda device: True))


@pytest.mark.parametrize("templates", [None, ["a video of {}."]])
def test_text_features_cached_under_inference_mode_serve_autograd(templates):
    """Class features cached in an inference_mode evaluation are normal tensors: a training forward
    after it (zero-shot classes) and the features used in a graph of the user's own work."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES))
    video = random_video(model.config)
    with torch.inference_mode():
        if templates is not None:
            model.set_classes(["run", "walk", "swim"], templates=templates)
        expected = model(video)
        features = model.text_features()
    assert not features.is_inference()
    model(video).sum().backward()  # saves the class features for the video features' gradient
    assert all(p.grad is not None for p in model.visual.parameters() if p.requires_grad)
    weights = torch.ones(features.shape[1], requires_grad=True)
    (features @ weights).sum().backward()
    with torch.no_grad():
        assert torch.equal(model(video), expected)


@pytest.mark.parametrize("templates", [None, ["a video of {}."]])
def test_forward_on_the_meta_device_gives_shapes(templates):
    """A model moved to the meta device (shape and FLOP counts without memory) runs: the
    autocast switches it uses exist on no meta device."""
    model = VitaCLIP(tiny_config(), CLASSES)
    if templates is not None:
        model.set_classes(["run", "walk"], templates=templates)
    model.to("meta")
    video = random_video(model.config).to("meta")
    logits = model(video)
    assert logits.is_meta and logits.shape == (2, len(model.classnames))
    with torch.no_grad():
        assert model(video).shape == logits.shape
    logits.sum().backward()
    assert model.logit_scale.grad.is_meta


def test_forward_hooks_on_the_vision_layers_run():
    """Hooks on `visual.blocks[i]` (the usual way to read a layer's features) see each layer's input
    and output, which a frozen backbone's probe reads; they were never called (the backends ran the
    layers as functions)."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend="reference"))
    video = random_video(model.config)
    seen = []
    for block in model.visual.blocks:
        block.register_forward_hook(lambda block, args, out: seen.append((args[0], out)))
    model(video)
    assert len(seen) == len(model.visual.blocks)
    assert torch.equal(seen[0][0], model.visual.embed(video))
    (out, pending), (next_input, _) = seen[0][1], seen[1]
    assert pending is None and torch.equal(out, next_input)


@needs_triton_kernels
def test_forward_hooks_see_the_same_layer_outputs_on_the_fast_backend(fast_anywhere):
    """What a hook on a layer reads, x' + pending' (the fast backend defers a residual add without
    gradients), is the reference's layer output; its last layer gives the class tokens alone."""
    outputs = {}
    for backend in ("reference", "fast"):
        torch.manual_seed(0)  # the same weights and video for both
        model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend=backend)).to(DEVICE)
        outputs[backend] = seen = []
        for block in model.visual.blocks:
            block.register_forward_hook(lambda block, args, out, seen=seen: seen.append(
                out[0] if out[1] is None else out[0] + out[1]))
        with torch.no_grad():
            model(random_video(model.config).to(DEVICE))
    (*ref_layers, ref_last), (*fast_layers, fast_last) = outputs["reference"], outputs["fast"]
    for ref, fast in zip(ref_layers, fast_layers, strict=True):
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_last[:, 0], ref_last[:, 0], rtol=1e-4, atol=1e-4)


def test_forward_hooks_on_every_text_layer_run():
    """The last text layer computes the end-of-text rows alone; a hook on it runs all the same."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES))
    seen = []
    for block in model.textual.transformer.resblocks:
        block.register_forward_hook(lambda block, args, out: seen.append(out))
    model.encode_text(["a video of archery."])
    assert len(seen) == len(model.textual.transformer.resblocks)
    assert seen[-1].shape == (1, model.config.text_width)


def test_a_channels_last_model_gives_the_same_logits_and_gradients():
    """`model.to(memory_format=torch.channels_last)`, routine for convolutional models, turns the
    patch convolution's weight channels-last; the patch embedding read it as a contiguous view."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES))
    model.visual.patch_embed.proj.weight.requires_grad_(True)
    video = random_video(model.config)

    def logits_and_grad():
        model.zero_grad(set_to_none=True)
        logits = model(video)
        logits.sum().backward()
        return logits.detach(), model.visual.patch_embed.proj.weight.grad.clone()

    want, want_grad = logits_and_grad()
    model.to(memory_format=torch.channels_last)
    assert not model.visual.patch_embed.proj.weight.is_contiguous()
    got, got_grad = logits_and_grad()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao.quantization's
def test_a_dynamically_quantized_model_runs(monkeypatch):
    """torch.ao's dynamic quantization of the Linear layers (CPU deployment): the summary step's
    C++ op cannot take a quantized projection (its weight is a method), so it runs in PyTorch, as
    with the op switched off; it failed with the op's argument error."""
    quantize_dynamic = getattr(torch.ao.quantization, "quantize_dynamic", None)
    if quantize_dynamic is None:
        pytest.skip("this torch has no torch.ao.quantization.quantize_dynamic")
    model = randomize_(VitaCLIP(tiny_config(), CLASSES)).eval()
    video = random_video(model.config)
    quantized = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    with torch.no_grad():
        logits = quantized(video)
        monkeypatch.setenv("VITACLIP_DISABLE_EXT", "1")
        assert torch.equal(logits, quantized(video))


def test_setting_the_first_learned_classes_keeps_the_callers_trainable_choices():
    """A model built without classes: set_classes made its learned context and then reset every
    parameter to the public trainable set, silently freezing what the caller had unfrozen (and
    unfreezing what it had frozen); only the new context's trainability is set now."""
    model = VitaCLIP(tiny_config())
    model.visual.blocks[0].attn.q_proj.requires_grad_(True)
    model.logit_scale.requires_grad_(False)
    model.set_classes(CLASSES)
    assert model.visual.blocks[0].attn.q_proj.weight.requires_grad
    assert not model.logit_scale.requires_grad
    assert model.prompt_learner.ctx.requires_grad
    assert not model.visual.blocks[1].attn.q_proj.weight.requires_grad
