"""torch.compile settings of what the compiled backends compile: the vision layer, the video
embedding and the text transformer."""
from __future__ import annotations

from .switches import env_choice

# The mode comes from the environment, read when each piece is first compiled.
# "max-autotune-no-cudagraphs" lets inductor time Triton GEMM templates against cuBLAS and fuse
# pointwise neighbours (QuickGELU, residual adds) into the winner's epilogue, for minutes of
# tuning at the first call; modes that add inductor's own CUDA graphs are left out
# ("fast-graphed" captures whole passes itself).
COMPILE_MODE_ENV = "VITACLIP_COMPILE_MODE"
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_mode() -> str:
    return env_choice(COMPILE_MODE_ENV, COMPILE_MODES, "default")
