"""Throughput on the current device: the model (inference, optionally training steps) and the
video loader, in clips per second."""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from ..config import VitaCLIPConfig
from ..model import VitaCLIP
from .distributed import pick_device
from .precision import autocast, grad_scaler
from .settings import check_count


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_model(preset: str = "ViT-B/16", batch_size: int = 8, frames: int = 8, iters: int = 10, warmup: int = 3,
                precision: str = "bf16", device: Optional[str] = None, backend: str = "auto", train: bool = False,
                tiny: bool = False, num_classes: int = 400) -> Dict[str, float]:
    """A randomly initialised model of the preset's shape (speed does not depend on the weights)."""
    from ..demo import demo_model_config

    check_count("iters", iters)  # 0 timed iterations: a division by zero after the model's set-up
    check_count("warmup", warmup, least=0)
    dev = pick_device(device)
    config = demo_model_config(frames) if tiny else VitaCLIPConfig.preset(preset, num_frames=frames)
    model = VitaCLIP(config, [f"class {i}" for i in range(num_classes)], backend=backend).to(dev)
    video = torch.randn(batch_size, 3, frames, config.image_size, config.image_size, device=dev)
    labels = torch.randint(num_classes, (batch_size,), device=dev)
    model.eval()

    @torch.no_grad()
    def infer():
        with autocast(dev, precision):
            model(video)

    report = {"device": str(dev), "model": "tiny" if tiny else preset, "image_size": config.image_size,
              "batch_size": batch_size, "frames": frames, "precision": precision}
    report["inference_clips_per_s"] = round(batch_size / _timed(infer, iters, warmup, dev), 2)
    if train:
        model.train()
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-6)
        scaler = grad_scaler(dev, precision)  # fp16 training pays for its scaler, as in `train`

        def step():
            with autocast(dev, precision):
                loss = F.cross_entropy(model(video), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        report["train_clips_per_s"] = round(batch_size / _timed(step, iters, warmup, dev), 2)
    return report


def bench_loader(list_file: str, data_root: str = "", batch_size: int = 8, frames: int = 8, iters: int = 10,
                 decoder: str = "auto", num_workers: int = 4, device: Optional[str] = None,
                 train: bool = True, size: int = 224, stride: int = 16, progress: bool = False) -> Dict[str, float]:
    """Clips per second of vitaclip.data.VideoLoader over `iters` batches (after one warm-up batch);
    for DALI, in its default mode, which the report names with how often it fell back to another.
    `progress`: a bar while the list's new videos are probed (before any timing)."""
    from ..data import VideoLoader

    check_count("iters", iters)  # the batches are counted down to 0: from 0, for ever
    dev = pick_device(device)
    loader = VideoLoader(list_file, data_root, train=train, batch_size=batch_size, num_frames=frames, size=size,
                         stride=stride, backend=decoder, device=dev, num_workers=num_workers, shard_id=0, num_shards=1,
                         progress=progress)
    clips, start, epoch = 0, None, 0
    while True:
        loader.set_epoch(epoch)
        batches = 0
        for batch in loader:
            batches += 1
            if start is None:  # the first batch pays for start-up
                _sync(dev)
                start = time.perf_counter()
                continue
            clips += batch.video.shape[0]
            iters -= 1
            if iters == 0:
                _sync(dev)
                report = {"loader": loader.backend, "loader_pipeline": "train" if train else "eval",
                          "loader_clips_per_s": round(clips / (time.perf_counter() - start), 2)}
                if loader.dali_decoder is not None:
                    report.update(dali_mode=loader.dali_decoder.mode, dali_fallbacks=loader.dali_decoder.fallbacks)
                return report
        if batches == 0:
            # (a training list too short for one batch is refused by the loader, naming batch_size)
            raise ValueError(f"{list_file} gives no batch of {batch_size} videos that decode")
        epoch += 1
