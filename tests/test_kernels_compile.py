"""Every Triton kernel compiles for Hopper (sm_90) in bf16, on any machine: the attention
kernels with every candidate tile configuration that the GPU benchmark launches; the default
configuration's launches also for Ampere (sm_80, the A100s users train on); fp32's tiles for
sm_86 within its shared memory.

The CPU interpreter runs the kernels' Python but skips the compiler's type checks (e.g. a
variable with different tile shapes in two branches), so compile them too. The kernels are
decorated for the interpreter in this test session, so the compiles run in subprocesses
without TRITON_INTERPRET (this file as a script, one a core, each a share of the compiles:
Triton compiles on one core, and one process took most of the CPU suite's time).
"""
import inspect
import os
import subprocess
import sys

import pytest

from vitaclip.choices import usable_cores

FP32_POINTERS = {"LSE", "DELTA", "DQ_ACC", "DLK", "DLV", "DGK", "DGV"}
SM86_SHARED_MEMORY = 101376  # bytes per block, opted in (RTX 30xx/40xx, A10, L4, L40S)
NON_POINTERS = {"S", "H"}
VIT_B16_PROMPTS = dict(P=8, G=8, HAS_SUMMARY=True, BLOCK_PR=32)  # 8 local, 8 global, summary: a tile of 32


def compile_for(kernel, dtype, constexprs, num_warps=4, num_stages=2, arch=90, int64=(), launch_values=None):
    """The compiled kernel. Without `launch_values` every int argument is a plain i32 (i64 for
    `int64`): the most general code. With them (int argument name -> its value at a launch), the
    arguments are specialised as Triton's JIT does at that launch: a 1 becomes a constant, multiples
    of 16 (and the pointers) are marked divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, attrs, constexprs = {}, {}, dict(constexprs)
    divisible = [["tt.divisibility", 16]]
    for index, name in enumerate(kernel.arg_names):
        value = (launch_values or {}).get(name)
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.isupper() and name not in NON_POINTERS:
            signature[name] = "*fp32" if name in FP32_POINTERS else f"*{dtype}"
            if launch_values is not None:
                attrs[(index,)] = divisible
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], constexprs[name] = "constexpr", 1
        else:  # Triton passes an int argument as i64 from 2^31 on
            signature[name] = "i64" if name in int64 else "i32"
            if value is not None and value % 16 == 0:
                attrs[(index,)] = divisible
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    print(f"compiled {kernel.__name__} sm_{arch} {dtype} {constexprs}")
    return compiled


def attention_launches(configs=None, head_dim=64, precision="tf32"):
    """(kernel, constexprs, tiles) of every distinct launch that `ops.attention` makes at S = 197
    (ViT-B/16) with the given configurations (default: the GPU default and the candidates): full
    tiles, then the 5-row tail's own launch."""
    import triton

    from vitaclip.kernels import prompt_attention
    from vitaclip.ops.attention import _row_tiles, _tail
    from vitaclip.ops.attention_tiles import CANDIDATES, GPU_TILES

    seq, launches = 197, []
    for tiles in configs or [*GPU_TILES.values(), *CANDIDATES]:
        for kernel, kernel_tiles in ((prompt_attention._fwd, tiles.fwd), (prompt_attention._bwd_dq, tiles.bwd_dq),
                                     (prompt_attention._bwd_dkdv, tiles.bwd_dkdv)):
            base = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                        BLOCK_M=kernel_tiles.block_m, BLOCK_N=kernel_tiles.block_n, PRECISION=precision)
            if kernel is prompt_attention._bwd_dkdv:  # program tiles over keys, loop over queries
                base["TAIL_M"] = _tail(seq, kernel_tiles.block_m)
                # the first launch with the prompt-tile programs ("split") or without ("split-apart")
                variants = [dict(base, BLOCK_N=tile, PROMPT_PROGRAM=prompts)
                            for n, (_, _, tile) in enumerate(_row_tiles(seq, kernel_tiles.block_n))
                            for prompts in ((1, 0) if n == 0 else (0,))]
            else:  # program tiles over queries, loop over keys
                base["TAIL_N"] = _tail(seq, kernel_tiles.block_n)
                variants = [dict(base, BLOCK_M=tile) for _, _, tile in _row_tiles(seq, kernel_tiles.block_m)]
            for constexprs in variants:
                launch = (kernel, constexprs, kernel_tiles)
                if launch not in launches:
                    launches.append(launch)
        # the fused backward (VITACLIP_ATTENTION_BACKWARD=fused): one launch
        fused_tiles = tiles.bwd_fused
        fused = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                     BLOCK_M=fused_tiles.block_m, BLOCK_N=fused_tiles.block_n, PRECISION=precision,
                     TAIL_M=_tail(seq, fused_tiles.block_m), TAIL_N=_tail(seq, fused_tiles.block_n))
        if (prompt_attention._bwd_fused, fused, fused_tiles) not in launches:
            launches.append((prompt_attention._bwd_fused, fused, fused_tiles))
    return launches


