"""Every Triton kernel compiles for Hopper (sm_90) in bf16, on any machine.

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


def compile_for_hopper(kernel, dtype, constexprs, num_warps=4):
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
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    print(f"compiled {kernel.__name__} {dtype}")


def compile_all():
    from vitaclip.kernels import prompt_attention, quick_gelu

    # all prompt kinds (ViT-B/16: 8 local, 8 global, summary) and none
    for n_local, n_global, summary in ((8, 8, True), (0, 0, False)):
        for kernel in (prompt_attention._fwd, prompt_attention._bwd_dq, prompt_attention._bwd_dkdv):
            compile_for_hopper(kernel, "bf16", dict(
                P=n_local, G=n_global, HAS_SUMMARY=summary, HEAD_DIM=64, BLOCK_D=64, BLOCK_M=64,
                BLOCK_N=64, BLOCK_PR=32 if summary else 16, PRECISION="tf32"))
    for kernel in (quick_gelu._fwd, quick_gelu._bwd):
        compile_for_hopper(kernel, "bf16", dict(SLOPE=quick_gelu.QUICK_GELU_SLOPE, BLOCK=2048), num_warps=8)


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 8


if __name__ == "__main__":
    compile_all()
