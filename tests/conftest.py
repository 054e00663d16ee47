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
from vitaclip.ops.attention import triton_available
from video_fixtures import full_range_videos, vp9_dataset  # noqa: F401  (fixtures of the data tests)

CLASSES = ["jumping jacks", "ride_bike", "SitUps", "swim"]


def interpreter_numpy_clash(triton_version: str, numpy_version: str):
    """Why Triton's interpreter cannot run our kernels beside this NumPy, or None. Up to Triton 3.6
    (torch 2.11's) it reads a loop bound as int() of a one-element array, which NumPy 2.4 refuses
    ('only 0-dimensional arrays can be converted to Python scalars'); Triton 3.7 squeezes it first."""
    def release(version):
        return tuple(int(part) for part in version.split("+")[0].split(".")[:2])

    if release(triton_version) < (3, 7) and release(numpy_version) >= (2, 4):
        return (f"Triton {triton_version}'s CPU interpreter, which runs the kernel tests here, fails with NumPy "
                f"{numpy_version} (fixed in Triton 3.7): pip install 'numpy<2.4', or a torch whose Triton is 3.7 "
                f"or newer")
    return None


def pytest_configure(config):
    """Refuses at once, naming the clash, a run whose kernel tests would all fail on it."""
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_available():
        import numpy
        import triton

        problem = interpreter_numpy_clash(triton.__version__, numpy.__version__)
        if problem is not None:
            raise pytest.UsageError(problem)


# the Triton kernels run here: on CUDA, or on the CPU through the interpreter
needs_triton_kernels = pytest.mark.skipif(
    not triton_available() or (not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"),
    reason="needs Triton on CUDA or Triton's CPU interpreter")
# tests of the interpreter itself (its tiles, its checks): on CPU-only machines
interpreter_only = pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="the interpreter tests run on CPU-only machines")


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


def check_user_compile(model, video) -> None:
    """A user's torch.compile of the whole model (aot_eager: dynamo's capture and autograd, without
    inductor's slow CPU code): a training pass traces as one graph (fullgraph=True) and gives eager's
    logits and trainable-parameter gradients; an evaluation without gradients breaks its graph only
    at the cached text features, and follows an update of the learned context."""
    from torch._dynamo.utils import counters

    def logits_and_grads(run):
        model.zero_grad(set_to_none=True)
        logits = run(video)
        (logits * torch.linspace(-1, 1, logits.numel(), device=logits.device).view_as(logits)).sum().backward()
        return logits.detach(), [p.grad for p in model.trainable_parameters()]

    torch._dynamo.reset()
    counters.clear()
    model.train()
    want, want_grads = logits_and_grads(model)
    got, got_grads = logits_and_grads(torch.compile(model, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for (name, _), g, w in zip(model.named_trainable_parameters(), got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)
    model.eval()
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):  # the second after an update that the cached text features must follow
        with torch.no_grad():
            torch.testing.assert_close(compiled(video), model(video), rtol=1e-5, atol=1e-5)
            model.prompt_learner.ctx.add_(0.5)
    # the one break, at the torch.compiler.disable()d lookup (torch 2.6 words it "'inline in skipfiles:
    # VitaCLIP._cached_text_features | _fn ...")
    (reason,) = {reason.split("\n")[0] for reason in counters["graph_break"]}
    assert reason == "Skip inlining `torch.compiler.disable()`d function" or "VitaCLIP._cached_text_features" in reason
