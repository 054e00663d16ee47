"""Every Triton kernel compiles for Hopper (sm_90) in bf16, on any machine: the attention
kernels with every candidate tile configuration that the GPU benchmark launches.

The CPU interpreter runs the kernels' Python but skips the compiler's type checks (e.g. a
variable with different tile shapes in two branches), so compile them too. The kernels are
decorated for the interpreter in this test session, so the compile runs in a subprocess
(this file as a script) without TRITON_INTERPRET.
"""
import os
import subprocess
import sys

import pytest

FP32_POINTERS = {"LSE", "DELTA", "DLK", "DLV", "DGK", "DGV"}
NON_POINTERS = {"S", "H"}


def compile_for_hopper(kernel, dtype, constexprs, num_warps=4, num_stages=2):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper() and name not in NON_POINTERS:
            signature[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    print(f"compiled {kernel.__name__} {dtype} {constexprs}")


def attention_launches():
    """(kernel, tiles) of every distinct launch of the candidate configurations."""
    from vitaclip.kernels import prompt_attention
    from vitaclip.ops.attention_tiles import CANDIDATES, GPU_TILES

    launches = []
    for tiles in [*GPU_TILES.values(), *CANDIDATES]:
        for kernel, kernel_tiles in ((prompt_attention._fwd, tiles.fwd), (prompt_attention._bwd_dq, tiles.bwd_dq),
                                     (prompt_attention._bwd_dkdv, tiles.bwd_dkdv)):
            if (kernel, kernel_tiles) not in launches:
                launches.append((kernel, kernel_tiles))
    return launches


def compile_all():
    from vitaclip.kernels import quick_gelu

    for kernel, tiles in attention_launches():
        # ViT-B/16's prompts (8 local, 8 global, summary: a prompt tile of 32)
        compile_for_hopper(kernel, "bf16", dict(
            P=8, G=8, HAS_SUMMARY=True, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, BLOCK_PR=32, PRECISION="tf32"),
            num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    # no prompts at all (their loads and the prompt tile compiled out), default tiles
    for kernel, tiles in attention_launches()[:3]:
        compile_for_hopper(kernel, "bf16", dict(
            P=0, G=0, HAS_SUMMARY=False, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=tiles.block_m,
            BLOCK_N=tiles.block_n, BLOCK_PR=16, PRECISION="tf32"),
            num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    for kernel in (quick_gelu._fwd, quick_gelu._bwd):
        compile_for_hopper(kernel, "bf16", dict(SLOPE=quick_gelu.QUICK_GELU_SLOPE, BLOCK=2048), num_warps=8)


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == len(attention_launches()) + 3 + 2


if __name__ == "__main__":
    compile_all()
