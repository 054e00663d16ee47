"""Python face of the compiled summary op in vitaclip._C (sources in csrc/).

Loading vitaclip._C registers `torch.ops.vitaclip.summary_attention` (and its backward) with
CPU and CUDA kernels and autograd (in C++, see csrc/summary_attention.cpp for why); this
module adds what torch.compile needs: the fake (meta) shapes of both ops.
If the library is missing, does not load (built for another torch) or has other ops than this
module calls (built from older sources), `LOAD_ERROR` says why and the package uses the plain
PyTorch path.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Dict, Optional

import torch
from torch import Tensor

# The ops as this module calls them and fakes them. A library built from other sources (an editable
# install pulled since its build, the schema changed in between) registers other ones: calling them
# failed in the model's first summary step, and torch.compile traced this module's fakes for them.
SCHEMAS = {
    "summary_attention":
        "vitaclip::summary_attention(Tensor c, Tensor ln_weight, Tensor ln_bias, Tensor q_weight, Tensor q_bias, "
        "Tensor k_weight, Tensor k_bias, Tensor v_weight, Tensor v_bias, Tensor out_weight, Tensor out_bias, "
        "int num_heads, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    "summary_attention_backward":
        "vitaclip::summary_attention_backward(Tensor grad_out, Tensor c, Tensor normed, Tensor qkv, "
        "Tensor heads_out, Tensor mean, Tensor rstd, Tensor ln_weight, Tensor qkv_params, Tensor out_weight, "
        "int num_heads) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
}


def _schema_error() -> Optional[ImportError]:
    """Why the loaded library's ops are not the ones this module calls, or None."""
    for name, expected in SCHEMAS.items():
        try:
            found: Optional[str] = str(getattr(torch.ops.vitaclip, name).default._schema)
        except (AttributeError, RuntimeError):
            found = None
        if found != expected:
            return ImportError(f"vitaclip._C was built from other sources than this package: its {name} is "
                               f"{found or 'missing'}, this package calls {expected}; rebuild it "
                               f"(pip install --no-build-isolation -e .)")
    return None


try:
    importlib.import_module("vitaclip._C")  # loading the library registers the ops
except ImportError as error:  # not built, or built against another torch
    LOAD_ERROR: Optional[ImportError] = error
else:
    LOAD_ERROR = _schema_error()
    if LOAD_ERROR is not None:  # built, so meant to run: say why it does not
        warnings.warn(f"{LOAD_ERROR}. The summary step takes the PyTorch path.")


def is_built() -> bool:
    """Whether vitaclip._C loaded and its ops are registered."""
    return LOAD_ERROR is None


# The device types the build has kernels for (a CPU-only build has none for CUDA), asked of the
# dispatcher once: the question is not traceable by torch.compile.
KERNEL_DEVICES = frozenset(device for device, key in (("cpu", "CPU"), ("cuda", "CUDA"))
                           if is_built() and torch._C._dispatch_has_kernel_for_dispatch_key(
                               "vitaclip::summary_attention", key))


_RUNS_ON_GPU: Dict[int, bool] = {}


@torch.compiler.assume_constant_result  # asked once, when a compiled layer is traced, not in its graph
def cuda_kernels_run_on(index: int) -> bool:
    """Whether the built CUDA kernels run on GPU `index`, as its driver says: a build for compute
    capability 8.0 and 9.0 has none for a V100 or T4, nor, without PTX, for a later GPU."""
    if index not in _RUNS_ON_GPU:
        try:
            _RUNS_ON_GPU[index] = bool(torch.ops.vitaclip.cuda_kernels_run_on(index))
        except (AttributeError, RuntimeError) as err:  # a library built before the question existed, a CUDA error
            rebuild = " (rebuild the package to use them)" if isinstance(err, AttributeError) else ""
            warnings.warn(f"vitaclip._C could not tell whether its CUDA kernels run on GPU {index} ({err}): the "
                          f"summary step takes the PyTorch path{rebuild}")
            _RUNS_ON_GPU[index] = False
    return _RUNS_ON_GPU[index]


