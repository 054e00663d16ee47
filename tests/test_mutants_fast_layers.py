"""Behaviour of the fast layers (`vitaclip.fast`: the compile mode of the last layer's graph, the dtype
of the first compiled layer's zero `pending`, the device in the cached weights' key, the eager layer's
deferred residual add) that mutation testing found unpinned by the other tests. Each test checks against
a stated fact or a small computation of its own."""

import torch

from conftest import CLASSES, needs_triton_kernels, randomize_, tiny_config
from engine_helpers import one_thread
from vitaclip import VitaCLIP, compiling, fast, vision

assert one_thread  # engine_helpers' autouse fixture: one torch thread per test


def tiny_block():
    return VitaCLIP(tiny_config(), CLASSES).visual.blocks[0]


def test_the_class_token_layer_compiles_in_the_mode_the_environment_names(monkeypatch):
    """The last layer's graph is compiled apart from the others' (`compiled_class_token_layer`): in the
    mode VITACLIP_COMPILE_MODE names too, not torch.compile's default (which only another mode shows)."""
    monkeypatch.setenv(compiling.COMPILE_MODE_ENV, "max-autotune-no-cudagraphs")
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append((fn, kw)) or fn)
    fast.compiled_class_token_layer.cache_clear()
    try:
        fast.compiled_class_token_layer()
    finally:
        fast.compiled_class_token_layer.cache_clear()  # the next user compiles for real
    assert [(fn, kw.get("mode")) for fn, kw in calls] == [(fast._class_token_layer, "max-autotune-no-cudagraphs")]


def test_the_first_layers_zero_pending_has_the_dtype_of_an_mlp_output_under_autocast(monkeypatch):
    """Without gradients the first compiled layer gets zeros for `pending` so that it runs the other
    layers' graph: their pending is the previous MLP's output, which autocast computes in its own dtype
    (bfloat16 here), not in the fp32 stream's; zeros of the stream's dtype would be a second graph."""
    calls = []
    monkeypatch.setattr(fast, "compiled_layer", lambda: lambda *args: calls.append(args) or (args[0], args[1]))
    block = tiny_block()
    x = torch.randn(3, 50, block.mlp.fc2.out_features)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast.fast_compiled_block_forward(block, x, None, None)
        mlp_output = block.mlp.fc2(torch.zeros(1, block.mlp.fc2.in_features))
    pending = calls[0][1]
    assert mlp_output.dtype == torch.bfloat16 and x.dtype == torch.float32
    assert pending.shape == x.shape and pending.dtype == mlp_output.dtype and not pending.any()


def test_weights_cached_on_one_device_do_not_serve_another_with_the_same_memory_states(monkeypatch):
    """Addresses are per device (two devices' memory can have the same ones), so the key of the cached
    weights names the device: parameters replaced behind the module's back (assigned, not moved by
    `.to`, whose `_apply` clears `block.derived`) whose memory states compare equal must still get weights of their
    own device. The memory states are made to compare equal here; the meta device stands in for another."""
    block = tiny_block()
    monkeypatch.setattr(fast, "tensor_states", lambda tensors: ("the same memory states",))
    assert fast.layer_weights(block, torch.float32).qkv_weight.device.type == "cpu"
    for module in block.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad))
    assert block.derived  # kept: only the key can tell
    assert fast.layer_weights(block, torch.float32).qkv_weight.device.type == "meta"


@needs_triton_kernels
def test_the_eager_layer_leaves_the_residual_add_to_the_next_only_without_gradients():
    """The "fast" backend, like "fast-compiled", hands on its output in two parts (the stream after
    attention, the MLP output) where no gradient is recorded, the next layer adding them in its first
    kernel; with gradients as one. Either way the parts add up to the reference layer's output."""
    block = randomize_(tiny_block()).double()
    x = torch.randn(3, 50, block.mlp.fc2.out_features, dtype=torch.float64)
    want, _ = vision.reference_block_forward(block, x, None, None)
    with torch.no_grad():
        stream, pending = fast.fast_block_forward(block, x, None, None)
    assert pending is not None and pending.shape == x.shape
    torch.testing.assert_close(stream + pending, want, rtol=1e-10, atol=1e-10)
    whole, none = fast.fast_block_forward(block, x, None, None)
    assert none is None
    torch.testing.assert_close(whole, want, rtol=1e-10, atol=1e-10)
