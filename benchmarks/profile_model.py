"""Where a step's GPU time goes: torch.profiler over a few steps of the whole model.

    python benchmarks/profile_model.py [inference|train|train-vision|text ...] [--backend B]

Prints, per mode, the wall time of a step, the share of it the GPU was busy with kernels,
the kernels taking most of it (time per step, launches per step), and the host-side calls
with the most self time (where a step that keeps the GPU waiting spends it). ViT-B/16, 8 x 224 x 224
clips, bf16 autocast, 400 class-specific prompts, random weights: the benchmark settings.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from vitaclip import VitaCLIP, VitaCLIPConfig

FRAMES, N_CLASSES, STEPS = 8, 400, 3


def make_steps(model):
    def video(batch):
        return torch.randn(batch, 3, FRAMES, 224, 224, device="cuda")

    def inference():
        clips = video(32)
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                model(clips)
        return step, 32

    def train():
        clips, labels = video(16), torch.randint(0, N_CLASSES, (16,), device="cuda")
        model.train()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(clips), labels)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step, 16

    def train_vision():
        clips, labels = video(16), torch.randint(0, N_CLASSES, (16,), device="cuda")
        text = F.normalize(torch.randn(N_CLASSES, model.config.embed_dim, device="cuda"), dim=-1)
        model.train()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = F.normalize(model.encode_video(clips).float(), dim=-1)
                loss = F.cross_entropy(model.logit_scale.exp() * feats @ text.t(), labels)
            loss.backward()
            model.zero_grad(set_to_none=True)
        return step, 16

    def text():
        model.train()

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                feats = model.encode_text()
            feats.float().square().mean().backward()
            model.zero_grad(set_to_none=True)
        return step, 0

    return {"inference": inference, "train": train, "train-vision": train_vision, "text": text}


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
    kernels = [e for e in prof.key_averages() if e.self_device_time_total > 0 and e.device_type.name == "CUDA"]
    busy = sum(e.self_device_time_total for e in kernels) / STEPS / 1e3
    rate = f", {clips / wall:.0f} clips/s" if clips else ""
    print(f"\n## {mode}: {wall * 1e3:.2f} ms/step{rate}, GPU busy {busy:.2f} ms ({busy / wall / 10:.0f}%), "
          f"peak {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GB")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:18]:
        ms = e.self_device_time_total / STEPS / 1e3
        print(f"{ms:7.3f} ms {e.count // STEPS:5d}x  {e.key[:110]}")
    host = [e for e in prof.key_averages() if e.device_type.name == "CPU"]
    print(f"host side: {sum(e.self_cpu_time_total for e in host) / STEPS / 1e3:.2f} ms/step of op and runtime "
          f"calls (under the profiler); most self time:")
    for e in sorted(host, key=lambda e: -e.self_cpu_time_total)[:14]:
        print(f"{e.self_cpu_time_total / STEPS / 1e3:7.3f} ms {e.count // STEPS:5d}x  {e.key[:110]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("modes", nargs="*", default=["inference", "train-vision", "train", "text"])
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    model = VitaCLIP(VitaCLIPConfig.preset("ViT-B/16"), [f"action number {i}" for i in range(N_CLASSES)],
                     backend=args.backend).cuda()
    steps = make_steps(model)
    for mode in args.modes:
        report(mode, *steps[mode]())


if __name__ == "__main__":
    main()
