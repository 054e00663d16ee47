"""Behaviour of the CUDA-graph capture cache (vitaclip.graphs) and of `vitaclip bench`
(vitaclip.engine.bench) that mutation testing found unpinned by the other tests. On the CPU, as in
test_graphs.py: FakeCapture (`fake_capture`) or the real capture with CUDA's graph and stream calls
made no-ops (`frozen_graphs`) stand in for a capture."""
import contextlib
import gc
import warnings
import weakref
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from engine_helpers import one_thread
from test_graphs import FakeCapture, fake_capture, frozen_graphs
from vitaclip.engine import bench
from vitaclip.graphs import CapturedPass, GraphCache, _module_state, tensor_states

assert one_thread and fake_capture and frozen_graphs  # fixtures: one torch thread; captures on the CPU


def frozen_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2), nn.Tanh()).requires_grad_(False)


def replayed(result) -> bool:
    """Whether a GraphCache.run under `fake_capture` answered from a capture (FakeCapture tags it)."""
    return isinstance(result, tuple) and result[0] == "replayed"


def run(cache, net, x, device=None, name="pass"):
    return cache.run(name, lambda v: v + 1, [x], [net], x.device if device is None else device)


def captured_on_second_call(cache, net, x, **kwargs) -> bool:
    """Runs a key twice: True when the first call ran plain and the second from a capture."""
    return not replayed(run(cache, net, x, **kwargs)) and replayed(run(cache, net, x, **kwargs))


def key_of(*modules):
    modes, weights, _, _ = _module_state(modules)
    return modes, weights


# ------------------------------------------------------------------------------ the capture itself


def test_a_capture_never_writes_into_the_callers_input_and_a_replay_reads_the_new_one(frozen_graphs):
    """The graph reads its own copy of the inputs: an alias of the caller's first input would have
    the next call's input copied over it (the caller's tensor overwritten), and a replay must copy
    each new input in, or it computes on the old one."""
    net = frozen_net()
    first, second = torch.zeros(3, 2), torch.arange(6.0).view(3, 2)
    kept = first.clone()
    cache = GraphCache()
    with torch.no_grad():
        cache.run("pass", net, [first], [net], first.device)
        cache.run("pass", net, [first], [net], first.device)  # captured
        cache.run("pass", net, [second], [net], first.device)  # replayed on `second`
    captured = next(iter(cache._passes.values()))
    assert torch.equal(first, kept)
    assert torch.equal(captured.static_inputs[0], second)


def test_gradients_of_a_replay_are_the_callers_own(frozen_graphs):
    """torch.autograd.grad hands the pass's gradients to the caller as they come: without a copy
    they would be the graph's memory, which the caller could edit (and the next replay overwrite)."""
    net = nn.Linear(2, 3)
    x = torch.randn(4, 2)
    params = list(net.parameters())
    want = torch.autograd.grad(net(x).sum(), params)
    cache = GraphCache()
    cache.run("pass", net, [x], [net], x.device)  # plain
    got = torch.autograd.grad(cache.run("pass", net, [x], [net], x.device).sum(), params)  # captured
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
        g.zero_()  # the caller's to edit
    again = torch.autograd.grad(cache.run("pass", net, [x], [net], x.device).sum(), params)  # replayed
    for g, w in zip(again, want):
        torch.testing.assert_close(g, w)


def test_the_backward_is_warmed_up_outside_the_capture_as_the_forward_is(frozen_graphs, monkeypatch):
    """What a backward sets up lazily (compiling, cuBLAS workspaces) must exist before its capture:
    the warm-up runs the backward too, outside the capture, before the captured one."""
    capturing, log = [False], []

    @contextlib.contextmanager
    def graph(*args, **kwargs):
        capturing[0] = True
        try:
            yield
        finally:
            capturing[0] = False

    monkeypatch.setattr(torch.cuda, "graph", graph)
    net = nn.Linear(2, 2)

    def fn(x):
        log.append(("forward", capturing[0]))
        out = net(x)
        out.register_hook(lambda grad: log.append(("backward", capturing[0])))
        return out

    CapturedPass(fn, [torch.randn(3, 2)], list(net.parameters()), [net])
    assert log[-2:] == [("forward", True), ("backward", True)]  # the captured pair
    assert ("forward", False) in log and ("backward", False) in log


