"""Tile configurations of the fused prompt attention, compared at ViT-B/16 shapes (bf16).

One test times forward and forward+backward of the default tiles and of every entry of
`vitaclip.ops.attention_tiles.CANDIDATES`, with each backward (VITACLIP_ATTENTION_BACKWARD: the
default "split", "split-apart" and "fused"), checks each one's output and gradients against the
default's, and prints a table sorted by forward+backward time (also written to
$OUT/attention-configs.json when OUT is set). Run it with -s to see the table:

    python3 -m pytest benchmarks/test_attention_configs_bench.py -q -s -p no:cacheprovider

Kernels are independent: the profiler's GPU time of each kernel (columns fwd, dq and dkdv under
the split backward, dkdv-apart under "split-apart", fused; each with all its launches) picks that
kernel's tiles, possibly from different rows;
the last line names the fastest per kernel. Rows are sorted by the split backward's time. Set the
default in `GPU_TILES` of vitaclip/ops/attention_tiles.py.
"""
import json
import math
import os
import sys
import time

import pytest
import torch

from cuda_bench import requires_cuda
from test_attention_bench import FRAMES, HEAD_DIM, HEADS, N_GLOBAL, SEQ, T0, make_inputs
from vitaclip.ops.attention import BACKWARDS, prompt_attention_qkv, triton_available
from vitaclip.ops.attention_tiles import CANDIDATES, tiles_for, use_tiles

MAX_REL_ERROR = 2e-2  # bf16 rounding differs between tilings by ~1e-3; a broken tiling is off by ~1
KEYS = SEQ + T0 + N_GLOBAL + 1
FWD_FLOPS = 4 * FRAMES * HEADS * SEQ * KEYS * HEAD_DIM  # QK^T and PV
FWD_BWD_FLOPS = FWD_FLOPS * 7 // 2  # the usual count: backward 2.5x forward (its kernels run 7 matmuls, not 5)


def rel_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


KERNELS = ("_fwd", "_bwd_dq", "_bwd_dkdv", "_bwd_fused")
# the per-kernel columns: (backward the kernel is timed under, kernel, the field of AttentionTiles it uses)
COLUMNS = {"fwd": ("split", "_fwd", "fwd"), "dq": ("split", "_bwd_dq", "bwd_dq"),
           "dkdv": ("split", "_bwd_dkdv", "bwd_dkdv"), "dkdv-apart": ("split-apart", "_bwd_dkdv", "bwd_dkdv"),
           "fused": ("fused", "_bwd_fused", "bwd_fused")}


