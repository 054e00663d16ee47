"""The main job's end-to-end demo: a synthetic action data set whose classes differ only in how a
shape changes over time, a tiny randomly initialised Vita-CLIP trained on it on the CPU through
the same train loop, checkpoints, evaluation and prediction as a real run."""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch

from .config import VitaCLIPConfig
from .data import pyav
from .data.transforms import normalize
from .engine.checkpoint import list_checkpoints, load_model
from .engine.evaluate import EvalConfig, evaluate
from .engine.predict import predict
from .engine.settings import check_count
from .engine.train import FINAL_MODEL, TrainConfig, train
from .model import VitaCLIP

# Every frame of a clip is ambiguous on its own (a square of some size somewhere in the middle);
# only the order of the frames tells the classes apart.
CLASSES = ("growing", "shrinking", "moving right", "moving left")
SUMMARY_FILE, VIDEO_LIST = "demo.json", "list.txt"  # in the output folder; in each data folder


def demo_model_config(num_frames: int = 4, image_size: int = 32) -> VitaCLIPConfig:
    return VitaCLIPConfig(image_size=image_size, patch_size=8, width=64, layers=2, heads=2, embed_dim=64,
                          num_frames=num_frames, text_width=64, text_layers=1, text_heads=2, n_ctx=4,
                          num_global_prompts=4)


class SyntheticActions:
    """`ds[i] -> (video [3, T, S, S] normalised, label, i)`: a square of a random colour on a random
    dark background that grows, shrinks or crosses the frame to the right or to the left. Item i
    is fixed by (seed, i); `get(i, rng)` adds pixel noise from `rng` (the training augmentation)."""

    def __init__(self, size: int, num_frames: int = 4, image_size: int = 32, seed: int = 0, noise: float = 0.05):
        self.size, self.num_frames, self.image_size, self.seed, self.noise = size, num_frames, image_size, seed, noise
        self.labels = [int(np.random.default_rng([seed, i]).integers(len(CLASSES))) for i in range(size)]

    def __len__(self) -> int:
        return self.size

    def clean(self, index: int) -> torch.Tensor:
        """Frames in [0, 1], [3, T, S, S]."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} clips")
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(len(CLASSES)))  # the same draw as self.labels
        s, t_count = self.image_size, self.num_frames
        colour = torch.from_numpy(rng.uniform(0.5, 1.0, 3)).float()
        video = torch.from_numpy(rng.uniform(0.0, 0.3, 3)).float().view(3, 1, 1, 1).repeat(1, t_count, s, s)
        centre = s // 2 + int(rng.integers(-2, 3))
        side = s // 4
        for t in range(t_count):
            f = t / max(1, t_count - 1)
            if label < 2:  # growing / shrinking around the centre
                r = round(2 + (s // 2 - 3) * (f if label == 0 else 1 - f))
                box = (centre - r, centre + r, centre - r, centre + r)
            else:  # crossing the frame to the right / to the left
                x = round((s - side) * (f if label == 2 else 1 - f))
                box = (centre - side // 2, centre + side // 2, x, x + side)
            top, bottom, left, right = (max(0, v) for v in box)
            video[:, t, top:bottom, left:right] = colour.view(3, 1, 1)
        return video

    def get(self, index: int, rng: Optional[np.random.Generator] = None):
        video = self.clean(index)
        if rng is not None and self.noise:
            video = video + torch.from_numpy(rng.normal(0, self.noise, video.shape)).float()
        return normalize(video * 255, channel_dim=0), self.labels[index], index

    def __getitem__(self, index: int):
        return self.get(index)


def write_videos(dataset: SyntheticActions, folder: Path, codec: str = "libx264", progress: bool = False) -> Path:
    """Write every clip as a video file and a list file `path,label` (paths relative to folder);
    returns the list file."""
    import av
    from fractions import Fraction

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    from tqdm.auto import tqdm

    for i in tqdm(range(len(dataset)), desc=f"write {folder.name} videos", unit="clip", disable=not progress):
        name = f"clip_{i:05d}.mp4"
        frames = (dataset.clean(i) * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).numpy()
        with av.open(str(folder / name), "w") as out:
            stream = out.add_stream(codec, rate=25, options={"crf": "10", "bf": "0"})
            stream.width, stream.height, stream.pix_fmt = dataset.image_size, dataset.image_size, "yuv420p"
            for t, rgb in enumerate(frames):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
                frame.pts, frame.time_base = t, Fraction(1, 25)
                out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
        rows.append(f"{name},{dataset.labels[i]}\n")
    list_file = folder / VIDEO_LIST
    list_file.write_text("".join(rows))
    return list_file


def video_data(config: "DemoConfig", train_set: SyntheticActions, test_set: SyntheticActions, out: Path):
    """The clips as files read by vitaclip.data's loader: training clips get a random resized crop
    (no flip: it would swap the left/right classes), test clips the test protocol."""
    from .data import VideoLoader

    train_list = write_videos(train_set, out / "data" / "train", progress=config.progress)
    test_list = write_videos(test_set, out / "data" / "test", progress=config.progress)
    common = dict(num_frames=config.num_frames, stride=1, size=train_set.image_size, backend="pyav", device="cpu",
                  num_classes=len(CLASSES), num_workers=0, shard_id=0, num_shards=1)
    train_data = VideoLoader(str(train_list), str(train_list.parent), train=True, batch_size=config.batch_size,
                             augment=None, flip=False, crop_scale=(0.6, 1.0), seed=config.seed, **common)
    test_data = VideoLoader(str(test_list), str(test_list.parent), train=False, batch_size=64, **common)
    return train_data, test_data, str(test_list.parent / "clip_00000.mp4")


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = "runs/demo"
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-2
    train_size: int = 512
    test_size: int = 256
    num_frames: int = 4
    seed: int = 0
    progress: bool = True
    video_files: bool = True  # write real video files and read them with vitaclip.data (needs PyAV)

    @classmethod
    def small(cls, **overrides) -> "DemoConfig":
        """A faster run for tests (about 15 s on one core, against about 30 s)."""
        return cls(**{"steps": 120, "train_size": 256, "test_size": 128, **overrides})


def run_demo(config: Optional[DemoConfig] = None, **overrides) -> Dict:
    config = dataclasses.replace(config or DemoConfig(), **overrides)
    # before the clips are drawn and written (numpy's "expected non-negative integer" for a seed of -1)
    for name, least in (("seed", 0), ("steps", 1), ("batch_size", 1), ("train_size", 1), ("test_size", 1),
                        ("num_frames", 1)):
        check_count(name, getattr(config, name), least)
    check_not_another_run(Path(config.output_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model's ops are faster on one thread than split over several
    try:
        return _run_demo(config)
    finally:
        torch.set_num_threads(threads)


def check_not_another_run(out: Path) -> None:
    """A demo starts afresh, deleting the checkpoints and final model in its folder: those of an earlier
    demo (its summary or its data there), never a training run's (a mistyped --output-dir)."""
    if (out / SUMMARY_FILE).is_file() or (out / "data" / "train" / VIDEO_LIST).is_file():
        return
    held = [p.name for p in list_checkpoints(out)] + ([FINAL_MODEL] if (out / FINAL_MODEL).exists() else [])
    if held:
        raise ValueError(f"{out} holds a training run that is not a demo's ({', '.join(held[-2:])}), which the demo "
                         "would delete: give the demo another --output-dir")


