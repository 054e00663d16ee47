"""Whole passes of the model (the vision tower, the learned text side) as CUDA graphs.

A Vita-CLIP step launches thousands of small kernels and custom ops; on an H100 a training
step of the compiled fast path kept the GPU busy 55% of the time and the text side 47%
(benchmarks/RESULTS.md): the host, not the GPU, set the pace. A pass captured once as a
CUDA graph and replayed costs the host one launch.

`GraphCache.run(name, fn, inputs, modules, device)` returns fn(*inputs), from a graph captured
for this call's key on the key's second call (a shape used once, such as an evaluation's last
partial batch, is not worth a capture). The key: the inputs' shapes and dtypes, grad and
inference mode, the autocast state, the modules' submodules and their train/eval modes, and
their parameters and buffers (addresses, requires_grad, and the versions of the frozen ones,
so a reload or in-place edit of frozen weights captures again, dropping the stale capture;
the trainable ones are read at replay as they are). With grad enabled the backward is
captured too (outside autocast, as a training step runs it), into the modules' trainable
parameters (through new leaves on their memory, `_fresh_leaves`), and tied in by an
autograd.Function. Outputs and gradients are copied out of the
graph's memory, so results stay valid across calls and gradient accumulation adds up (a
gradient aliasing graph memory would be overwritten by the next replay). A graph holds the
activations of one call: one backward per forward, before the next forward; anything else
raises instead of silently differentiating overwritten activations. A captured pass keeps the
tensors its modules derived from their weights (their `derived`: the fast layers' cast weights)
alive while it lives: it reads them by address. Modules or trainable
parameters with hooks run uncaptured (a hook would run only while capturing, or twice). If
capture fails, the pass runs uncaptured from then on, with a warning. Process-wide switches
(VITACLIP_DISABLE_EXT, VITACLIP_ATTENTION_BACKWARD, `use_tiles`, SDPA kernel choices, TF32) are
not in the key: a captured pass keeps the kernels it was captured with; set them before the
first call, or `clear()`.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

WARMUP_CALLS = 2  # compiles and autotunes outside the capture (make_graphed_callables uses 3)
# Only this thread's calls are checked while capturing: the loader's threads (DataLoader's
# pinning thread, DALI's) keep using CUDA meanwhile, which "global" mode would make fail.
CAPTURE_MODE = "thread_local"


def _autocast_state(device_type: str):
    enabled = torch.is_autocast_enabled(device_type)
    return enabled, torch.get_autocast_dtype(device_type) if enabled else None


def _uncached_autocast(device_type: str = "cuda") -> torch.autocast:
    """The caller's autocast state with autocast's weight-cast cache off, as a capture needs it (cached
    casts would be made once, inside one capture, and freed when the caller's autocast region ends).
    A key's first, uncaptured call runs under it too: torch.compile guards on the cache flag, and would
    otherwise compile every graph once more for the capture."""
    enabled, dtype = _autocast_state(device_type)
    return torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=False)


def _end_random_generator_capture(device: torch.device) -> None:
    """A capture that fails leaves the device's random generator marked as capturing (PyTorch ends
    that state only as a capture succeeds): every later random draw on the device, torch.compile's
    own included, would raise "Offset increment outside graph capture". An empty capture ends it."""
    graph = torch.cuda.CUDAGraph()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "the CUDA graph is empty"
        with torch.cuda.device(device), torch.cuda.graph(graph, capture_error_mode=CAPTURE_MODE):
            pass


@contextlib.contextmanager
def _fresh_leaves(modules: Sequence[nn.Module], params: List[nn.Parameter]) -> Iterator[List[nn.Parameter]]:
    """Puts in the modules, for as long as the context lasts, a new leaf on each trainable parameter's
    storage. A parameter's gradient accumulator lives as long as a graph or a hook holds it (the last
    step's loss, DistributedDataParallel's reducer) and keeps the stream current when it was made: a
    backward captured into it makes that stream wait on the capture stream, which CUDA refuses for the
    legacy default stream. A new leaf's accumulator is made on the capture stream; the graphs read and
    write the same memory as the parameters."""
    index = {id(p): i for i, p in enumerate(params)}
    leaves = [nn.Parameter(p.detach(), requires_grad=True) for p in params]
    owners = {id(m): m for root in modules for m in root.modules()}.values()
    swapped = [(module, name, p) for module in owners for name, p in module._parameters.items()
               if p is not None and id(p) in index]
    for module, name, p in swapped:
        module._parameters[name] = leaves[index[id(p)]]
    try:
        yield leaves
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


class CapturedPass:
    """One pass captured for one key: a forward graph, and a backward graph when `params`."""

    def __init__(self, fn: Callable[..., Tensor], inputs: Sequence[Tensor], params: List[nn.Parameter],
                 modules: Sequence[nn.Module]):
        with _fresh_leaves(modules, params) as leaves:
            self._capture(fn, inputs, leaves)

    def _capture(self, fn: Callable[..., Tensor], inputs: Sequence[Tensor], params: List[nn.Parameter]) -> None:
        self.generation = 0
        autocast = _uncached_autocast()
        # the backward as a training step runs it, after leaving the autocast region
        no_autocast = torch.autocast("cuda", enabled=False)
        self.static_inputs = [x.detach().clone() for x in inputs]
        # warm-up and capture on one stream, so that what a stream sets up lazily (cuBLAS
        # workspaces) exists before the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_CALLS):
                with autocast:
                    out = fn(*self.static_inputs)
                if params:
                    with no_autocast:
                        torch.autograd.grad(out, params, torch.zeros_like(out), allow_unused=True)
        torch.cuda.current_stream().wait_stream(stream)
        del out
        self.forward_graph = torch.cuda.CUDAGraph()
        with autocast, torch.cuda.graph(self.forward_graph, stream=stream, capture_error_mode=CAPTURE_MODE):
            self.static_out = fn(*self.static_inputs)
        self.backward_graph: Optional[torch.cuda.CUDAGraph] = None
        if params:
            self.static_grad_out = torch.empty_like(self.static_out)
            self.backward_graph = torch.cuda.CUDAGraph()
            with no_autocast, torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool(), stream=stream,
                                               capture_error_mode=CAPTURE_MODE):
                self.static_grads = torch.autograd.grad(self.static_out, params, self.static_grad_out,
                                                        allow_unused=True)
            self.static_out = self.static_out.detach()

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        for static, x in zip(self.static_inputs, inputs):
            if static.data_ptr() != x.data_ptr():
                static.copy_(x)
        self.forward_graph.replay()
        self.generation += 1
        return self.static_out.clone()

    def backward(self, grad_out: Tensor, generation: int) -> List[Optional[Tensor]]:
        if generation != self.generation:
            raise RuntimeError(
                "vitaclip: a CUDA-graphed pass allows one backward per forward, before its next forward: "
                "another forward of the pass came in between (it overwrote the activations), or this is a "
                "second backward (retain_graph); use backend='fast-compiled' (no CUDA graphs) for that")
        self.static_grad_out.copy_(grad_out)
        self.backward_graph.replay()  # reuses the activations' memory: no second backward
        self.generation += 1
        return [g.clone() if g is not None else None for g in self.static_grads]


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, captured: CapturedPass, n_inputs: int, *inputs_and_params: Tensor) -> Tensor:
        ctx.captured, ctx.n_inputs, ctx.generation = captured, n_inputs, captured.generation + 1
        return captured.forward(inputs_and_params[:n_inputs])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        grads = ctx.captured.backward(grad_out.contiguous(), ctx.generation)
        return (None, None, *([None] * ctx.n_inputs), *grads)


_GLOBAL_MODULE_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                        "_global_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def _module_state(modules: Sequence[nn.Module]) -> Tuple[tuple, tuple, List[nn.Parameter], bool]:
    """(the submodules and their train/eval modes, the tensors' addresses and the frozen ones'
    versions, the trainable parameters, whether hooks are set) of the modules' trees, walked
    afresh on every call (so a replaced parameter, buffer or submodule is seen) by hand: 2.4x
    faster than `parameters()` and `buffers()` for ViT-B/16, and this runs before every replay
    while the GPU may be waiting. Hooks rule a capture out: a module hook would run only while
    capturing, and a gradient hook of a parameter once in the graph and once more after it."""
    modes, key, trainable, seen = [], [], [], set()
    hooked = any(getattr(torch.nn.modules.module, name) for name in _GLOBAL_MODULE_HOOKS)
    stack = list(modules)
    while stack:
        module = stack.pop()
        stack.extend(child for child in module._modules.values() if child is not None)
        modes.append((id(module), type(module), module.training))
        hooked = hooked or _hooked(module)
        for p in module._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                key.append((p.data_ptr(), p.shape, True))
                trainable.append(p)
                hooked = hooked or bool(p._backward_hooks)
            else:
                key.append((p.data_ptr(), p.shape, False, tensor_version(p)))
        for b in module._buffers.values():
            if b is not None:
                key.append((b.data_ptr(), b.shape, tensor_version(b)))
    return tuple(modes), tuple(key), trainable, hooked


def tensor_version(t: Tensor):
    """t's version counter, for keys of what is derived from t; tensors made under inference mode
    keep none (and cannot change outside it)."""
    return "inference" if torch.is_inference(t) else t._version


def tensor_states(tensors) -> tuple:
    """Each tensor's memory, dtype and version: a key of what is derived from them (an in-place
    update, a reload, a cast or a move changes it; a write through `.data` does not)."""
    return tuple((t.data_ptr(), t.dtype, tensor_version(t)) for t in tensors)


def _derived_tensors(modules: Sequence[nn.Module]) -> List[Tensor]:
    """The tensors the modules' trees keep derived from their weights (a module's `derived`, e.g. the
    fast layers' weights cast to the compute dtype)."""
    found: List[Tensor] = []

    def collect(value) -> None:
        if isinstance(value, Tensor):
            found.append(value)
        elif isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)

    for module in modules:
        for submodule in module.modules():
            collect(submodule.__dict__.get("derived"))
    return found