def kernel_ms(step, iterations=10):
    """GPU milliseconds per step() of each kernel in KERNELS (all its launches), by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iterations):
            step()
        torch.cuda.synchronize()
    totals = dict.fromkeys(KERNELS, 0.0)
    for event in prof.key_averages():
        if event.key in totals:
            totals[event.key] += event.self_device_time_total / 1e3 / iterations
    return totals


def run_config(tiles, fwd_inputs, grad_inputs, grad_out, reference, monkeypatch):
    """(fwd ms, fwd+bwd ms with each backward (or, but for "split", its error message), per-kernel ms
    of all, worst relative error vs `reference` (the default tiling's split outputs; None: this is
    the default), the split backward's outputs) of one tiling."""
    from triton.testing import do_bench

    qkv, prompts = grad_inputs
    leaves = [qkv, *prompts]

    def step():
        torch.autograd.grad(prompt_attention_qkv(qkv, *prompts, T0), leaves, grad_out)

    with use_tiles(tiles):
        fwd = do_bench(lambda: prompt_attention_qkv(fwd_inputs[0], *fwd_inputs[1], T0),
                       warmup=10, rep=50, return_mode="median")
        fwd_bwd, outputs, kernels = {}, {}, {}
        for backward in BACKWARDS:
            monkeypatch.setenv("VITACLIP_ATTENTION_BACKWARD", backward)
            try:
                out = prompt_attention_qkv(qkv, *prompts, T0)
                outputs[backward] = [out.detach(), *torch.autograd.grad(out, leaves, grad_out)]
                fwd_bwd[backward] = do_bench(step, warmup=10, rep=50, return_mode="median")
                kernels[backward] = kernel_ms(step)
            except Exception as exc:  # another backward failing leaves the split one's figures
                if backward == "split":
                    raise
                fwd_bwd[backward], outputs[backward] = f"{type(exc).__name__}: {str(exc)[:200]}", None
    reference = reference or outputs["split"]  # the default's split backward: the reference of everything
    error = max(rel_error(g, w) for got in outputs.values() if got for g, w in zip(got, reference))
    return fwd, fwd_bwd, kernels, error, outputs["split"]


@requires_cuda
@pytest.mark.gpu
@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_attention_tile_configs(capsys, monkeypatch):
    torch.manual_seed(0)
    fwd_inputs = make_inputs(requires_grad=False)
    grad_inputs = make_inputs(requires_grad=True)
    grad_out = torch.randn(FRAMES, SEQ, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    default = tiles_for(HEAD_DIM, interpreting=False)
    configs = [default, *[c for c in CANDIDATES if c != default]]

    start = time.perf_counter()
    rows, failures, reference = [], [], None
    for tiles in configs:
        try:
            fwd, fwd_bwd, kernels, error, outputs = run_config(tiles, fwd_inputs, grad_inputs, grad_out, reference,
                                                               monkeypatch)
        except Exception as exc:  # e.g. out of shared memory at launch: report it, time the rest
            if tiles == default:
                raise
            failures.append(f"{tiles}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        if tiles == default:
            reference = outputs
        if error > MAX_REL_ERROR:
            failures.append(f"{tiles}: relative error {error:.3g} vs the default")
        for kind, ms in fwd_bwd.items():
            if isinstance(ms, str):
                failures.append(f"{tiles}: {kind} backward: {ms}")
                fwd_bwd[kind] = float("nan")
        rows.append(dict(config=str(tiles), default=tiles == default, fwd_ms=fwd, fwd_bwd_ms=fwd_bwd["split"],
                         bwd_ms=fwd_bwd["split"] - fwd, apart_fwd_bwd_ms=fwd_bwd["split-apart"],
                         fused_fwd_bwd_ms=fwd_bwd["fused"],
                         kernel_ms={column: kernels.get(kind, {}).get(kernel, float("nan"))
                                    for column, (kind, kernel, _) in COLUMNS.items()},
                         kernel_tiles={column: str(getattr(tiles, field)) for column, (_, _, field) in COLUMNS.items()},
                         fwd_tflops=FWD_FLOPS / fwd * 1e-9,
                         fwd_bwd_tflops=FWD_BWD_FLOPS / fwd_bwd["split"] * 1e-9, rel_error=error))
        # each row as it comes (the table and its JSON come at the end): a call cut by its time
        # limit, as run 4's was inside this test, keeps the configurations it timed
        r = rows[-1]
        print(f"[tiles] {r['config']}: fwd {r['fwd_ms']:.3f} ms, f+b split {r['fwd_bwd_ms']:.3f} / apart "
              f"{r['apart_fwd_bwd_ms']:.3f} / fused {r['fused_fwd_bwd_ms']:.3f} ms, GPU ms "
              + " ".join(f"{c} {v:.3f}" for c, v in r["kernel_ms"].items())
              + f" ({time.perf_counter() - start:.0f} s so far)", file=sys.__stderr__, flush=True)
        _write_json(rows, failures)
    elapsed = time.perf_counter() - start

    rows.sort(key=lambda r: r["fwd_bwd_ms"])
    with capsys.disabled():
        print(f"\nprompt attention tiles on {torch.cuda.get_device_name()}: F={FRAMES} S={SEQ} H={HEADS} "
              f"Dh={HEAD_DIM} keys={KEYS} bf16, {elapsed:.0f} s with compiles; * = default")
        print(f"{'config':<72} {'fwd ms':>7} {'bwd ms':>7} {'f+b ms':>7} {'apart f+b':>9} {'fused f+b':>9} "
              f"{'fwd TF/s':>8} {'f+b TF/s':>8} {'rel err':>8} | GPU ms of {' '.join(COLUMNS)}")
        for r in rows:
            print(f"{('* ' if r['default'] else '  ') + r['config']:<72} {r['fwd_ms']:7.3f} {r['bwd_ms']:7.3f} "
                  f"{r['fwd_bwd_ms']:7.3f} {r['apart_fwd_bwd_ms']:9.3f} {r['fused_fwd_bwd_ms']:9.3f} "
                  f"{r['fwd_tflops']:8.1f} "
                  f"{r['fwd_bwd_tflops']:8.1f} {r['rel_error']:8.1e} | "
                  + " ".join(f"{r['kernel_ms'][column]:.3f}" for column in COLUMNS))
        if rows:
            best = {c: min(rows, key=lambda r: math.inf if math.isnan(r["kernel_ms"][c]) else r["kernel_ms"][c])
                    for c in COLUMNS}
            print("fastest per kernel: " + ", ".join(f"{c} {best[c]['kernel_tiles'][c]} "
                                                     f"({best[c]['kernel_ms'][c]:.3f} ms)" for c in COLUMNS))
        for failure in failures:
            print("FAILED", failure)
    _write_json(rows, failures)
    assert not failures, failures


def _write_json(rows, failures):
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "attention-configs.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows, failures=failures), f, indent=1)
