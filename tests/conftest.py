import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run on the CPU through Triton's interpreter. The mode
    # is fixed when a kernel is decorated (when its module is first imported), so it must be
    # set here, before any test module imports vitaclip's kernels.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vitaclip import VitaCLIPConfig
from video_fixtures import full_range_videos, vp9_dataset  # noqa: F401  (fixtures of the data tests)

CLASSES = ["jumping jacks", "ride_bike", "SitUps", "swim"]


def tiny_config(**overrides) -> VitaCLIPConfig:
    """A 2-layer model with 7x7 patches and 3 frames: odd sizes everywhere, fast on the CPU."""
    base = dict(image_size=56, patch_size=8, width=64, layers=2, heads=2, embed_dim=32, num_frames=3,
                text_width=32, text_layers=2, text_heads=2, n_ctx=3, num_global_prompts=2)
    return VitaCLIPConfig(**{**base, **overrides})


@pytest.fixture
def config():
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def random_video(config, batch=2, frames=None, dtype=torch.float32):
    t = config.num_frames if frames is None else frames
    return torch.randn(batch, 3, t, config.image_size, config.image_size, dtype=dtype)


def randomize_(model):
    """Give every parameter non-trivial values (biases and LayerNorms start at 0 and 1)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def zeros_made_during(fn) -> int:
    """How many new zero-filled tensors (aten::zeros, zeros_like) fn() makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(event.count for event in prof.key_averages() if event.key in ("aten::zeros", "aten::zeros_like"))


OWN_PROCESS_TIMEOUT_S = 240


def run_in_own_process(source: str) -> str:
    """Runs a test's body (Python source, the tests folder importable) in a new interpreter and
    returns what it printed: for checks that can leave a process broken (a failed CUDA graph
    capture) or kill it (a segmentation fault ended a whole GPU test run once), so that the tests
    after them run either way and the failure names its test."""
    # -X faulthandler: a crash prints the Python stack of every thread (without it a segmentation fault
    # leaves an empty stderr); what the body printed before is kept too, to tell which call crashed.
    # The timeout stays well under a lent GPU machine's 600 s a call: a hung child must not eat it.
    result = subprocess.run([sys.executable, "-X", "faulthandler", "-c", textwrap.dedent(source)],
                            capture_output=True, text=True, timeout=OWN_PROCESS_TIMEOUT_S, cwd=Path(__file__).parent)
    assert result.returncode == 0, (f"exit status {result.returncode}:\nstdout: {result.stdout[-2000:]}\n"
                                    f"stderr: {result.stderr[-4000:]}")
    return result.stdout
