"""The fast backend's cached layer weights (`fast.layer_weights`) never serve weights older than the
model's: frozen weights changed through a parametrization, in inference mode, or by a fused optimizer
while they trained."""
import copy

import torch
from torch.nn.utils import parametrize

from conftest import CLASSES, randomize_, tiny_config
from test_fast_backend import DEVICE, fast_anywhere  # noqa: F401  (fixture)
from test_graphs import fake_capture  # noqa: F401  (fixture)
from vitaclip import VitaCLIP, fast
from vitaclip.graphs import GraphCache


def fast_and_reference(model, video):
    with torch.no_grad():
        model.set_backend("fast")
        got = model(video)
        model.set_backend("reference")
        want = model(video)
    return got, want


class Times(torch.nn.Module):
    def forward(self, weight):
        return weight * 1.0


def test_an_edit_of_a_parametrized_weights_original_reaches_the_cached_weights():
    """A parametrized weight is computed afresh at each read, a new tensor of version 0 that the
    allocator may place where the last one was: the key reads the original it is computed from."""
    block = VitaCLIP(tiny_config(), CLASSES).visual.blocks[0]
    parametrize.register_parametrization(block.attn.k_proj, "weight", Times())
    width = block.attn.k_proj.weight.shape[0]
    original = block.attn.k_proj.parametrizations.weight.original
    for _ in range(10):  # where the allocator places the computed weight varies: an edit after each read
        fast.layer_weights(block, torch.float32)
        with torch.no_grad():
            original.add_(1)
        got = fast.layer_weights(block, torch.float32).qkv_weight[width:2 * width]
        torch.testing.assert_close(got, block.attn.k_proj.weight)


def test_a_model_made_in_inference_mode_and_reloaded_there_runs_the_new_weights(fast_anywhere):  # noqa: F811
    """Inference tensors keep no version counter: an in-place load leaves their key as it was."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = VitaCLIP(tiny_config(), CLASSES, backend="fast").to(DEVICE)
        other = randomize_(VitaCLIP(tiny_config(), CLASSES)).to(DEVICE)
        video = torch.randn(1, 3, 3, 56, 56, device=DEVICE)
        model(video)
        model.load_state_dict(other.state_dict())
        got, want = fast_and_reference(model, video)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_weights_trained_by_a_fused_optimizer_then_frozen_again_are_read_anew(fast_anywhere):  # noqa: F811
    """A fused optimizer steps without bumping version counters: weights cached before they trained
    must not come back once they are frozen again."""
    torch.manual_seed(0)
    model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend="fast")).to(DEVICE)
    video = torch.randn(1, 3, 3, 56, 56, device=DEVICE)
    fast_and_reference(model, video)  # caches the frozen weights
    model.set_backend("fast")
    attn = model.visual.blocks[0].attn
    attn.requires_grad_(True)
    optimizer = torch.optim.AdamW(attn.parameters(), lr=0.1, fused=True)
    model(video).square().sum().backward()
    optimizer.step()
    attn.requires_grad_(False)
    got, want = fast_and_reference(model, video)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_fast_gradients_of_every_unfrozen_parameter_match_the_reference(fast_anywhere):  # noqa: F811
    """Unfrozen between calls (after a frozen call cached the weights): every parameter's gradient."""
    torch.manual_seed(1)
    model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend="fast")).to(DEVICE)
    video = torch.randn(2, 3, 6, 56, 56, device=DEVICE)
    with torch.no_grad():
        model(video)
    model.requires_grad_(True)
    reference = copy.deepcopy(model).double()
    reference.set_backend("reference")
    grads = {}
    for name, net, v in (("fast", model, video), ("reference", reference, video.double())):
        logits = net(v)
        grads[name] = torch.autograd.grad((logits * torch.linspace(-1, 1, logits.numel(), device=DEVICE)
                                           .view_as(logits)).sum(), list(net.parameters()), allow_unused=True)
    for (name, _), got, want in zip(model.named_parameters(), grads["fast"], grads["reference"]):
        if want is None:
            assert got is None, name
            continue
        assert got is not None, name
        if name.endswith("k_proj.bias"):  # zero (softmax ignores a shift shared by all keys): rounding only
            continue
        torch.testing.assert_close(got.double(), want, atol=1e-4 * want.abs().max().item() + 1e-7, rtol=1e-3,
                                   msg=name)


def test_a_graph_captured_with_a_weight_frozen_does_not_come_back_after_it_trained(fake_capture):  # noqa: F811
    """Graphs read what derives from frozen weights (the fast layers' cached weights) as captured; a
    weight that trained with a fused optimizer (no version bump) and is frozen again has its old key."""
    model = VitaCLIP(tiny_config(), CLASSES, backend="reference")
    weight = model.visual.blocks[0].attn.q_proj.weight
    cache, x = GraphCache(), torch.zeros(2)

    def run():
        with torch.no_grad():
            return cache.run("pass", lambda v: v + 1, [x], [model.visual], x.device)

    run()
    assert run()[0] == "replayed"
    weight.requires_grad_(True)
    weight.grad = torch.ones_like(weight)
    run()
    torch.optim.AdamW([weight], fused=True).step()
    weight.requires_grad_(False)
    assert not isinstance(run(), tuple)  # run afresh, not the capture made before it trained


def test_a_captured_pass_keeps_what_it_read_from_the_modules_derived_tensors_alive(fake_capture):  # noqa: F811
    """A graph reads the fast layers' cast weights by address: dropped or remade by their block (a weight that
    trains, a move that clears them and lands at the same addresses), a replay read freed memory."""
    import gc
    import weakref

    model = VitaCLIP(tiny_config(), CLASSES, backend="reference")
    block = model.visual.blocks[0]
    cast = torch.ones(3)
    block.derived["fast weights"] = {torch.float32: ("key", (cast, [cast * 2]))}
    kept = weakref.ref(cast)
    cache, x = GraphCache(), torch.zeros(2)
    with torch.no_grad():
        for _ in range(2):  # captured at the second call
            cache.run("pass", lambda v: v + 1, [x], [model.visual], x.device)
    del cast
    block.derived.clear()
    gc.collect()
    assert kept() is not None
    cache.clear()
    gc.collect()
    assert kept() is None
