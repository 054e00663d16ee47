"""Tiny models and data for the engine tests (CPU, fractions of a second per step)."""
import os

import pytest
import torch

from vitaclip import VitaCLIP
from vitaclip.demo import CLASSES, SyntheticActions, demo_model_config
from vitaclip.engine.train import TrainConfig

FRAMES, SIZE = 2, 16


def tiny_model(seed: int = 0, classes=CLASSES) -> VitaCLIP:
    torch.manual_seed(seed)
    return VitaCLIP(demo_model_config(FRAMES, SIZE), list(classes))


def tiny_data(n: int = 32, seed: int = 0) -> SyntheticActions:
    return SyntheticActions(n, FRAMES, SIZE, seed=seed)


def tiny_train_config(out, **overrides) -> TrainConfig:
    base = dict(output_dir=str(out), steps=6, batch_size=4, lr=1e-2, warmup_steps=2, num_workers=0,
                checkpoint_every=2, keep_checkpoints=0, log_every=1, progress=False, tensorboard=False,
                save_final=False, precision="fp32", device="cpu")
    return TrainConfig(**{**base, **overrides})


def trainable(model) -> dict:
    return {k: v.detach().clone() for k, v in model.named_trainable_parameters()}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny ops run fastest on one thread (and far faster than two on a busy 2-core CI box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SignallingData(SyntheticActions):
    """tiny_data() that sends `sig` to its own process as it hands out its items number `at`
    (counted from 1 in this process), on the given rank only (RANK, as torchrun sets it)."""

    def __init__(self, sig, at, rank: int = 0, n: int = 32):
        super().__init__(n, FRAMES, SIZE, seed=0)
        self.sig, self.at, self.rank, self.fetched = sig, set(at), rank, 0

    def get(self, index, rng=None):  # what the training loader calls
        self.fetched += 1
        if self.fetched in self.at and int(os.environ.get("RANK", "0")) == self.rank:
            os.kill(os.getpid(), self.sig)
        return super().get(index, rng)


def drawing_model(draws: list, seed: int = 0) -> VitaCLIP:
    """tiny_model() whose every forward draws from the process's global torch generator (as dropout or a
    user's loss would; the data's items are drawn under seeds of their own), recording the draws of its
    training forwards in `draws`."""
    model = tiny_model(seed)

    def draw(module, args, output):
        value = torch.rand(()).item()
        if module.training:
            draws.append(value)

    model.register_forward_hook(draw)
    return model


class WorkerSeeds(SyntheticActions):
    """tiny_data() whose items carry, as their video id, the seed of the DataLoader worker that made them
    (its torch seed before the item's own)."""

    def __init__(self):
        super().__init__(8, FRAMES, SIZE, seed=0)

    def get(self, index, rng=None):
        video, label, _ = super().get(index, rng)
        return video, label, torch.utils.data.get_worker_info().seed


class FetchedItems(SyntheticActions):
    """tiny_data() that records which items it hands out."""

    def __init__(self):
        super().__init__(32, FRAMES, SIZE, seed=0)
        self.fetched = []

    def get(self, index, rng=None):
        self.fetched.append(index)
        return super().get(index, rng)


class Built(Exception):
    """Raised in place of building the model: what a command checked before it is what a test wants."""


def cli_videos(tmp_path_factory, name: str, n: int, saved_model: bool = True):
    """(root, list file): n synthetic clips as mp4 files and their list under root/clips, root/classes.txt
    and, with saved_model, a saved tiny model in root/model."""
    from vitaclip.demo import write_videos

    root = tmp_path_factory.mktemp(name)
    list_file = write_videos(tiny_data(n), root / "clips")
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    if saved_model:
        tiny_model().save_pretrained(root / "model")
    return root, list_file


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of `vitaclip *argv`."""
    from vitaclip.cli import main

    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err
