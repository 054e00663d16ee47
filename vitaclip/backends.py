"""Which implementation runs each layer: one name switches the whole vision tower.

A backend is a `block_forward(block, x, pending, global_prompts, class_tokens_only)` (see
`vision.BlockForward`).
"reference" is the plain PyTorch original and the oracle of every other backend; fast
backends register themselves here when their module is imported; "auto" picks the
highest-priority backend available on the input's device.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Union

import torch

from .vision import BlockForward, reference_block_forward


@dataclass(frozen=True)
class Backend:
    name: str
    block_forward: BlockForward
    is_available: Callable[[torch.device], bool]
    priority: int
    compile_modules: bool = False  # also compile the video embedding and the text transformer
    cuda_graphs: bool = False  # capture whole passes as CUDA graphs on CUDA (vitaclip.graphs)
    # the backend that runs instead while a user's torch.compile traces the model: that compile takes
    # the whole pass, and its own compiling and graph capture with it
    traced_as: Optional[str] = None


_BACKENDS: Dict[str, Backend] = {}
OPTIONAL_BACKEND_MODULES = ("vitaclip.fast",)


def register_backend(name: str, block_forward: BlockForward,
                     is_available: Callable[[torch.device], bool] = lambda device: True,
                     priority: int = 0, compile_modules: bool = False, cuda_graphs: bool = False,
                     traced_as: Optional[str] = None) -> None:
    _BACKENDS[name] = Backend(name, block_forward, is_available, priority, compile_modules, cuda_graphs, traced_as)


register_backend("reference", reference_block_forward)


_optional_backends_loaded = False


def _load_optional_backends() -> None:
    """Imports them once: after that, a model's pass under torch.compile resolves its backend
    without a graph break (dynamo does not trace importlib)."""
    global _optional_backends_loaded
    if _optional_backends_loaded:
        return
    for module in OPTIONAL_BACKEND_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as err:  # e.g. no Triton on this machine: the reference still works
            if module.split(".")[-1] not in str(err) and "triton" not in str(err).lower():
                raise
    _optional_backends_loaded = True


def available_backends(device: Optional[Union[str, torch.device]] = None) -> list[str]:
    """The registered backends' names; with `device`, those that run there (the fast ones need CUDA)."""
    _load_optional_backends()
    return sorted(name for name, b in _BACKENDS.items() if device is None or b.is_available(torch.device(device)))


def check_backend_name(name: str) -> None:
    if name not in ["auto", *available_backends()]:
        raise ValueError(f"unknown backend {name!r}; choose from {['auto'] + available_backends()}")


def resolve_backend(name: str, device: torch.device) -> Backend:
    check_backend_name(name)  # also imports the optional backends, which "auto" chooses among
    if name != "auto":
        backend = _BACKENDS[name]
        if not backend.is_available(device):
            raise ValueError(f"backend {name!r} is not available on device {device} (there: "
                             f"{['auto'] + available_backends(device)})")
    else:
        backend = max((b for b in _BACKENDS.values() if b.is_available(device)), key=lambda b: b.priority)
    if backend.traced_as is not None and torch.compiler.is_compiling():
        return _BACKENDS[backend.traced_as]
    return backend