# ------------------------------------------------------------------------------ what rules a capture out


@pytest.mark.parametrize("add_hook", [
    lambda net: net[0].register_forward_pre_hook(lambda *args: None),
    lambda net: net[0].register_full_backward_hook(lambda *args: None),
    lambda net: net[0].register_full_backward_pre_hook(lambda *args: None),
    lambda net: nn.modules.module.register_module_forward_pre_hook(lambda *args: None),
    lambda net: nn.modules.module.register_module_full_backward_hook(lambda *args: None),
    lambda net: nn.modules.module.register_module_full_backward_pre_hook(lambda *args: None),
], ids=["forward pre", "backward", "backward pre", "global forward pre", "global backward", "global backward pre"])
def test_every_kind_of_module_hook_rules_a_capture_out(fake_capture, add_hook):
    """A module hook would run only while capturing (test_graphs covers forward hooks and gradient
    hooks): pre-hooks and backward hooks, a module's or global, rule a capture out as well."""
    net, x, cache = frozen_net(), torch.zeros(2), GraphCache()
    handle = add_hook(net)
    try:
        with torch.no_grad():
            for _ in range(3):
                run(cache, net, x)
    finally:
        handle.remove()
    assert len(cache) == 0 and FakeCapture.made == 0


def test_a_module_with_an_empty_child_slot_is_captured(fake_capture):
    """nn.Module allows a submodule slot set to None (an optional downsample, say): the walk of the
    modules' trees steps over it."""
    net, x, cache = frozen_net(), torch.zeros(2), GraphCache()
    net.register_module("optional", None)
    with torch.no_grad():
        assert captured_on_second_call(cache, net, x)


def test_inputs_of_which_one_needs_gradients_are_never_captured(fake_capture):
    """Graphs cannot serve a pass whose inputs need gradients: one such input among others is enough."""
    net, cache = frozen_net(), GraphCache()
    inputs = [torch.zeros(2), torch.zeros(2, requires_grad=True)]
    for _ in range(3):
        out = cache.run("pass", lambda a, b: a + b, inputs, [net], inputs[0].device)
    assert not replayed(out) and out.requires_grad and len(cache) == 0


# ------------------------------------------------------------------------------ the key


def test_a_submodule_replaced_by_another_type_at_the_same_address_is_another_key():
    """Modules are keyed by id, which Python gives again to a new object once the old one is freed: a
    parameterless submodule (an activation) replaced by one of another type at the freed address must
    still change the key. The module's class changed in place stands in for that (same id, new type)."""
    net = frozen_net()
    key = key_of(net)
    net[1].__class__ = nn.ReLU
    assert key_of(net) != key


def test_a_frozen_weight_or_buffer_reshaped_at_the_same_address_is_another_key():
    """A graph bakes in its tensors' shapes (test_graphs covers a trained parameter): a frozen
    weight's and a buffer's shape count too, at the same memory and version."""
    net = frozen_net()
    net[0].register_buffer("scale", torch.ones(2, 2))
    for tensor in (net[0].weight, net[0].scale):
        key, ptr = key_of(net), tensor.data_ptr()
        tensor.data = tensor.data.flatten()
        assert tensor.data_ptr() == ptr and key_of(net) != key


def test_a_buffer_edited_in_place_is_captured_again(fake_capture):
    """What a pass derives from a buffer (running statistics, a mask) is baked into its capture:
    an in-place edit of the buffer makes the pass run afresh, not replay the old capture."""
    net, x, cache = frozen_net(), torch.zeros(2), GraphCache()
    net[0].register_buffer("scale", torch.ones(2))
    with torch.no_grad():
        assert captured_on_second_call(cache, net, x)
        net[0].scale.mul_(2)
        assert captured_on_second_call(cache, net, x)
    assert FakeCapture.made == 2


def test_a_view_of_another_dtype_has_another_tensor_state():
    """A view shares its base's memory and version counter: the dtype alone tells what is derived
    from a reinterpretation apart from what is derived from the tensor itself."""
    t = torch.ones(4)
    view = t.view(torch.int32)
    assert view.data_ptr() == t.data_ptr() and view._version == t._version
    assert tensor_states([view]) != tensor_states([t])


