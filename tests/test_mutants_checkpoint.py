"""Behaviour of the checkpoints (vitaclip/engine/checkpoint.py) and atomic file writes (vitaclip/files.py)
that mutation testing found unpinned by the other tests: each test checks it against a small computation
or a stated fact of its own."""
import errno
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_helpers import FRAMES, SIZE, one_thread, tiny_model
from vitaclip import VitaCLIP, files
from vitaclip.demo import CLASSES, demo_model_config
from vitaclip.engine import checkpoint as ckpt

assert one_thread  # engine_helpers' autouse fixture: one torch thread per test


# ---------------------------------------------------------------------------- finding and reading
def test_a_step_set_aside_three_times_keeps_all_three_unreadable_copies(tmp_path):
    """set_aside_name counts up past every name already taken (.unreadable, .1, .2, ...), not only the
    first: a third damaged copy of a step replaced the second one set aside."""
    ckpt.save_checkpoint(tmp_path, 1, {"step": 1})
    damages = [b"first damage", b"second damage", b"third damage"]
    for damage in damages:
        ckpt.checkpoint_path(tmp_path, 2).write_bytes(damage)
        with pytest.warns(UserWarning, match="cannot be read"):
            assert ckpt.load_latest_checkpoint(tmp_path)[1]["step"] == 1
    names = ["checkpoint-00000002.pt.unreadable"] + [f"checkpoint-00000002.pt.unreadable.{n}" for n in (1, 2)]
    assert [(tmp_path / name).read_bytes() for name in names] == damages


def test_a_file_of_another_format_is_not_a_training_checkpoint(tmp_path):
    """Only our FORMAT mark makes a file ours: a dict marked with another format (another tool's, or a
    layout this release does not know) is refused by load_checkpoint and not read by
    read_training_checkpoint."""
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"format": ckpt.FORMAT + "-other", "model": {}}, path)
    assert ckpt.read_training_checkpoint(path) is None
    with pytest.raises(ValueError, match="is not a vitaclip training checkpoint"):
        ckpt.load_checkpoint(path)


class Unpicklable:  # no tensor, no plain value: what a weights-only load refuses
    pass


def test_a_file_holding_other_objects_than_tensors_and_plain_values_is_not_read_as_a_training_checkpoint(
        tmp_path):
    """Checkpoints are read weights-only: a file that would need arbitrary objects unpickled (which runs
    code) is not ours, even where it carries our format mark."""
    path = tmp_path / "checkpoint-00000001.pt"
    torch.save({"format": ckpt.FORMAT, "extra": Unpicklable()}, path)
    assert ckpt.read_training_checkpoint(path) is None
    ckpt.save_checkpoint(tmp_path, 2, {"extra": [1, "two", (3.0,)]})  # plain values are ours
    assert ckpt.read_training_checkpoint(tmp_path / "checkpoint-00000002.pt")["extra"] == [1, "two", (3.0,)]


# ---------------------------------------------------------------------------- model state
def test_own_state_of_another_shape_is_refused_even_where_it_would_broadcast():
    """A tensor of another shape that copy_ would broadcast (one context vector for all of them) is a
    checkpoint of another model: refused naming both shapes, not spread over the model's tensor."""
    model = tiny_model()
    state = ckpt.own_state(model)
    ctx = state["prompt_learner.ctx"]
    assert ctx.shape[-2] > 1  # several context vectors (per class or shared)
    before = model.state_dict()["prompt_learner.ctx"].clone()
    shape = (*ctx.shape[:-2], 1, ctx.shape[-1])  # one vector, which copy_ would spread over all of them
    with pytest.raises(ValueError, match=rf"prompt_learner.ctx: {re.escape(str(shape))} in ckpt, "
                                         rf"{re.escape(str(tuple(ctx.shape)))} in the model"):
        ckpt.load_own_state(model, {**state, "prompt_learner.ctx": torch.ones(shape)}, "ckpt")
    torch.testing.assert_close(model.state_dict()["prompt_learner.ctx"], before, rtol=0, atol=0)


