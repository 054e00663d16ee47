"""torch.compile settings of what the compiled backends compile: the vision layer, the video
embedding and the text transformer."""
from __future__ import annotations

import os

# The mode comes from the environment, read when each piece is first compiled.
# "max-autotune-no-cudagraphs" lets inductor time Triton GEMM templates against cuBLAS and fuse
# pointwise neighbours (QuickGELU, residual adds) into the winner's epilogue, for minutes of
# tuning at the first call; modes that add inductor's own CUDA graphs are left out
# ("fast-graphed" captures whole passes itself).
COMPILE_MODE_ENV = "VITACLIP_COMPILE_MODE"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_mode() -> str:
    mode = os.environ.get(COMPILE_MODE_ENV, "default")
    if mode not in COMPILE_MODES:
        raise ValueError(f"{COMPILE_MODE_ENV}={mode!r} is not a supported torch.compile mode; "
                         f"use one of {COMPILE_MODES}")
    return mode