def runs_on(device: torch.device) -> bool:
    """Whether the built op has kernels for tensors on `device` (on CUDA: for its GPU; a GPU the
    build has no code for takes the PyTorch path)."""
    if device.type == "cuda" and "cuda" in KERNEL_DEVICES:
        return cuda_kernels_run_on(device.index if device.index is not None else torch.cuda.current_device())
    return device.type in KERNEL_DEVICES


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _summary_attention_fake(c, ln_weight, ln_bias, q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight,
                            out_bias, num_heads, eps):
    groups, frames, width = c.shape
    rows = groups * frames
    stats = c.new_empty(rows, dtype=_stat_dtype(c.dtype))
    return (c.new_empty(groups, frames, width), c.new_empty(rows, width), c.new_empty(rows, 3 * width),
            c.new_empty(rows, width), stats, torch.empty_like(stats), c.new_empty(3 * width * width + 3 * width))


def _summary_attention_backward_fake(grad_out, c, normed, qkv, heads_out, mean, rstd, ln_weight, qkv_params,
                                     out_weight, num_heads):
    width = c.shape[-1]
    return (c.new_empty(c.shape), c.new_empty(width), c.new_empty(width), c.new_empty(3 * width, width),
            c.new_empty(3 * width), c.new_empty(width, width), c.new_empty(width))


if is_built():
    torch.library.register_fake("vitaclip::summary_attention")(_summary_attention_fake)
    torch.library.register_fake("vitaclip::summary_attention_backward")(_summary_attention_backward_fake)


def _member(module, table: str, name: str):
    """module.<name> from its `_parameters` or `_modules` table: nn.Module's __getattr__ costs about
    a microsecond per lookup, and the twelve lookups of a summary step took 40% of its host time on
    the CPU (more than the op's own dispatch). Anything else (a parametrization's property, a plain
    attribute) is read the usual way."""
    found = getattr(module, table).get(name)
    return found if found is not None else getattr(module, name, None)


def _parameters(norm, attn) -> list:
    """ln_weight, ln_bias, then weight and bias of q, k, v and out, as the modules hold them."""
    params = [_member(norm, "_parameters", "weight"), _member(norm, "_parameters", "bias")]
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
        proj = _member(attn, "_modules", name)
        params += (None, None) if proj is None else (_member(proj, "_parameters", "weight"),
                                                     _member(proj, "_parameters", "bias"))
    return params


def takes(norm, attn) -> bool:
    """Whether the op can take the modules: their parameters all tensors (not so a LayerNorm without
    affine parameters, a projection without bias, or a quantized Linear, whose weight is a method)."""
    return all(isinstance(p, Tensor) for p in _parameters(norm, attn))


def op_arguments(norm, attn) -> list:
    """The op's parameter arguments from the modules (see `_parameters`)."""
    params = _parameters(norm, attn)
    if not all(isinstance(p, Tensor) for p in params):
        raise ValueError("summary_tokens: the compiled op needs a LayerNorm with affine parameters and "
                         "q/k/v/out projections with biases, as tensors (not quantized ones)")
    return params


def summary_tokens(c: Tensor, norm, attn, num_heads: int) -> Tensor:
    """s = c + MHSA(LN(c)) through the compiled op; same contract as `naive.summary_tokens`
    (under autocast too: the op's autocast kernel casts as the projections would)."""
    return torch.ops.vitaclip.summary_attention.default(c, *op_arguments(norm, attn), num_heads, norm.eps)[0]


def shared_memory_fits(c: Tensor, num_heads: int) -> bool:
    """Whether the CUDA kernels' per-block shared memory (csrc/cuda: q, k, v, dO rows of head
    dim + 1 and two T x T matrices in the backward, in float, or double for float64) fits the
    device; other shapes (e.g. one wide head, many frames) take the PyTorch path."""
    if c.device.type != "cuda":
        return True
    frames, head_dim = c.shape[1], c.shape[2] // num_heads
    acc_bytes = 8 if c.dtype == torch.float64 else 4
    needed = (4 * frames * (head_dim + 1) + 2 * frames * frames) * acc_bytes
    return needed <= shared_memory_per_block(c.device.index)


_SHARED_MEMORY: Dict[int, int] = {}


@torch.compiler.assume_constant_result
def shared_memory_per_block(index: int) -> int:
    """The shared memory a block may opt in to on GPU `index`, asked once (asking costs microseconds
    of host time on every summary step)."""
    if index not in _SHARED_MEMORY:
        _SHARED_MEMORY[index] = torch.cuda.get_device_properties(index).shared_memory_per_block_optin
    return _SHARED_MEMORY[index]