def test_a_class_specific_context_for_another_number_of_classes_is_named_as_such():
    """A per-class context learned for k classes refused for a model of n != k classes says so in
    those terms, not only as a shape mismatch of prompt_learner.ctx."""
    model = tiny_model()
    state = ckpt.own_state(model)
    ctx = state["prompt_learner.ctx"]
    assert ctx.dim() == 3  # the tiny model learns a context per class
    n = len(model.classnames)
    with pytest.raises(ValueError, match=f"class-specific context for {n - 1} classes, but the model has {n} classes"):
        ckpt.load_own_state(model, {**state, "prompt_learner.ctx": ctx[:-1].clone()}, "ckpt")


def test_the_order_of_classes_matters_to_a_class_specific_context_only():
    """A context shared by all classes is the same for each: the same classes in another order score
    correctly and are taken; a context learned per class refuses them (each would get another's)."""
    reordered = list(reversed(CLASSES))
    shared = VitaCLIP(demo_model_config(FRAMES, SIZE).replace(csc=False), list(CLASSES))
    assert shared.prompt_learner.ctx.dim() == 2
    ckpt.check_class_order(shared, reordered, "shared")
    with pytest.raises(ValueError, match="class 0 is"):
        ckpt.check_class_order(tiny_model(), reordered, "per class")


def test_plain_values_keep_tuples_as_tuples():
    """A checkpoint reads tuples back as tuples (weights_only keeps them): settings such as the Adam
    betas stay tuples, their items made plain."""
    plain = ckpt.plain_values({"betas": (np.float32(0.5), 0.75), "dirs": [Path("a"), ("b",)]})
    assert plain == {"betas": (0.5, 0.75), "dirs": ["a", ("b",)]}
    assert type(plain["betas"]) is tuple and type(plain["dirs"]) is list and type(plain["dirs"][1]) is tuple
    assert type(plain["betas"][0]) is float


# ---------------------------------------------------------------------------- backbone fingerprints
def test_a_fingerprint_summing_to_zero_passes_when_off_by_rounding_only():
    """The same weights give the same figures on any device to rounding, which is absolute for a sum
    near zero (terms of either sign cancel): a statistic of 0 off by 1e-9 is the same weights."""
    saved = {"w": (0.0, 2.0), "v": (1000.0, 5.0)}
    payload = {"model_is_full": False, "backbone_fingerprint": saved, "backbone": {"kind": "pretrained"}}
    ckpt.check_backbone_fingerprint({"w": (1e-9, 2.0), "v": (1000.0 + 1e-4, 5.0)}, payload, "ckpt")
    with pytest.raises(ValueError, match="1 of 2 tensors differ"):
        ckpt.check_backbone_fingerprint({"w": (1e-5, 2.0), "v": (1000.0, 5.0)}, payload, "ckpt")


# ---------------------------------------------------------------------------- atomic writes
def test_a_write_error_that_names_its_file_is_raised_as_it_is(tmp_path):
    """Only an OSError naming no file (a full disk) is raised again naming the target: one that names
    its file already says where it failed, and keeps that name."""
    error = PermissionError(errno.EACCES, "Permission denied", "/somewhere/else")

    def write(tmp):
        raise error

    with pytest.raises(PermissionError) as raised:
        files.atomic_write(tmp_path / "f.txt", write)
    assert raised.value is error and raised.value.filename == "/somewhere/else"
    assert os.listdir(tmp_path) == []


def test_a_temporary_name_another_writer_holds_is_never_written_over(tmp_path, monkeypatch):
    """The temporary file is created exclusively: where its random name is taken (another writer's file,
    or a link planted there), another name is drawn and the file there is left as it was."""
    names = iter(["aaaaaaaa", "bbbbbbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    other = tmp_path / ".f.txt.aaaaaaaa"
    other.write_text("another writer's")
    files.atomic_write_text(tmp_path / "f.txt", "mine")
    assert other.read_text() == "another writer's"
    assert (tmp_path / "f.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == [".f.txt.aaaaaaaa", "f.txt"]


def test_a_folder_the_file_system_cannot_sync_does_not_fail_the_write(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a folder (EINVAL): the file is written all the same."""
    fsync = os.fsync

    def no_folder_sync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return fsync(fd)

    monkeypatch.setattr(files.os, "fsync", no_folder_sync)
    files.atomic_write_text(tmp_path / "f.txt", "new")
    assert (tmp_path / "f.txt").read_text() == "new"
