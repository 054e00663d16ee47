"""Choices and defaults that the command line offers and the engine and data tools check,
kept free of torch: `vitaclip --help` and a mistyped option answer at once, without the
seconds (minutes on a cold network file system) that importing torch and the model takes."""
from __future__ import annotations

import os

PRECISIONS = ("bf16", "fp16", "fp32")  # autocast precisions
WEIGHT_DECAY_ON = ("all", "matrices")  # the trainable tensors AdamW decays
DEFAULT_STRIDE = 16  # frames between a clip's sampled frames (the paper's Kinetics-400 recipe)
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")
# seconds one video's encoding may take in `vitaclip prepare`: far past any clip's (and a film's at
# 256 px), a hung encoder
PREPARE_TIMEOUT = 3600.0


def usable_cores() -> int:
    """The cores this process may run on (a job's cpuset, a launcher's pinning), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_num_workers() -> int:
    """Decoding processes: this process's share of the cores it may run on (torchrun's
    LOCAL_WORLD_SIZE processes share a node's, or a job's cpuset), less one for itself, which
    feeds the GPU."""
    return max(1, usable_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) - 1)
