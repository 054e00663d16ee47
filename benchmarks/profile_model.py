"""Where a step's GPU time goes: torch.profiler over a few steps of the whole model.

    python benchmarks/profile_model.py [inference|train|train-vision|text ...] [--backend B]

Prints, per mode, the wall time of a step, the share of it the GPU was busy with kernels and
how many ran, the kernels taking most of it (time per step, launches per step), and the
host-side calls with the most self time (where a step that keeps the GPU waiting spends it).
ViT-B/16, 8 x 224 x 224 clips, bf16 autocast, 400 class-specific prompts, random weights: the
benchmark settings.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from model_steps import inference_step, make_model, text_step, training_step

STEPS = 3
MODES = {"inference": (lambda model: inference_step(model, 32), 32),
         "train": (lambda model: training_step(model, 16), 16),
         "train-vision": (lambda model: training_step(model, 16, vision_only=True), 16),
         "text": (text_step, 0)}


def report(mode, step, clips):
    for _ in range(3):  # compiles, autotunes, warms the allocator
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / 10
    torch.cuda.reset_peak_memory_stats()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = [e for e in events if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
    busy = sum(e.self_device_time_total for e in kernels) / STEPS / 1e3
    launches = sum(e.count for e in kernels) // STEPS
    rate = f", {clips / wall:.0f} clips/s" if clips else ""
    print(f"\n## {mode}: {wall * 1e3:.2f} ms/step{rate}, GPU busy {busy:.2f} ms ({busy / wall / 10:.0f}%) "
          f"in {launches} kernels, peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:18]:
        ms = e.self_device_time_total / STEPS / 1e3
        print(f"{ms:7.3f} ms {e.count // STEPS:5d}x  {e.key[:110]}")
    host = [e for e in events if e.device_type.name == "CPU"]
    print(f"host side: {sum(e.self_cpu_time_total for e in host) / STEPS / 1e3:.2f} ms/step of op and runtime "
          f"calls (under the profiler); most self time:")
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:14]:
        print(f"{e.self_cpu_time_total / STEPS / 1e3:7.3f} ms {e.count // STEPS:5d}x  {e.key[:110]}")


def main():
    parser = argparse.ArgumentParser()
    # checked here, not by argparse's choices: argparse (3.11.7, 3.12.1, 3.13.0 tried) checks a "*" positional
    # given no words, its default list or [], as one choice, and refused every run without modes
    parser.add_argument("modes", nargs="*", metavar="{" + ",".join(MODES) + "}")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    model = make_model(args.backend)
    for mode in args.modes or ["inference", "train-vision", "train", "text"]:
        make_step, clips = MODES[mode]
        report(mode, make_step(model), clips)


if __name__ == "__main__":
    main()