def compile_jobs():
    """(kernel, dtype, constexprs, compile options, most shared memory or None) of every compile."""
    from vitaclip.kernels import quick_gelu

    jobs = []
    for kernel, constexprs, tiles in attention_launches():
        jobs.append((kernel, "bf16", dict(constexprs, **VIT_B16_PROMPTS),
                     dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages), None))
    # no prompts at all (their loads and the prompt tile compiled out), the default's launches
    for kernel, constexprs, tiles in default_launches():
        constexprs = dict(constexprs, P=0, G=0, HAS_SUMMARY=False, BLOCK_PR=16)
        if "PROMPT_PROGRAM" in constexprs:
            constexprs["PROMPT_PROGRAM"] = 0
        jobs.append((kernel, "bf16", constexprs, dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages), None))
    for kernel, constexprs, tiles in default_launches():
        jobs.append((kernel, "bf16", dict(constexprs, **VIT_B16_PROMPTS),
                     dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages, arch=80), None))
    # fp32 on the cards with the least shared memory per block (sm_86/sm_89: 99 KiB), at the
    # largest head dim of its tiles (shared memory grows with it)
    for kernel, constexprs, tiles in fp32_launches():
        jobs.append((kernel, "fp32", dict(constexprs, **VIT_B16_PROMPTS),
                     dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages, arch=86), SM86_SHARED_MEMORY))
    for kernel in (quick_gelu._quick_gelu_fwd, quick_gelu._quick_gelu_bwd):
        gelu = dict(SLOPE=quick_gelu.QUICK_GELU_SLOPE, BLOCK=2048)
        for arch in (80, 90):
            jobs.append((kernel, "bf16", gelu, dict(num_warps=8, arch=arch), None))
        # ViT-L/14's MLP over a 3,072-frame evaluation batch holds 3.2e9 elements
        jobs.append((kernel, "bf16", gelu, dict(num_warps=8, int64=("n",)), None))
    return jobs


def compile_share(part: int, parts: int) -> None:
    """Compiles every `parts`-th job from the `part`-th on (a process each: the compiler is serial)."""
    for kernel, dtype, constexprs, options, most_shared in compile_jobs()[part::parts]:
        shared = compile_for(kernel, dtype, constexprs, **options).metadata.shared
        if most_shared is not None and shared > most_shared:
            sys.exit(f"{kernel.__name__} {constexprs} in {dtype} needs {shared} bytes of shared memory, "
                     f"sm_{options['arch']} has {most_shared}")


def default_launches():
    from vitaclip.ops.attention_tiles import GPU_TILES

    return attention_launches([GPU_TILES[64]])


def fp32_launches():
    """FP32_TILES' launches of full tiles (the tails' are smaller) at head dim 128."""
    from vitaclip.ops.attention_tiles import FP32_TILES

    full = {}
    for kernel, constexprs, tiles in attention_launches([FP32_TILES], head_dim=128, precision="ieee"):
        full.setdefault(kernel, (kernel, constexprs, tiles))
    return list(full.values())


def test_kernels_compile_for_hopper_and_ampere():
    pytest.importorskip("triton.backends.nvidia")
    import triton
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:  # (Triton 3.2, torch 2.6's)
        pytest.skip(f"Triton {triton.__version__}'s ASTSource takes no constexprs, which this compile passes")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    parts = min(4, usable_cores())
    compilers = [subprocess.Popen([sys.executable, __file__, str(part), str(parts)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for part in range(parts)]
    try:
        results = [(compiler.communicate(timeout=300), compiler.returncode) for compiler in compilers]
    finally:
        for compiler in compilers:
            compiler.kill()
    for (_, stderr), returncode in results:
        assert returncode == 0, stderr[-4000:]
    stdout = "".join(out for (out, _), _ in results)
    assert stdout.count("compiled") == (len(attention_launches()) + 2 * len(default_launches())
                                        + len(fp32_launches()) + 6)
    assert stdout.count("sm_80") == len(default_launches()) + 2


if __name__ == "__main__":
    compile_share(int(sys.argv[1]), int(sys.argv[2]))
