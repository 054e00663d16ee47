"""Whole passes of the model (the vision tower, the learned text side) as CUDA graphs.

A Vita-CLIP step launches thousands of small kernels and custom ops; on an H100 a training
step of the compiled fast path kept the GPU busy 55% of the time and the text side 47%
(benchmarks/RESULTS.md): the host, not the GPU, set the pace. A pass captured once as a
CUDA graph and replayed costs the host one launch.

`GraphCache.run(name, fn, inputs, modules, device)` returns fn(*inputs), from a graph captured
for this call's key on the key's second call (a shape used once, such as an evaluation's last
partial batch, is not worth a capture). The key: the inputs' shapes and dtypes, grad and
inference mode, the autocast state, and the modules' parameters and buffers (identity,
requires_grad, and the versions of the frozen ones, so a reload or in-place edit of frozen
weights captures again; the trainable ones are read at replay as they are; the submodules'
train/eval state). With grad enabled the backward is captured too, into the modules'
trainable parameters, and tied in by an autograd.Function. Outputs and
gradients are copied out of the graph's memory, so results stay valid across calls and
gradient accumulation adds up (a gradient aliasing graph memory would be overwritten by the
next replay). A graph holds the activations of one call: a second forward before the first
one's backward raises instead of silently differentiating the wrong activations.
If capture fails, the pass runs uncaptured from then on, with a warning.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

WARMUP_CALLS = 2  # compiles and autotunes outside the capture (make_graphed_callables uses 3)
# Only this thread's calls are checked while capturing: the loader's threads (DataLoader's
# pinning thread, DALI's) keep using CUDA meanwhile, which "global" mode would make fail.
CAPTURE_MODE = "thread_local"


def _autocast_state(device_type: str):
    return (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))


class CapturedPass:
    """One pass captured for one key: a forward graph, and a backward graph when `params`."""

    def __init__(self, fn: Callable[..., Tensor], inputs: Sequence[Tensor], params: List[nn.Parameter]):
        self.generation = 0
        device_type = "cuda"
        autocast_on, autocast_dtype = _autocast_state(device_type)
        # autocast's weight-cast cache must stay off while capturing: cached casts would be
        # made once, inside one capture, and freed when the caller's autocast region ends
        autocast = torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_on, cache_enabled=False)
        self.static_inputs = [x.detach().clone() for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), autocast:
            for _ in range(WARMUP_CALLS):
                out = fn(*self.static_inputs)
                if params:
                    torch.autograd.grad(out, params, torch.zeros_like(out), allow_unused=True)
        torch.cuda.current_stream().wait_stream(side)
        del out
        self.forward_graph = torch.cuda.CUDAGraph()
        with autocast, torch.cuda.graph(self.forward_graph, capture_error_mode=CAPTURE_MODE):
            self.static_out = fn(*self.static_inputs)
        self.backward_graph: Optional[torch.cuda.CUDAGraph] = None
        if params:
            self.static_grad_out = torch.empty_like(self.static_out)
            self.backward_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.backward_graph, pool=self.forward_graph.pool(),
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
                "vitaclip: a CUDA-graphed pass ran forward again before the backward of an earlier call, "
                "whose activations it overwrote; call backward after each forward, or use "
                "backend='fast-compiled' (no CUDA graphs)")
        self.static_grad_out.copy_(grad_out)
        self.backward_graph.replay()
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


def _module_state(modules: Sequence[nn.Module]) -> Tuple[tuple, List[nn.Parameter]]:
    """(key part, trainable parameters) of the modules' trees, walked afresh on every call (so a
    replaced parameter, buffer or submodule is seen) by hand: 2.4x faster than `parameters()` and
    `buffers()` for ViT-B/16, and this runs before every replay while the GPU may be waiting."""
    key, trainable, seen = [], [], set()
    stack = list(modules)
    while stack:
        module = stack.pop()
        stack.extend(child for child in module._modules.values() if child is not None)
        key.append(module.training)
        for p in module._parameters.values():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad:
                key.append((p.data_ptr(), True))
                trainable.append(p)
            else:
                key.append((p.data_ptr(), False, p._version))
        for b in module._buffers.values():
            if b is not None:
                key.append((b.data_ptr(), b._version))
    return tuple(key), trainable


class GraphCache:
    """The captured passes of one model, least recently used dropped beyond `capacity`."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._passes: "OrderedDict[tuple, CapturedPass]" = OrderedDict()
        self._seen: "OrderedDict[tuple, None]" = OrderedDict()  # keys run once, uncaptured
        self._failed: set = set()

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

    def run(self, name: str, fn: Callable[..., Tensor], inputs: Sequence[Tensor],
            modules: Sequence[nn.Module], device: torch.device) -> Tensor:
        """fn(*inputs) through a CUDA graph on `device`; plain fn(*inputs) the first time a key
        is seen and where graphs cannot serve (inputs that need gradients, a failed capture)."""
        if any(x.requires_grad for x in inputs):
            return fn(*inputs)
        grad = torch.is_grad_enabled()
        module_key, trainable = _module_state(modules)
        params = trainable if grad else []
        key = (name, tuple((x.shape, x.dtype, x.device) for x in inputs), grad, torch.is_inference_mode_enabled(),
               _autocast_state("cuda"), device, module_key)
        if key in self._failed:
            return fn(*inputs)
        captured = self._passes.get(key)
        if captured is None:
            if key not in self._seen:
                self._seen[key] = None
                while len(self._seen) > 4 * self.capacity:
                    self._seen.popitem(last=False)
                return fn(*inputs)
            del self._seen[key]
            try:
                with torch.cuda.device(device):
                    captured = CapturedPass(fn, inputs, params)
            except Exception as error:  # noqa: BLE001 - any capture failure: run uncaptured, say why
                warnings.warn(f"vitaclip: CUDA graph capture of the {name} pass failed ({error!r}); "
                              f"running it without CUDA graphs", RuntimeWarning, stacklevel=3)
                self._failed.add(key)
                return fn(*inputs)
            self._passes[key] = captured
            while len(self._passes) > self.capacity:
                self._passes.popitem(last=False)
        self._passes.move_to_end(key)
        with torch.cuda.device(device):
            if not params:
                with torch.no_grad():
                    return captured.forward(inputs)
            return _Replay.apply(captured, len(inputs), *inputs, *params)