class GraphCache:
    """The captured passes of one model, least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int = 6):  # a training run's passes, its evaluation's, a partial batch's
        self.capacity = capacity
        self._passes: "OrderedDict[tuple, CapturedPass]" = OrderedDict()
        self._seen: "OrderedDict[tuple, None]" = OrderedDict()  # keys run once, uncaptured
        self._failed: set = set()
        self._trainable: dict = {}  # per pass name, the addresses of its last call's trainable parameters

    # Graphs belong to their model's tensors: a copy or an unpickled model starts with none.
    def __deepcopy__(self, memo) -> "GraphCache":
        return GraphCache(self.capacity)

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])

    def clear(self, kind: str = "") -> None:
        """Drop the passes whose name contains `kind` (all by default), freeing their memory."""
        for key in [k for k in self._passes if kind in k[0]]:
            del self._passes[key]
        for key in [k for k in self._seen if kind in k[0]]:
            del self._seen[key]
        self._failed = {k for k in self._failed if kind not in k[0]}

    def __len__(self) -> int:
        return len(self._passes)

    @property
    def failed_passes(self) -> List[str]:
        """Names of the passes whose capture failed (they run uncaptured, with a warning)."""
        return sorted({key[0] for key in self._failed})

    def _drop_passes_freezing(self, name: str, trainable: List[nn.Parameter]) -> None:
        """Drops the passes captured with one of these parameters frozen: a fused optimizer updates it
        without bumping its version, so such a pass's key would come back, with what it derived from the
        old values, once it is frozen again. Checked when the pass's trainable set changes."""
        addresses = tuple(p.data_ptr() for p in trainable)
        if addresses == self._trainable.get(name):
            return
        self._trainable[name] = addresses
        training = set(addresses)
        # (a frozen parameter's entry in a key is the one of four fields: it holds the version)
        for key in [k for k in self._passes if any(len(w) == 4 and w[0] in training for w in k[-1])]:
            del self._passes[key]

    def run(self, name: str, fn: Callable[..., Tensor], inputs: Sequence[Tensor],
            modules: Sequence[nn.Module], device: torch.device) -> Tensor:
        """fn(*inputs) through a CUDA graph on `device`; plain fn(*inputs) the first time a key
        is seen and where graphs cannot serve (inputs that need gradients, a failed capture)."""
        if any(x.requires_grad for x in inputs):
            return fn(*inputs)
        grad = torch.is_grad_enabled()
        modes, weights, trainable, hooked = _module_state(modules)
        if hooked:
            return fn(*inputs)
        self._drop_passes_freezing(name, trainable)
        params = trainable if grad else []
        call = (name, tuple((x.shape, x.dtype, x.device) for x in inputs), grad, torch.is_inference_mode_enabled(),
                _autocast_state("cuda"), device, modes)
        key = (*call, weights)
        if key in self._failed:
            return fn(*inputs)
        captured = self._passes.get(key)
        if captured is None:
            if key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > 4 * self.capacity:
                    self._seen.popitem(last=False)
                with _uncached_autocast():
                    return fn(*inputs)
            del self._seen[key]
            # the same call with earlier weights (reloaded in place, another checkpoint) cannot come back
            for stale in [k for k in self._passes if k[:-1] == call]:
                del self._passes[stale]
            stream = torch.cuda.current_stream()
            try:
                with torch.cuda.device(device):
                    captured = CapturedPass(fn, inputs, params, modules)
            except Exception as error:  # noqa: BLE001 - any capture failure: run uncaptured, say why
                # a capture that fails as it ends leaves its side stream current: back to the caller's
                torch.cuda.set_stream(stream)
                self._failed.add(key)
                why = repr(error)
                try:
                    _end_random_generator_capture(device)
                except Exception as reset_error:  # noqa: BLE001 - said in the warning
                    why += (f"; ending the CUDA random generator's capture state failed too ({reset_error!r}): "
                            f"random draws on {device} may fail from now on")
                warnings.warn(f"vitaclip: CUDA graph capture of the {name} pass failed ({why}); "
                              f"running it without CUDA graphs", RuntimeWarning, stacklevel=3)
                return fn(*inputs)
            # a graph reads them by address: alive as long as it is, whatever the modules drop or remake
            captured.derived_tensors = _derived_tensors(modules)
            self._passes[key] = captured
            while len(self._passes) > self.capacity:
                self._passes.popitem(last=False)
        self._passes.move_to_end(key)
        with torch.cuda.device(device):
            if not params:
                with torch.no_grad():
                    return captured.forward(inputs)
            return _Replay.apply(captured, len(inputs), *inputs, *params)
