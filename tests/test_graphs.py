"""CUDA-graphed passes (backend "fast-graphed", vitaclip.graphs): the same logits and gradients as
the uncaptured fast path, outputs and gradients that survive later calls, recapture when frozen
weights change, and a clear error where a replay would differentiate overwritten activations."""
import contextlib
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, randomize_, run_in_own_process, tiny_config
from vitaclip import VitaCLIP, backends
from vitaclip.graphs import CapturedPass, GraphCache, _fresh_leaves, _module_state

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def key_of(*modules):
    modes, weights, _, _ = _module_state(modules)
    return modes, weights


def test_key_follows_frozen_weights_and_ignores_trained_ones():
    model = VitaCLIP(tiny_config(), CLASSES)
    key = key_of(model.visual)
    with torch.no_grad():
        model.visual.global_prompts.add_(1)  # trained: read by the graph at replay
    assert key_of(model.visual) == key
    with torch.no_grad():
        model.visual.blocks[0].attn.q_proj.weight.add_(1)  # frozen: may be folded into cached tensors
    assert key_of(model.visual) != key
    key = key_of(model.visual)
    model.visual.blocks[0].attn.q_proj.weight.requires_grad_(True)
    assert key_of(model.visual) != key
    key = key_of(model.visual)
    model.visual.blocks[1].mlp.fc2 = torch.nn.Linear(model.config.width, model.config.width)  # replaced
    assert key_of(model.visual) != key
    key = key_of(model.visual)
    model.visual.blocks[1].eval()
    assert key_of(model.visual) != key
    key = key_of(model.visual)
    model.visual.blocks[1].mlp.act = torch.nn.GELU()  # a submodule without parameters, replaced
    assert key_of(model.visual) != key


def test_a_reshaped_tensor_at_the_same_address_is_another_key():
    """A graph bakes in its tensors' shapes (the class prompts' length, the prompt counts)."""
    model = VitaCLIP(tiny_config(), CLASSES)
    key = key_of(model.visual)
    prompts = model.visual.blocks[0].local_prompts
    prompts.data = prompts.data.flatten(0, 1)  # same memory, same version counter
    assert key_of(model.visual) != key


def test_a_keys_first_call_runs_without_autocasts_weight_cache_as_its_capture_does(monkeypatch):
    """torch.compile guards on the cache flag: a first call with the cache on would compile each
    graph once more for the capture, using up the recompile limit twice as fast."""
    monkeypatch.setattr("vitaclip.graphs.CapturedPass", FakeCapture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)
    model = VitaCLIP(tiny_config(), CLASSES)
    flags = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_cache_enabled()
        GraphCache().run("pass", lambda x: flags.append(torch.is_autocast_cache_enabled()) or x,
                         [torch.zeros(2)], [model.visual], torch.device("cpu"))
    assert flags == [False]