def _run_demo(config: DemoConfig) -> Dict:
    out = Path(config.output_dir)
    started = time.perf_counter()
    train_set = SyntheticActions(config.train_size, config.num_frames, seed=config.seed)
    test_set = SyntheticActions(config.test_size, config.num_frames, seed=config.seed + 1, noise=0.0)
    train_data, test_data, example = train_set, test_set, test_set[0][0]
    if config.video_files and pyav.available():
        train_data, test_data, example = video_data(config, train_set, test_set, out)
    torch.manual_seed(config.seed)  # the random "CLIP" backbone
    model = VitaCLIP(demo_model_config(config.num_frames), CLASSES)
    train_config = TrainConfig(output_dir=str(out), steps=config.steps, batch_size=config.batch_size,
                               lr=config.lr, warmup_steps=min(10, config.steps), seed=config.seed,
                               num_workers=0, checkpoint_every=max(1, config.steps // 2), keep_checkpoints=1,
                               log_every=10, eval_every=0, eval_batch_size=64, progress=config.progress,
                               device="cpu", overwrite=True)  # a demo is always a fresh run
    result = train(model, train_data, train_config, eval_data=test_data)
    # reload what the run saved, as a user would, and evaluate and predict with it
    trained = load_model(out / "model")
    ev = evaluate(trained, test_data, EvalConfig(batch_size=64, num_workers=0, device="cpu",
                                                progress=config.progress, json_path=str(out / "eval.json"),
                                                confusion_png=str(out / "confusion.png")))
    files = dict(decoder="pyav", stride=1) if isinstance(example, str) else {}  # (a tensor is a clip already)
    prediction = predict(trained, [example], top_k=len(CLASSES), device="cpu", **files)[0]
    summary = {"accuracy": ev.top1, "chance": 1 / len(CLASSES), "per_class": ev.per_class,
               "final_loss": result.losses[result.step], "steps": result.step,
               "predicted": prediction["top"][0]["label"], "true": CLASSES[test_set.labels[0]],
               "seconds": time.perf_counter() - started, "output_dir": str(out)}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    return summary
