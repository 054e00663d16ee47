"""CUDA-graphed passes (backend "fast-graphed", vitaclip.graphs): the same logits and gradients as
the uncaptured fast path, outputs and gradients that survive later calls, recapture when frozen
weights change, and a clear error where a replay would differentiate overwritten activations."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, randomize_, tiny_config
from vitaclip import VitaCLIP
from vitaclip.graphs import GraphCache, _module_key

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_key_follows_frozen_weights_and_ignores_trained_ones():
    model = VitaCLIP(tiny_config(), CLASSES)
    key = _module_key([model.visual])
    with torch.no_grad():
        model.visual.global_prompts.add_(1)  # trained: read by the graph at replay
    assert _module_key([model.visual]) == key
    with torch.no_grad():
        model.visual.blocks[0].attn.q_proj.weight.add_(1)  # frozen: may be folded into cached tensors
    assert _module_key([model.visual]) != key
    model.visual.blocks[0].attn.q_proj.weight.requires_grad_(True)
    assert _module_key([model.visual]) != _module_key([copy.deepcopy(model).visual])


def test_copies_of_a_model_start_without_graphs():
    cache = GraphCache(capacity=3)
    cache._failed.add("a key")
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert isinstance(copied, GraphCache) and copied.capacity == 3 and not copied._failed


def test_new_classes_drop_the_text_passes_only():
    model = VitaCLIP(tiny_config(), CLASSES)
    model._graphs._passes.update({("fast-graphed video",): "video pass", ("fast-graphed text, truncate=True",): "text"})
    model.set_classes(CLASSES[::-1])
    assert list(model._graphs._passes) == [("fast-graphed video",)]


def test_without_cuda_the_plain_pass_runs():
    model = VitaCLIP(tiny_config(), CLASSES, backend="reference")
    video = torch.randn(1, 3, 3, 56, 56, requires_grad=True)  # inputs needing grad are never captured
    cache = GraphCache()
    out = cache.run("video", lambda v: v * 2, [video], [model.visual])
    assert out.requires_grad and len(cache) == 0


def _model(dtype_autocast=None):
    torch.manual_seed(0)
    model = randomize_(VitaCLIP(tiny_config(width=128, heads=2), CLASSES)).cuda()
    return model


def _step(model, video, labels, autocast):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(video), labels)
    loss.backward()
    return loss.detach()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_training_and_inference_match_the_uncaptured_fast_path(autocast):
    model = _model()
    videos = [torch.randn(2, 3, 3, 56, 56, device="cuda") for _ in range(3)]
    labels = torch.tensor([0, 3], device="cuda")
    results = {}
    for backend in ("fast-compiled", "fast-graphed"):
        model.set_backend(backend)
        model.zero_grad(set_to_none=True)
        losses = [_step(model, v, labels, autocast) for v in videos]  # grads accumulate over 3 steps
        grads = {n: p.grad.clone() for n, p in model.named_trainable_parameters() if p.grad is not None}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            first = model(videos[0])
            second = model(videos[1])
        results[backend] = (losses, grads, first, second)
    # video with and without grad, text with grad (without grad the model's text cache answered)
    captured = {(key[0], key[2]) for key in model._graphs._passes}
    assert captured == {("fast-graphed video", True), ("fast-graphed video", False),
                        ("fast-graphed text, truncate=True", True)}, captured
    (want_losses, want_grads, want_first, want_second), (losses, grads, first, second) = results.values()
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack(losses), torch.stack(want_losses), **tol)
    assert grads.keys() == want_grads.keys() and "prompt_learner.ctx" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], **tol, msg=name)
    torch.testing.assert_close(first, want_first, **tol)  # not overwritten by the second call
    torch.testing.assert_close(second, want_second, **tol)


@gpu
@pytest.mark.gpu
def test_frozen_weight_edit_recaptures_and_two_forwards_before_backward_raise():
    model = _model()
    model.set_backend("fast-graphed")
    video = torch.randn(2, 3, 3, 56, 56, device="cuda")
    with torch.no_grad():
        before = model(video)
        model.visual.blocks[1].mlp.fc2.weight.mul_(2)
        after = model(video)
        model.set_backend("fast-compiled")
        want = model(video)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)
    model.set_backend("fast-graphed")
    first = model.encode_video(video).sum()
    model.encode_video(video).sum()
    with pytest.raises(RuntimeError, match="forward again before the backward"):
        first.backward()