def test_a_failed_capture_gives_the_callers_stream_back(monkeypatch):
    """A capture that fails as it ends leaves its side stream current."""
    class FailingCapture:
        def __init__(self, fn, inputs, params, modules):
            current["stream"] = "capture stream"
            raise RuntimeError("capture invalidated")

    current = {"stream": "caller's stream"}
    monkeypatch.setattr("vitaclip.graphs.CapturedPass", FailingCapture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: current["stream"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda stream: current.update(stream=stream))
    generator_capture_ended = []
    monkeypatch.setattr("vitaclip.graphs._end_random_generator_capture", generator_capture_ended.append)
    model = VitaCLIP(tiny_config(), CLASSES)
    cache = GraphCache()
    with torch.no_grad():
        cache.run("pass", lambda x: x + 1, [torch.zeros(2)], [model.visual], torch.device("cpu"))
        with pytest.warns(RuntimeWarning, match="capture invalidated"):
            out = cache.run("pass", lambda x: x + 1, [torch.zeros(2)], [model.visual], torch.device("cpu"))
    assert torch.equal(out, torch.ones(2)) and current["stream"] == "caller's stream"
    assert generator_capture_ended == [torch.device("cpu")] and cache.failed_passes == ["pass"]

    def failing_reset(device):
        raise RuntimeError("sticky error")

    monkeypatch.setattr("vitaclip.graphs._end_random_generator_capture", failing_reset)
    cache = GraphCache()
    with torch.no_grad():
        cache.run("pass", lambda x: x + 1, [torch.zeros(2)], [model.visual], torch.device("cpu"))
        with pytest.warns(RuntimeWarning, match="capture invalidated.*capture state failed too.*sticky error"):
            out = cache.run("pass", lambda x: x + 1, [torch.zeros(2)], [model.visual], torch.device("cpu"))
        assert torch.equal(out, torch.ones(2)) and cache.failed_passes == ["pass"]
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a second try would fail and warn again
            cache.run("pass", lambda x: x + 1, [torch.zeros(2)], [model.visual], torch.device("cpu"))


def test_a_capture_runs_with_fresh_leaves_in_the_modules_and_differentiates_into_them(monkeypatch):
    """The warm-up and the capture see new leaves in the modules, and the captured backward is taken
    with respect to those leaves; the parameters are back afterwards."""
    seen = {}

    def capture(self, fn, inputs, params):
        seen["in modules"] = [id(p) for p in _module_state(modules)[2]]
        seen["differentiated"] = [id(p) for p in params]
        seen["same memory"] = [p.data_ptr() for p in params]

    monkeypatch.setattr("vitaclip.graphs.CapturedPass._capture", capture)
    model = VitaCLIP(tiny_config(), CLASSES)
    modules = [model.visual]
    originals = _module_state(modules)[2]
    CapturedPass(lambda: None, [], originals, modules)
    assert seen["in modules"] == seen["differentiated"]
    assert not set(seen["differentiated"]) & {id(p) for p in originals}
    assert seen["same memory"] == [p.data_ptr() for p in originals]
    assert [id(p) for p in _module_state(modules)[2]] == [id(p) for p in originals]


@gpu
@pytest.mark.gpu
def test_a_failed_capture_leaves_random_draws_possible():
    """A failed capture left the CUDA generator marked as capturing: every later random draw in the
    process (torch.compile's benchmarking of padded matmuls too) raised. In a process of its own:
    what else a failed capture leaves behind is PyTorch's."""
    printed = run_in_own_process("""
        import pytest, torch
        from vitaclip.graphs import GraphCache
        layer = torch.nn.Linear(8, 8).cuda().requires_grad_(False)
        cache = GraphCache()

        def synchronising(x):  # a host read: no capture possible
            return layer(x) * float(x.sum())

        x = torch.randn(4, 8, device="cuda")
        with torch.no_grad():
            cache.run("probe", synchronising, [x], [layer], x.device)
            with pytest.warns(RuntimeWarning, match="capture of the probe pass failed"):
                out = cache.run("probe", synchronising, [x], [layer], x.device)
            torch.testing.assert_close(out, layer(x) * float(x.sum()))
        assert cache.failed_passes == ["probe"]
        torch.randn(16, device="cuda")
        torch.nn.functional.dropout(torch.ones(16, device="cuda"), 0.5)
        print("drawn")
    """)
    assert printed.split() == ["drawn"]


def test_a_capture_puts_fresh_leaves_on_the_parameters_memory_in_the_modules_and_then_puts_them_back():
    """The backward is captured into new leaves: the parameters' own gradient accumulators may be held
    from earlier steps (the last loss, DDP) on a stream that cannot wait on a capture."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend="reference"))
    modules = [model.visual]
    params = _module_state(modules)[2]
    video = torch.randn(2, 3, 3, 56, 56)

    def loss():
        return model.encode_video(video).square().sum()

    want = torch.autograd.grad(loss(), params)
    with pytest.raises(RuntimeError, match="in the middle"), _fresh_leaves(modules, params) as leaves:
        assert [id(p) for p in _module_state(modules)[2]] == [id(leaf) for leaf in leaves]
        assert all(leaf is not p and leaf.data_ptr() == p.data_ptr() for leaf, p in zip(leaves, params))
        got = torch.autograd.grad(loss(), leaves)  # raises if a module still used a parameter itself
        raise RuntimeError("in the middle of a capture")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert [id(p) for p in _module_state(modules)[2]] == [id(p) for p in params]


def test_tensors_made_in_inference_mode_have_a_key():
    model = VitaCLIP(tiny_config(), CLASSES)
    with torch.inference_mode():
        model.set_classes(["run", "walk", "jump", "sit"])  # its token buffers are inference tensors: no version counter
    assert key_of(model.textual, model.prompt_learner)


def test_hooks_rule_capture_out(monkeypatch):
    monkeypatch.setattr("vitaclip.graphs.CapturedPass", FakeCapture)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    model = VitaCLIP(tiny_config(), CLASSES)
    hooks = [lambda: model.visual.blocks[0].mlp.register_forward_hook(lambda *args: None),
             lambda: model.visual.global_prompts.register_hook(lambda grad: grad * 10),
             lambda: torch.nn.modules.module.register_module_forward_hook(lambda *args: None)]
    for add_hook in hooks:
        handle = add_hook()
        assert _module_state([model.visual])[3]
        cache = GraphCache()
        for _ in range(3):
            cache.run("pass", lambda x: x + 1, [torch.zeros(2)], [model.visual], torch.device("cpu"))
        assert len(cache) == 0
        handle.remove()
    assert not _module_state([model.visual])[3]


def test_trainable_parameters_are_listed_once_as_parameters_lists_them():
    model = VitaCLIP(tiny_config(), CLASSES)
    model.visual.blocks[1].local_prompts = model.visual.blocks[0].local_prompts  # shared: one gradient
    trainable = _module_state([model.visual])[2]
    assert {id(p) for p in trainable} == {id(p) for p in model.visual.parameters() if p.requires_grad}
    assert len(trainable) == len({id(p) for p in trainable})


def test_copies_of_a_model_start_without_graphs():
    cache = GraphCache(capacity=3)
    cache._failed.add("a key")
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert isinstance(copied, GraphCache) and copied.capacity == 3 and not copied._failed


def test_new_classes_drop_the_text_passes_only():
    model = VitaCLIP(tiny_config(), CLASSES)
    model._graphs._passes.update({("fast-graphed video",): "video pass", ("fast-graphed text, truncate=True",): "text"})
    model.set_classes(["run", "walk", "jump", "sit"])
    assert list(model._graphs._passes) == [("fast-graphed video",)]


def test_moving_the_model_drops_its_graphs_and_a_no_op_move_keeps_them():
    model = VitaCLIP(tiny_config(), CLASSES)
    model._graphs._passes[("fast-graphed video",)] = "a pass reading the current addresses"
    model.to(torch.float32).eval()  # what evaluate() and predict() do: nothing moves
    assert len(model._graphs) == 1
    model.to(torch.float64)
    assert len(model._graphs) == 0


def test_text_cache_tells_autocast_dtypes_apart():
    model = VitaCLIP(tiny_config(), CLASSES)
    keys = set()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            keys.add(model._text_cache_key())
    assert len(keys) == 2


def test_weights_of_a_trained_attention_are_never_cached():
    from vitaclip import fast
    block = VitaCLIP(tiny_config(), CLASSES).visual.blocks[0]
    block.attn.q_proj.weight.requires_grad_(True)
    with torch.no_grad():  # a graph captured here must read the live weights at every replay
        first = fast.layer_weights(block, torch.float32)
        second = fast.layer_weights(block, torch.float32)
    assert first.qkv_weight is not second.qkv_weight and first.out_weight is block.attn.out_proj.weight
    assert not block.derived


def test_inputs_that_need_gradients_are_never_captured():
    model = VitaCLIP(tiny_config(), CLASSES, backend="reference")
    video = torch.randn(1, 3, 3, 56, 56, requires_grad=True)
    cache = GraphCache()
    for _ in range(3):
        out = cache.run("video", lambda v: v * 2, [video], [model.visual], video.device)
    assert out.requires_grad and len(cache) == 0


class FakeCapture:
    """Stands in for a CUDA graph capture on the CPU: counts captures and replays."""
    made = 0

    def __init__(self, fn, inputs, params, modules):
        FakeCapture.made += 1
        self.fn = fn

    def forward(self, inputs):
        return ("replayed", self.fn(*inputs))


@pytest.fixture
def fake_capture(monkeypatch):
    """GraphCache on the CPU: FakeCapture for the capture, no CUDA device or stream."""
    monkeypatch.setattr("vitaclip.graphs.CapturedPass", FakeCapture)
    monkeypatch.setattr(FakeCapture, "made", 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: None)


def test_a_key_is_captured_on_its_second_call_and_replayed_after(fake_capture):
    model = VitaCLIP(tiny_config(), CLASSES, backend="reference")
    cache, calls = GraphCache(), []

    def fn(x):
        calls.append(x.shape)
        return x + 1

    small, large = torch.zeros(2), torch.zeros(3)
    with torch.no_grad():
        assert torch.equal(cache.run("pass", fn, [small], [model.visual], small.device), small + 1)  # plain
        assert FakeCapture.made == 0 and len(cache) == 0
        cache.run("pass", fn, [large], [model.visual], large.device)  # another shape: seen once
        assert cache.run("pass", fn, [small], [model.visual], small.device)[0] == "replayed"
        assert FakeCapture.made == 1 and len(cache) == 1
        assert cache.run("pass", fn, [small], [model.visual], small.device)[0] == "replayed"
        assert FakeCapture.made == 1
        with torch.no_grad():
            model.visual.blocks[0].mlp.fc1.weight.mul_(2)  # a frozen weight changed: a new key
        assert not isinstance(cache.run("pass", fn, [small], [model.visual], small.device), tuple)
        assert cache.run("pass", fn, [small], [model.visual], small.device)[0] == "replayed"
        assert FakeCapture.made == 2 and len(cache) == 1  # the capture for the old weights is gone


class _FrozenGraph:
    """CPU stand-in for a CUDA graph whose replay changes nothing: the captured values stay."""

    def replay(self):
        pass

    def pool(self):
        return None


@pytest.fixture
def frozen_graphs(monkeypatch):
    """The real CapturedPass and _Replay on the CPU, with CUDA's graph and stream calls made
    no-ops: a replay returns what the capture computed, so tests feed the captured input and
    back-propagate ones (the incoming-gradient buffer is made as ones instead of empty)."""
    class Stream:
        def wait_stream(self, other):
            pass

    null = lambda *args, **kwargs: contextlib.nullcontext()  # noqa: E731
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", null)
    monkeypatch.setattr(torch.cuda, "graph", null)
    monkeypatch.setattr(torch.cuda, "device", null)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FrozenGraph)
    monkeypatch.setattr(torch, "empty_like", torch.ones_like)


def test_replayed_gradients_reach_the_right_parameters_copied_and_accumulating(frozen_graphs):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    net[0].weight.requires_grad_(False)  # frozen: no gradient slot
    x = torch.randn(5, 4)
    want = torch.autograd.grad(net(x).sum(), [net[0].bias, net[2].weight, net[2].bias])
    cache = GraphCache()
    run = lambda: cache.run("pass", net, [x], [net], x.device)  # noqa: E731
    run().sum().backward()  # uncaptured
    net.zero_grad(set_to_none=True)
    out = run()  # captured now
    torch.testing.assert_close(out, net(x))
    out.sum().backward()
    for p, g in zip([net[0].bias, net[2].weight, net[2].bias], want):
        torch.testing.assert_close(p.grad, g)
    captured = next(iter(cache._passes.values()))
    assert all(p.grad.data_ptr() != g.data_ptr() for p, g in zip([net[0].bias, net[2].weight, net[2].bias],
                                                                   captured.static_grads))
    run().sum().backward()  # a replay: its gradients add to the first ones
    torch.testing.assert_close(net[2].weight.grad, 2 * want[1])
    assert net[0].weight.grad is None
    first, second = run(), run()
    assert first.data_ptr() != second.data_ptr() != captured.static_out.data_ptr()
    with pytest.raises(RuntimeError, match="another forward"):
        first.sum().backward()
    second.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        second.sum().backward()


def _model():
    # compile afresh: variants compiled by earlier tests (grad, autocast and its weight cache) reach
    # torch.compile's recompile limit in one test process, past which a function runs uncompiled
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = randomize_(VitaCLIP(tiny_config(width=128, heads=2), CLASSES)).cuda()
    return model


def _step(model, video, labels, autocast):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(model(video), labels)
    loss.backward()
    return loss.detach()


def _train_and_infer(model, backend, videos, labels, autocast):
    """{name: tensor} of 3 training steps' losses and accumulated gradients (uncaptured, captured,
    replayed), and of two inference outputs made before and after another call."""
    model.set_backend(backend)
    model.zero_grad(set_to_none=True)
    results = {"losses": torch.stack([_step(model, v, labels, autocast) for v in videos])}
    results.update({n: p.grad.clone() for n, p in model.named_trainable_parameters() if p.grad is not None})
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        model(videos[2]), model(videos[2])  # uncaptured, captured
        results["first"] = model(videos[0])
        results["second"] = model(videos[1])  # a replay: must leave `first` as it was
    return results


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [False, True])
def test_graphed_training_and_inference_match_the_uncaptured_fast_path(autocast):
    model = _model()
    videos = [torch.randn(2, 3, 3, 56, 56, device="cuda") for _ in range(3)]
    labels = torch.tensor([0, 3], device="cuda")
    want = _train_and_infer(model, "fast-compiled", videos, labels, autocast)
    got = _train_and_infer(model, "fast-graphed", videos, labels, autocast)
    # video with and without grad, text with grad (without grad the model's text cache answered)
    captured = {(key[0], key[2]) for key in model._graphs._passes}
    assert captured == {("fast-graphed video", True), ("fast-graphed video", False),
                        ("fast-graphed text, truncate=True", True)}, captured
    assert got.keys() == want.keys() and "prompt_learner.ctx" in got
    if not autocast:
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
        return
    # bf16: the graphed and the compiled passes are compiled separately and may round differently
    # (a context gradient differed by more than 2e-2 on an H200); each must be about as close to
    # the fp32 result as the other
    exact = _train_and_infer(model, "fast-compiled", videos, labels, autocast=False)
    for name in got:
        errors = [(result[name].float() - exact[name]).abs().max().item() for result in (got, want)]
        assert errors[0] <= 2 * errors[1] + 1e-3 * exact[name].abs().max().item(), (name, errors)


@gpu
@pytest.mark.gpu
def test_frozen_weight_edit_recaptures_and_two_forwards_before_backward_raise():
    model = _model()
    model.set_backend("fast-graphed")
    video = torch.randn(2, 3, 3, 56, 56, device="cuda")

    def replayed(fn):
        return [fn() for _ in range(3)][-1]  # uncaptured, captured, replayed

    with torch.no_grad():
        before = replayed(lambda: model(video))
        model.visual.blocks[1].mlp.fc2.weight.mul_(2)
        after = replayed(lambda: model(video))
        model.set_backend("fast-compiled")
        want = model(video)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-4, atol=1e-5)
    model.set_backend("fast-graphed")
    for _ in range(2):
        model.encode_video(video).sum().backward()
    first = model.encode_video(video).sum()
    model.encode_video(video).sum()
    with pytest.raises(RuntimeError, match="another forward of the pass came in between"):
        first.backward()
    out = model.encode_video(video).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        out.backward()


@gpu
@pytest.mark.gpu
def test_optimizer_steps_between_replays_match_the_uncaptured_fast_path():
    """The trained parameters change in place between replays: the graphs read them live."""
    video = torch.randn(2, 3, 3, 56, 56, device="cuda")
    labels = torch.tensor([1, 2], device="cuda")
    trained = {}
    for backend in ("fast-compiled", "fast-graphed"):
        model = _model()
        model.set_backend(backend)
        optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
        losses = []
        for _ in range(4):  # uncaptured, captured, replayed, replayed
            losses.append(_step(model, video, labels, autocast=False))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        trained[backend] = (torch.stack(losses), {n: p.detach().clone() for n, p in model.named_trainable_parameters()})
    (want_losses, want), (losses, got) = trained.values()
    assert not torch.allclose(want_losses[0], want_losses[-1])  # the steps changed the model
    torch.testing.assert_close(losses, want_losses, rtol=1e-4, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


@gpu
@pytest.mark.gpu
def test_passes_are_captured_while_the_last_steps_graphs_are_alive():
    """A training loop holds the last step's loss (and with it the parameters' gradient accumulators,
    made on the default stream) while the next step captures: the capture failed on them."""
    model = _model()
    model.set_backend("fast-graphed")
    video = torch.randn(2, 3, 3, 56, 56, device="cuda")
    labels = torch.tensor([1, 2], device="cuda")
    losses = []
    for _ in range(3):  # uncaptured, captured, replayed
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(video), labels)
        loss.backward()
        losses.append(loss)  # the graphs stay alive
    assert len(model._graphs) == 2 and not model._graphs.failed_passes
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())


@gpu
@pytest.mark.gpu
def test_ddp_over_graphed_passes_trains_like_the_bare_model(tmp_path):
    """DDP's gradient hooks sit on the parameters' accumulators, outside the graphs: a graphed
    model under DDP (one NCCL rank) takes the same steps as without it."""
    if not torch.distributed.is_nccl_available():
        pytest.skip("NCCL is not available")
    torch.distributed.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        video = torch.randn(2, 3, 3, 56, 56, device="cuda")
        labels = torch.tensor([1, 2], device="cuda")
        runs = []
        for wrap in (False, True):
            model = _model()
            model.set_backend("fast-graphed")
            net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0]) if wrap else model
            optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.5)
            losses = []
            for _ in range(4):
                losses.append(_step(net, video, labels, autocast=True))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            assert len(model._graphs) == 2 and not model._graphs.failed_passes  # video and text, captured
            runs.append((torch.stack(losses), {n: p.detach().clone() for n, p in model.named_trainable_parameters()}))
        (want_losses, want), (losses, got) = runs
        torch.testing.assert_close(losses, want_losses, rtol=1e-3, atol=1e-4)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4, msg=name)
    finally:
        torch.distributed.destroy_process_group()


def test_the_graph_cache_keeps_at_most_its_capacity(fake_capture):
    """Beyond `capacity` captured passes the least recently used goes (their memory with it)."""
    model = VitaCLIP(tiny_config(), CLASSES, backend="reference")
    cache = GraphCache(capacity=2)
    with torch.no_grad():
        for n in (1, 2, 3, 1):
            x = torch.zeros(n)
            for _ in range(2):  # captured on a key's second call
                cache.run("pass", lambda v: v + 1, [x], [model.visual], x.device)
            assert len(cache) <= 2
    assert len(cache) == 2


def test_clear_lets_a_failed_pass_be_captured_again(fake_capture):
    """The module docstring's remedy after changing a process-wide switch is clear(): a pass
    whose capture failed must be tried again after it, not run uncaptured for ever."""
    model = VitaCLIP(tiny_config(), CLASSES, backend="reference")
    cache = GraphCache()
    x = torch.zeros(2)
    with torch.no_grad():
        cache.run("video", lambda v: v + 1, [x], [model.visual], x.device)
        cache.run("text", lambda v: v + 1, [x], [model.visual], x.device)
    key = next(iter(cache._seen))
    cache._failed.update({key, ("text", *key[1:])})
    cache.clear("text")
    assert cache.failed_passes == ["video"]
    cache.clear()
    assert cache.failed_passes == []
    with torch.no_grad():
        cache.run("video", lambda v: v + 1, [x], [model.visual], x.device)
        assert cache.run("video", lambda v: v + 1, [x], [model.visual], x.device)[0] == "replayed"


def test_auto_takes_the_highest_priority_backend_available_on_the_device(monkeypatch):
    """On the CPU only the reference is registered as available, so max/min and the
    availability filter were never told apart there."""
    reference = backends._BACKENDS["reference"]
    backends.available_backends()  # (optional backends imported first: they must not replace these)
    monkeypatch.setitem(backends._BACKENDS, "test-low", backends.Backend(
        "test-low", reference.block_forward, lambda device: True, priority=-5))
    monkeypatch.setitem(backends._BACKENDS, "test-cpu", backends.Backend(
        "test-cpu", reference.block_forward, lambda device: device.type == "cpu", priority=50))
    monkeypatch.setitem(backends._BACKENDS, "test-elsewhere", backends.Backend(
        "test-elsewhere", reference.block_forward, lambda device: device.type == "meta", priority=100))
    assert backends.resolve_backend("auto", torch.device("cpu")).name == "test-cpu"
    assert backends.resolve_backend("auto", torch.device("meta")).name == "test-elsewhere"