@pytest.mark.parametrize("change", ["dtype", "grad", "inference", "device", "autocast"])
def test_each_part_of_a_call_is_in_its_key(fake_capture, change):
    """A capture serves one call: the inputs' dtypes, grad and inference mode, the device and the
    CUDA autocast state each make another key, which runs plain on its first call."""
    net, cache = frozen_net(), GraphCache()
    x, device, mode = torch.zeros(2), torch.device("cpu"), torch.no_grad
    with torch.no_grad():
        assert captured_on_second_call(cache, net, x, device=device)
    if change == "dtype":
        x = x.double()
    elif change == "device":
        device = torch.device("cuda", 1)
    elif change == "grad":
        mode = torch.enable_grad  # the net is frozen: nothing to differentiate into
    elif change == "inference":
        mode = torch.inference_mode
    before = torch.is_autocast_enabled("cuda")
    if change == "autocast":
        torch.set_autocast_enabled("cuda", True)  # (torch.autocast("cuda") turns itself off without CUDA)
    try:
        with mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's: "CUDA is not available ... Disabling autocast"
            assert captured_on_second_call(cache, net, x, device=device)
    finally:
        torch.set_autocast_enabled("cuda", before)
    assert FakeCapture.made == 2


def test_a_weight_that_trained_unseen_and_froze_again_is_not_replayed(fake_capture):
    """A write that leaves the version as it was (a fused optimizer's, one through `.data`) while the
    weight trained: once frozen again its key is the one of the capture made before, whose derived
    tensors hold the old values. A change of the trainable set drops the passes that had it frozen."""
    net, x, cache = frozen_net(), torch.zeros(2), GraphCache()
    weight = net[0].weight
    with torch.no_grad():
        assert captured_on_second_call(cache, net, x)
        weight.requires_grad_(True)
        run(cache, net, x)
        weight.data.add_(1)  # no version bump
        weight.requires_grad_(False)
        assert not replayed(run(cache, net, x))


def test_a_modules_derived_tensors_in_lists_are_kept_alive_by_its_pass(fake_capture):
    """A graph reads the tensors its modules derived by address, wherever in `derived` they sit:
    in a list as well as in a tuple or a dict (test_fast_review covers those)."""
    net, x, cache = frozen_net(), torch.zeros(2), GraphCache()
    cast = torch.ones(3)
    net[0].derived = {"cast weights": [cast]}
    kept = weakref.ref(cast)
    with torch.no_grad():
        assert captured_on_second_call(cache, net, x)
    del cast
    net[0].derived.clear()
    gc.collect()
    assert kept() is not None
    cache.clear()
    gc.collect()
    assert kept() is None


# ------------------------------------------------------------------------------ the cache's bookkeeping


def test_clear_starts_the_kind_afresh(fake_capture):
    """After clear() (the remedy for a changed process-wide switch) a key runs plain once more
    before it is captured, as in a new cache: its first call under the new switches compiles
    outside a capture."""
    net, x, cache = frozen_net(), torch.zeros(2), GraphCache()
    with torch.no_grad():
        run(cache, net, x, name="text")  # seen once
        cache.clear("text")
        assert captured_on_second_call(cache, net, x, name="text")


def test_keys_seen_once_are_remembered_beyond_the_capacity(fake_capture):
    """A key is captured on its second call even when more keys than `capacity` came in between
    (passes alternating beyond it: a training and an evaluation pass with capacity 1), and the most
    recent key is the last forgotten."""
    net, cache = frozen_net(), GraphCache(capacity=1)
    a, b = torch.zeros(2), torch.zeros(3)
    with torch.no_grad():
        run(cache, net, a)
        run(cache, net, b)
        assert replayed(run(cache, net, a)) and replayed(run(cache, net, b))
        cache = GraphCache(capacity=1)
        for n in range(1, 4 * cache.capacity + 3):  # more keys than it remembers
            x = torch.zeros(n)
            run(cache, net, x)
        assert replayed(run(cache, net, x))


