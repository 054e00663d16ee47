"""Registers and spilled bytes per thread of every prompt-attention kernel launch at ViT-B/16's
shapes (packed qkv, 12 heads of 64, S = 197, 8 local and 8 global prompts and a summary token),
for the GPU default tiles and every candidate, as ptxas compiles Triton's code for sm_90a with the
arguments specialised as at that launch. No GPU needed: a proxy between GPU runs (spills cost
local-memory traffic), not a timing.

    python benchmarks/kernel_registers.py        # needs Triton's NVIDIA backend and ptxas

Spills depend on Triton's version: the lent GPU machines run Triton 3.6, whose code spilled nothing
in launches where 3.8's spilled 144-160 bytes. For their figures, use that version and its own
ptxas: `pip install --target /tmp/triton36 triton==3.6.0`, then
`PYTHONPATH=/tmp/triton36 PTXAS=/tmp/triton36/triton/backends/nvidia/bin/ptxas python benchmarks/kernel_registers.py`.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_kernels_compile import VIT_B16_PROMPTS, attention_launches, compile_for  # noqa: E402

HEADS, HEAD_DIM, SEQ = 12, 64, 197
ROW = 3 * HEADS * HEAD_DIM  # packed qkv: [F, S, 3, H, Dh], its gradient alike
LAUNCH_VALUES = dict(S=SEQ, H=HEADS, frames_per_group=8, row_start=0, n_tiles=3,
                     **{f"s{t}_{axis}": stride for t in ("q", "k", "v", "dq", "dk", "dv")
                        for axis, stride in (("f", SEQ * ROW), ("s", ROW), ("h", HEAD_DIM), ("d", 1))})


def ptxas_usage(ptx: str, ptxas: str) -> tuple:
    """(registers, spilled bytes stored) per thread, as ptxas -v reports them for sm_90a."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        report = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spilled


def main() -> None:
    import triton

    ptxas = os.environ.get("PTXAS") or shutil.which("ptxas") or "/usr/local/cuda/bin/ptxas"
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(f"Triton {triton.__version__}, {ptxas}: {version}")
    print(f"{'kernel':<12} {'tiles':<12} {'launch':<24} {'registers':>9} {'spilled B':>9} {'shared B':>9}")
    for kernel, constexprs, tiles in attention_launches():
        compiled = compile_for(kernel, "bf16", dict(constexprs, **VIT_B16_PROMPTS), num_warps=tiles.num_warps,
                               num_stages=tiles.num_stages, launch_values=LAUNCH_VALUES)
        registers, spilled = ptxas_usage(compiled.asm["ptx"], ptxas)
        launch = " ".join(f"{k}={constexprs[k]}" for k in ("BLOCK_M", "BLOCK_N", "PROMPT_PROGRAM") if k in constexprs)
        print(f"{kernel.__name__:<12} {str(tiles):<12} {launch:<24} {registers:9d} {spilled:9d} "
              f"{compiled.metadata.shared:9d}")


if __name__ == "__main__":
    main()
