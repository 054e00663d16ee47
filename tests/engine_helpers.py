"""Tiny models and data for the engine tests (CPU, fractions of a second per step)."""
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