def test_the_least_recently_used_pass_is_dropped(fake_capture):
    """Beyond `capacity` the pass dropped is the least recently used, not the first captured."""
    net, cache = frozen_net(), GraphCache(capacity=2)
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    with torch.no_grad():
        for x in (a, b):
            assert captured_on_second_call(cache, net, x)
        assert replayed(run(cache, net, a))  # a is now the most recently used
        assert captured_on_second_call(cache, net, c)  # b goes
        assert replayed(run(cache, net, a))
        assert FakeCapture.made == 3
        assert not replayed(run(cache, net, b))


# ------------------------------------------------------------------------------ vitaclip bench


def test_a_timing_is_the_mean_of_the_timed_calls_after_the_warmup(monkeypatch):
    """Each call takes one tick of a fake clock: `warmup` calls untimed, then `iters` timed ones."""
    calls = []
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: float(len(calls))))
    seconds = bench._timed(lambda: calls.append(1), iters=4, warmup=2, device=torch.device("cpu"))
    assert len(calls) == 2 + 4 and seconds == 1.0


def test_the_model_benchmark_times_inference_in_eval_mode_without_grad_and_training_in_train_mode(monkeypatch):
    """Clips per second are batch_size / seconds per call; inference runs as evaluation does (eval
    mode, no autograd), training steps in train mode, each timed with the iterations and warm-up
    asked for."""
    from vitaclip.model import VitaCLIP

    seen, timed = [], []

    class Watched(VitaCLIP):
        def forward(self, *args, **kwargs):
            seen.append((self.training, torch.is_grad_enabled()))
            return super().forward(*args, **kwargs)

    def fake_timed(fn, iters, warmup, device):
        timed.append((iters, warmup))
        fn()
        return 0.25

    monkeypatch.setattr(bench, "VitaCLIP", Watched)
    monkeypatch.setattr(bench, "_timed", fake_timed)
    report = bench.bench_model(iters=5, warmup=2, tiny=True, device="cpu", batch_size=3, frames=2, num_classes=2,
                               precision="fp32", train=True)
    assert seen == [(False, False), (True, True)]
    assert timed == [(5, 2), (5, 2)]
    assert report["inference_clips_per_s"] == report["train_clips_per_s"] == 3 / 0.25


class _Batch:
    def __init__(self, n):
        self.video = torch.zeros(n, 3, 2, 4, 4)


def fake_loader(monkeypatch, sizes, clock):
    """Puts in place of VideoLoader one whose epochs give batches of `sizes`, each a tick of `clock`;
    returns the list of (its keyword arguments, the epochs it was set to)."""
    import vitaclip.data

    made = []

    class Loader:
        backend, dali_decoder = "pyav", None

        def __init__(self, *args, **kwargs):
            self.epochs = []
            made.append((kwargs, self.epochs))

        def set_epoch(self, epoch):
            if epoch > 3:
                raise RuntimeError("still reading at epoch 4")
            self.epochs.append(epoch)

        def __iter__(self):
            for n in sizes:
                clock[0] += 1
                yield _Batch(n)

    monkeypatch.setattr(vitaclip.data, "VideoLoader", Loader)
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: float(clock[0])))
    return made


def test_the_loader_benchmark_counts_the_clips_after_the_first_batch_across_epochs(monkeypatch):
    """The first batch pays for start-up and is not counted; the clips are those the batches hold
    (an evaluation's last batch is partial); further epochs are set to their own numbers; the
    pipeline asked for is the one timed, on the whole list."""
    clock = [0]
    made = fake_loader(monkeypatch, [2, 2, 1], clock)
    report = bench.bench_loader("list.csv", batch_size=2, iters=4, device="cpu", train=False)
    # epoch 0: start-up batch, then 2 + 1; epoch 1: 2 + 2; one tick per batch after the first
    assert report["loader_clips_per_s"] == round((2 + 1 + 2 + 2) / 4, 2) and report["loader_pipeline"] == "eval"
    (kwargs, epochs), = made
    assert epochs == [0, 1]
    assert kwargs["train"] is False and (kwargs["shard_id"], kwargs["num_shards"]) == (0, 1)


def test_the_loader_benchmark_says_when_the_list_gives_no_batch(monkeypatch):
    """A list none of whose videos decode gives empty epochs: named, not read again for ever."""
    fake_loader(monkeypatch, [], [0])
    with pytest.raises(ValueError, match="list.csv gives no batch of 2 videos that decode"):
        bench.bench_loader("list.csv", batch_size=2, iters=1, device="cpu")
