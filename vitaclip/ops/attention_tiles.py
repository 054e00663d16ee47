"""Tile configurations of the fused prompt-attention kernels (forward, backward dQ, backward dK/dV,
and the fused backward that VITACLIP_ATTENTION_BACKWARD=fused runs instead of the last two).

Each kernel has its own tiles; results do not depend on them beyond float rounding (LSE and
delta are stored per query row, whatever the tiling). The GPU default per head dim is
`GPU_TILES`: to change it, edit that one line. `CANDIDATES` are the configurations that
benchmarks/test_attention_configs_bench.py compares on the GPU and that
tests/test_kernels_compile.py compiles for Hopper.

The prompt tile (the P + G + 1 prompt keys of a frame) is sized by the launcher to the next
power of two >= 16 of the prompt count (32 for ViT-B/16's 17), independently of these tiles.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class KernelTiles:
    """One kernel's launch: block_m queries x block_n keys per tile (in _bwd_dkdv, block_n is
    the program's key tile and block_m the step of its loop over queries)."""
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        # tl.arange needs powers of two, tl.dot operands at least 16 along every side
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not (_is_power_of_two(value) and value >= 16):
                raise ValueError(f"KernelTiles.{name} must be a power of two >= 16, got {value!r}")
        if not (_is_power_of_two(self.num_warps) and self.num_warps <= 32):
            raise ValueError(f"KernelTiles.num_warps must be a power of two <= 32, got {self.num_warps!r}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"KernelTiles.num_stages must be a positive int, got {self.num_stages!r}")

    def __str__(self) -> str:
        return f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}"

    def launch_args(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, num_warps=self.num_warps,
                    num_stages=self.num_stages)


def _tiles(block_m, block_n, num_warps=4, num_stages=2) -> KernelTiles:
    return KernelTiles(block_m, block_n, num_warps, num_stages)


@dataclass(frozen=True)
class AttentionTiles:
    fwd: KernelTiles
    bwd_dq: KernelTiles
    bwd_dkdv: KernelTiles
    # _bwd_fused: block_n its key tiles, block_m the step of their loop over queries. The default
    # spilled the fewest registers of the dozen configurations compiled for sm_90a at ViT-B/16's
    # launch (ptxas -v: 144 bytes a thread, against 976 with _bwd_dkdv's 64x64 tiles, 4 warps and
    # 3 stages); not yet timed on a GPU
    bwd_fused: KernelTiles = _tiles(64, 32, 8, 1)

    def __str__(self) -> str:
        return f"fwd {self.fwd} dq {self.bwd_dq} dkdv {self.bwd_dkdv} fused {self.bwd_fused}"


BASELINE = AttentionTiles(_tiles(64, 64), _tiles(64, 64), _tiles(64, 64))

# The GPU default, keyed by head dim; other head dims use BASELINE. Head dim 64: per kernel the
# fastest of the candidates measured on an H200 (benchmarks/RESULTS.md, run 2): forward 64x64 with
# 3 stages (0.238 ms against 0.245), backward 128x64 dQ + 64x64 dK/dV with 3 stages (0.92 ms against 1.17).
GPU_TILES: dict[int, AttentionTiles] = {64: AttentionTiles(_tiles(64, 64, 4, 3), _tiles(128, 64, 4, 2),
                                                           _tiles(64, 64, 4, 3))}

# fp32 (an "ieee" dot, for correctness checks more than speed): its tiles take twice the shared
# memory of bf16's; these stay under the 99 KiB per block of sm_86/sm_89 (RTX 30xx/40xx, A10, L4,
# L40S) up to head dim 128, where the bf16 defaults would not (tests/test_kernels_compile.py).
FP32_TILES = AttentionTiles(_tiles(64, 32, 4, 1), _tiles(32, 32, 4, 1), _tiles(32, 32, 4, 1), _tiles(32, 32, 4, 1))

# Small tiles under the interpreter, so that tiny test shapes still span several (partial) tiles.
INTERPRETER_TILES = AttentionTiles(_tiles(32, 32), _tiles(32, 32), _tiles(32, 32), _tiles(32, 32))

# Compared on the GPU at ViT-B/16 shapes (S = 197: a kernel's program tiles end in smaller ones,
# 3 x 64 + 16 or 128 + 64 + 16; its loops end in one step of the remainder rounded up to a power
# of two, 16 rows after 64-row steps but a whole step after 128-row ones; see
# kernels/prompt_attention.py). GPU_TILES was chosen before these tails existed (run 2).
# Rows vary the three kernels together; kernels are independent, so the best forward of one
# row can be combined with the best backward of another.
CANDIDATES: list[AttentionTiles] = [
    BASELINE,
    AttentionTiles(_tiles(64, 64, 4, 3), _tiles(64, 64, 4, 3), _tiles(64, 64, 4, 3), _tiles(64, 64, 4, 3)),
    AttentionTiles(_tiles(128, 64, 8, 2), _tiles(128, 64, 8, 2), _tiles(64, 128, 8, 2), _tiles(64, 64, 8, 2)),
    AttentionTiles(_tiles(128, 64, 8, 3), _tiles(128, 64, 8, 3), _tiles(64, 128, 8, 3), _tiles(64, 128, 8, 2)),
    AttentionTiles(_tiles(128, 64, 4, 2), _tiles(128, 64, 4, 2), _tiles(64, 64, 4, 3), _tiles(32, 64, 8, 2)),
    AttentionTiles(_tiles(128, 128, 8, 2), _tiles(128, 32, 4, 3), _tiles(32, 128, 8, 3), _tiles(32, 32, 8, 2)),
    AttentionTiles(_tiles(64, 128, 4, 2), _tiles(64, 128, 4, 2), _tiles(128, 64, 8, 2), _tiles(64, 32, 8, 3)),
    AttentionTiles(_tiles(128, 32, 4, 3), _tiles(64, 32, 4, 3), _tiles(32, 64, 4, 3), _tiles(64, 32, 4, 2)),
]

_override: Optional[AttentionTiles] = None


def tiles_for(head_dim: int, interpreting: bool, fp32: bool = False) -> AttentionTiles:
    """The tiles a launch uses: a `use_tiles` override, else the interpreter's, fp32's on the GPU
    or the GPU default."""
    if _override is not None:
        return _override
    if interpreting:
        return INTERPRETER_TILES
    return FP32_TILES if fp32 else GPU_TILES.get(head_dim, BASELINE)


@contextlib.contextmanager
def use_tiles(tiles: AttentionTiles) -> Iterator[None]:
    """Launch every prompt-attention kernel with `tiles` inside the block (benchmarks, tests).
    Not thread-safe: it swaps a module-level setting."""
    global _override
    if not isinstance(tiles, AttentionTiles):
        raise ValueError(f"use_tiles needs an AttentionTiles, got {type(tiles).__name__}")
    previous, _override = _override, tiles
    try:
        yield
    finally:
        _override = previous
