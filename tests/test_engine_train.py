"""Training loop: exact resumption, atomic checkpoints, non-finite losses, bad input."""
import csv
import math
import os
import re
import signal
import warnings
from pathlib import Path

import pytest
import torch

from engine_helpers import (CLASSES, FRAMES, SIZE, FetchedItems, drawing_model, one_thread, tiny_data,  # noqa: F401
                            tiny_model, tiny_train_config, trainable)
from vitaclip import VitaCLIP
from vitaclip.demo import SyntheticActions
from vitaclip.engine import checkpoint as ckpt
from vitaclip.engine.loader import ShardedTrainLoader
from vitaclip.engine.train import lr_lambda, make_optimizer, train


def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path):
    full = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "full", precision="bf16"))
    assert full.finished and sorted(full.losses) == [1, 2, 3, 4, 5, 6]

    part = tmp_path / "part"
    first = train(tiny_model(), tiny_data(), tiny_train_config(part, precision="bf16", stop_after=3))
    assert first.step == 3 and not first.finished
    assert ckpt.latest_checkpoint(part).name == "checkpoint-00000003.pt"
    model = tiny_model(seed=123)  # other prompt init: everything trainable must come from the checkpoint
    second = train(model, tiny_data(), tiny_train_config(part, precision="bf16", resume="auto"))
    assert sorted(second.losses) == [4, 5, 6] and second.finished
    for step in (1, 2, 3):
        assert first.losses[step] == full.losses[step]
    for step in (4, 5, 6):
        assert second.losses[step] == full.losses[step], step  # bit for bit

    full_state = trainable(ckpt.load_model(tmp_path / "full"))
    for k, v in trainable(model).items():
        torch.testing.assert_close(v, full_state[k], rtol=0, atol=0, msg=k)
    with open(part / "train_log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [float(r["loss"]) for r in rows] == pytest.approx([full.losses[s] for s in range(1, 7)])


def test_resume_auto_skips_an_unreadable_latest_checkpoint_and_stale_temporary_files(tmp_path):
    full = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "full"))
    run = tmp_path / "run"
    train(tiny_model(), tiny_data(), tiny_train_config(run, stop_after=4))
    (run / "checkpoint-00000004.pt").write_bytes(b"the first bytes of a checkpoint")
    (run / ".checkpoint-00000006.pt.x1y2z3").write_bytes(b"a write killed midway")
    with pytest.warns(UserWarning, match="checkpoint-00000004.pt"):
        rest = train(tiny_model(), tiny_data(), tiny_train_config(run, resume="auto"))
    assert rest.losses == {s: full.losses[s] for s in (3, 4, 5, 6)}  # from step 2's checkpoint
    assert sorted(p.name for p in run.glob("*checkpoint*")) == sorted(
        [f"checkpoint-0000000{s}.pt" for s in (2, 4, 6)] + ["checkpoint-00000004.pt.unreadable"])  # set aside
    assert (run / "checkpoint-00000004.pt.unreadable").read_bytes() == b"the first bytes of a checkpoint"

    for path in ckpt.list_checkpoints(run):
        path.write_bytes(b"")
    with pytest.raises(ValueError, match="none of the 3 checkpoints"), pytest.warns(UserWarning):
        train(tiny_model(), tiny_data(), tiny_train_config(run, resume="auto"))
    assert len(ckpt.list_checkpoints(run)) == 3  # set aside only once an older one is read


def test_a_checkpoint_cut_off_anywhere_is_unreadable_naming_it_and_resuming_goes_back_past_it(tmp_path):
    """A write cut short (a full disk, a node lost mid-copy) can end anywhere: PyTorch's zip reader
    fails on some such cuts with OSError(EINVAL), which had passed as a disk error: no file named, and
    `--resume auto` stopped instead of going back to the older checkpoint."""
    import errno

    run = tmp_path / "run"
    train(tiny_model(), tiny_data(), tiny_train_config(run, stop_after=4))
    latest = run / "checkpoint-00000004.pt"
    whole = latest.read_bytes()
    cuts = range(0, len(whole), max(1, len(whole) // 200))
    einval_cuts = []
    for cut in cuts:
        latest.write_bytes(whole[:cut])
        try:
            torch.load(latest, weights_only=True)
        except OSError as error:
            if error.errno == errno.EINVAL:
                einval_cuts.append(cut)
        except Exception:  # noqa: BLE001 - the other ways PyTorch fails on a cut-off file
            pass
        with pytest.raises(ValueError, match=f"cannot read checkpoint {latest}"):
            ckpt.load_checkpoint(latest)
    assert einval_cuts  # (the case this is about is among the cuts)
    latest.write_bytes(whole[:einval_cuts[0]])
    with pytest.warns(UserWarning, match="checkpoint-00000004.pt"):
        rest = train(tiny_model(), tiny_data(), tiny_train_config(run, resume="auto"))
    assert rest.finished and (run / "checkpoint-00000004.pt.unreadable").exists()


def test_pruning_after_a_resume_past_an_unreadable_checkpoint_keeps_the_runs_own(tmp_path):
    """Pruning keeps the highest steps: an unreadable later checkpoint left in place outlived the
    ones the resumed run wrote, which the next resume then lacked."""
    full = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "full"))
    run = tmp_path / "run"
    train(tiny_model(), tiny_data(), tiny_train_config(run, stop_after=2, keep_checkpoints=1))
    (run / "checkpoint-00000006.pt").write_bytes(b"")
    with pytest.warns(UserWarning, match="checkpoint-00000006.pt"):
        train(tiny_model(), tiny_data(), tiny_train_config(run, resume="auto", stop_after=4, keep_checkpoints=1))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00000004.pt"]
    rest = train(tiny_model(), tiny_data(), tiny_train_config(run, resume="auto", keep_checkpoints=1))
    assert rest.losses == {s: full.losses[s] for s in (5, 6)}


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), MemoryError("Input/output error")])
def test_a_checkpoint_the_disk_fails_to_read_stops_the_resume_and_is_not_set_aside(tmp_path, monkeypatch, error):
    """A transient I/O error is not an unreadable file: resuming from an older step would lose work. Nor
    is a machine short of memory as it reads one."""
    run = tmp_path / "run"
    train(tiny_model(), tiny_data(), tiny_train_config(run, stop_after=4))
    load = torch.load

    def flaky(path, *args, **kwargs):
        if str(path).endswith("checkpoint-00000004.pt"):
            raise error
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", flaky)
    with pytest.raises(type(error), match="Input/output error"):
        train(tiny_model(), tiny_data(), tiny_train_config(run, resume="auto"))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-00000002.pt", "checkpoint-00000004.pt"]


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints_unless_told_to_overwrite(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, save_final=True))
    with pytest.raises(ValueError, match="checkpoint-00000004.pt.*resume='auto'.*overwrite=True"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2))
    with pytest.raises(ValueError, match="cannot be combined"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2, resume="auto", overwrite=True))

    model = tiny_model(seed=1)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.earlier").write_text("")  # as the earlier run's
    train(model, tiny_data(), tiny_train_config(tmp_path, steps=2, overwrite=True))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt"]
    assert not (tmp_path / "model").exists() and not (tmp_path / "tensorboard").exists()
    loaded = trainable(ckpt.load_model(tmp_path))
    for k, v in trainable(model).items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0, msg=k)


def test_evaluation_data_labelled_for_other_classes_is_refused_before_the_run(tmp_path):
    """Labels the evaluation data declares outside the model's classes were found at the first
    evaluation, steps into the run ('label 7 is outside the 4 classes'), as the training data's
    are before it."""
    class OtherClasses(SyntheticActions):
        def __init__(self):
            super().__init__(8, FRAMES, SIZE)
            self.labels = [y + 4 for y in self.labels]

    with pytest.raises(ValueError, match="evaluation data: 8 label.s. outside the 4 classes"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path), eval_data=OtherClasses())
    assert not (tmp_path / "train_log.csv").exists()


def test_evaluation_batches_that_one_evaluation_uses_up_are_refused_for_several(tmp_path):
    """A generator of batches as eval_data, evaluated every 2 of 6 steps: the first evaluation used it up
    and the second failed at step 4 as 'evaluation data is empty'. Evaluated once, it serves."""
    data = tiny_data(8)
    items = [data[i] for i in range(len(data))]
    batches = [(torch.stack([v for v, _, _ in part]), torch.tensor([y for _, y, _ in part]), [i for _, _, i in part])
               for part in (items[:4], items[4:])]
    with pytest.raises(ValueError, match="eval_data is an iterator.*eval_every=2 asks for several"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "every", eval_every=2), eval_data=iter(batches))
    assert not (tmp_path / "every").exists()
    once = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "once"), eval_data=iter(batches))
    assert list(once.evals) == [6] and once.evals[6].num_videos == 8
    several = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "list", eval_every=2), eval_data=batches)
    assert list(several.evals) == [2, 4, 6]


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_final_model_unless_told_to_overwrite(tmp_path):
    """An earlier run's folder kept without its checkpoints (deleted to save space): a fresh run,
    or resume='auto' finding none, trained afresh and replaced its final model at the end, unasked."""
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2, save_final=True))
    for path in ckpt.list_checkpoints(tmp_path):
        ckpt.remove_checkpoint(path)
    earlier = trainable(ckpt.load_model(tmp_path / "model"))
    for resume in (None, "auto"):
        with pytest.raises(ValueError, match="final model of an earlier run.*overwrite=True"):
            train(tiny_model(seed=1), tiny_data(), tiny_train_config(tmp_path, steps=2, save_final=True, resume=resume))
    kept = trainable(ckpt.load_model(tmp_path / "model"))
    assert all(torch.equal(kept[k], v) for k, v in earlier.items())
    assert ckpt.list_checkpoints(tmp_path) == []
    # a run that saves no final model leaves it be; overwrite=True deletes it
    train(tiny_model(seed=1), tiny_data(), tiny_train_config(tmp_path, steps=2))
    train(tiny_model(seed=1), tiny_data(), tiny_train_config(tmp_path, steps=2, save_final=True, overwrite=True))
    replaced = trainable(ckpt.load_model(tmp_path / "model"))
    assert not all(torch.equal(replaced[k], v) for k, v in earlier.items())


def test_resume_auto_without_checkpoint_starts_fresh_and_finished_run_is_a_no_op(tmp_path, caplog):
    config = tiny_train_config(tmp_path, steps=2, resume="auto")
    with caplog.at_level("INFO", logger="vitaclip.engine.train"):
        assert sorted(train(tiny_model(), tiny_data(), config).losses) == [1, 2]
        assert f"found no checkpoint in {tmp_path}: a fresh run starts" in caplog.text  # not silently
        caplog.clear()
        again = train(tiny_model(), tiny_data(), config)
    assert again.finished and again.losses == {} and "no checkpoint" not in caplog.text


def test_resuming_a_run_that_stopped_before_its_final_model_writes_it(tmp_path):
    model = tiny_model()
    train(model, tiny_data(), tiny_train_config(tmp_path, steps=2))  # as if killed before the final save
    assert not (tmp_path / "model").exists()
    again = train(tiny_model(seed=1), tiny_data(), tiny_train_config(tmp_path, steps=2, resume="auto",
                                                                       save_final=True))
    assert again.finished and again.losses == {}
    saved = trainable(ckpt.load_model(tmp_path / "model"))
    for k, v in trainable(model).items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0, msg=k)


def test_checkpoint_contents(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2, keep_checkpoints=1))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-00000002.pt"]
    payload = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    for key in ("model", "optimizer", "scheduler", "scaler", "step", "rng", "loader", "config", "classnames",
                "train_config"):
        assert key in payload, key
    assert payload["step"] == 2 and payload["classnames"] == list(CLASSES)
    assert set(payload["rng"][0]) >= {"python", "numpy", "torch"}
    assert payload["loader"] == [{"seed": 0, "epoch": 0, "micro_in_epoch": 2}]  # one per rank
    # a model rebuilt from the checkpoint gives the trained model's logits
    model = tiny_model()
    train(model, tiny_data(), tiny_train_config(tmp_path / "again", steps=2))
    video = torch.stack([tiny_data()[i][0] for i in range(3)])
    with torch.no_grad():
        torch.testing.assert_close(ckpt.load_model(tmp_path).eval()(video), model.eval()(video))


def test_checkpoint_without_backbone_rebuilds_it_from_its_source(tmp_path):
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    model = ckpt.load_model(tmp_path / "base")
    with torch.no_grad():  # frozen but not part of CLIP (random init): must travel with the checkpoint
        model.visual.blocks[0].cls_proj.weight.mul_(-1)
    backbone = {"kind": "pretrained", "path": str(tmp_path / "base")}
    train(model, tiny_data(), tiny_train_config(tmp_path / "run", steps=2), backbone=backbone)
    payload = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert not payload["model_is_full"]
    trained = {k for k, _ in model.named_trainable_parameters()}
    assert trained < set(payload["model"]) and "visual.blocks.0.cls_proj.weight" in payload["model"]
    assert not any(k.startswith(("textual.", "visual.blocks.0.attn", "visual.proj")) for k in payload["model"])
    rebuilt = ckpt.load_model(tmp_path / "run")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("backbone,problem", [({"kind": "pretrain", "path": "base"}, "backbone must be None"),
                                              ({"kind": "clip"}, "backbone must be None"),
                                              ("ViT-B/16", "backbone must be None"),
                                              ({"kind": "clip", "name": "ViT-B/16", "pretrained": None},
                                               "randomly initialised CLIP, which cannot be rebuilt"),
                                              ({"kind": "pretrained", "path": "missing"}, "missing does not exist")])
def test_a_backbone_source_checkpoints_cannot_be_rebuilt_from_is_refused_before_the_run(tmp_path, backbone, problem):
    """The run trained and wrote checkpoints of its prompts alone, none of which loaded: 'unknown backbone
    source', KeyError 'name', 'str' object has no attribute 'get', other frozen weights, a missing file."""
    if isinstance(backbone, dict) and "path" in backbone:
        backbone = {**backbone, "path": str(tmp_path / backbone["path"])}
    tiny_model().save_pretrained(tmp_path / "base")
    with pytest.raises((ValueError, FileNotFoundError), match=problem):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "run", steps=2), backbone=backbone)
    assert not (tmp_path / "run").exists()


def test_a_model_without_classes_is_refused_before_the_run(tmp_path):
    """A model built without class names has nothing to score a video against: refused, naming it,
    before a run folder or checkpoint is made."""
    from vitaclip.demo import demo_model_config

    with pytest.raises(ValueError, match="the model has no classes"):
        train(VitaCLIP(demo_model_config(FRAMES, SIZE)), tiny_data(), tiny_train_config(tmp_path / "run", steps=2))
    assert not (tmp_path / "run").exists()


def test_settings_given_as_paths_and_numpy_numbers_make_checkpoints_that_load(tmp_path):
    """A script's pathlib.Path output_dir or backbone path, or numpy numbers, went into the checkpoints
    as they were: none of them could be read back (weights_only: 'Unsupported global: pathlib.PosixPath',
    'numpy ... scalar'), so resume='auto' found 'none of the 1 checkpoints ... can be read'."""
    import numpy as np

    tiny_model().save_pretrained(tmp_path / "base")
    backbone = {"kind": "pretrained", "path": tmp_path / "base"}
    config = tiny_train_config(tmp_path / "run", steps=np.int64(4), lr=np.float64(1e-2), stop_after=2)
    config.output_dir = tmp_path / "run"
    train(ckpt.load_model(tmp_path / "base"), tiny_data(), config, backbone=backbone)
    payload = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"))
    assert payload["train_config"]["output_dir"] == str(tmp_path / "run")
    assert payload["backbone"]["path"] == str(tmp_path / "base")
    assert ckpt.load_model(tmp_path / "run").classnames == list(CLASSES)
    assert train(ckpt.load_model(tmp_path / "base"), tiny_data(), config, backbone=backbone, resume="auto",
                 stop_after=None).finished


def test_backbone_files_named_relative_to_the_start_folder_are_recorded_absolute(tmp_path, monkeypatch):
    """A script's backbone {'kind': 'pretrained', 'path': 'base'} was recorded as given (only the command
    line made paths absolute): its checkpoints loaded only from the folder the run started in."""
    tiny_model().save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    train(ckpt.load_model("base"), tiny_data(), tiny_train_config("run", steps=2),
          backbone={"kind": "pretrained", "path": "base"})
    monkeypatch.chdir(tmp_path / "run")
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint("."))["backbone"]["path"] == str(tmp_path / "base")
    assert ckpt.load_model(".").classnames == list(CLASSES)
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    clip = ckpt.recorded_backbone_source({"kind": "clip", "name": "ViT-B-16", "pretrained": "../weights.pt"})
    assert clip["pretrained"] == str(weights)  # a weights file; an open_clip tag stays a tag:
    assert ckpt.recorded_backbone_source({"kind": "clip", "name": "ViT-B-16", "pretrained": "openai"}) == \
        {"kind": "clip", "name": "ViT-B-16", "pretrained": "openai"}


def test_a_fresh_run_keeps_the_logs_of_an_earlier_one_that_left_no_checkpoint(tmp_path):
    """A run that stopped or crashed before its first checkpoint: the next fresh run in its folder
    replaced its train_log.csv (the record of what happened) without a word; overwrite=True still
    starts the logs over."""
    out = tmp_path / "run"
    train(tiny_model(), tiny_data(), tiny_train_config(out, steps=3))
    for path in ckpt.list_checkpoints(out):  # as a run that crashed before its first checkpoint
        ckpt.remove_checkpoint(path)
    earlier = (out / "train_log.csv").read_text()
    with pytest.warns(UserWarning, match=r"held rows of an earlier run that left no checkpoint: kept as "
                                         r"train_log.earlier-1.csv"):
        train(tiny_model(), tiny_data(), tiny_train_config(out, steps=2))
    assert (out / "train_log.earlier-1.csv").read_text() == earlier
    with open(out / "train_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]
    train(tiny_model(), tiny_data(), tiny_train_config(out, steps=2, overwrite=True))
    assert sorted(p.name for p in out.glob("train_log*")) == ["train_log.csv", "train_log.earlier-1.csv"]


def test_a_zero_shot_model_as_backbone_gets_learned_prompts(tmp_path):
    base = tiny_model()
    base.set_classes(CLASSES, templates=["a video of {}."])
    base.save_pretrained(tmp_path / "base")
    model = ckpt.build_backbone({"kind": "pretrained", "path": str(tmp_path / "base")}, CLASSES)
    assert model.zero_shot_templates is None and model.prompt_learner.ctx is not None


def test_a_zero_shot_model_scores_given_classes_with_its_templates_and_its_learned_ones_with_their_context(
        tmp_path):
    learned = tiny_model().eval()
    templates = ["a video of {}."]
    zero_shot = tiny_model().eval()
    zero_shot.set_classes(["brush hair", "cart wheel"], templates=templates)
    zero_shot.save_pretrained(tmp_path / "zs")
    video = torch.randn(1, 3, FRAMES, SIZE, SIZE)
    with torch.no_grad():
        for spelling in (["brush hair", "cart wheel"], ["brush_hair", "cart_wheel"]):
            loaded = ckpt.load_model(tmp_path / "zs", classnames=spelling).eval()
            assert loaded.zero_shot_templates == templates
            torch.testing.assert_close(loaded(video), zero_shot(video))
        other = ckpt.load_model(tmp_path / "zs", classnames=["archery", "bowling", "golf"])
        assert other.zero_shot_templates == templates and other.classnames == ["archery", "bowling", "golf"]
        own = ckpt.load_model(tmp_path / "zs", classnames=list(CLASSES)).eval()  # its learned classes
        assert own.zero_shot_templates is None
        torch.testing.assert_close(own(video), learned(video))
    for_training = ckpt.load_model(tmp_path / "zs", classnames=list(CLASSES), for_training=True)
    assert for_training.zero_shot_templates is None
    with pytest.raises(ValueError, match="scores its classes with templates"):
        train(zero_shot, tiny_data(), tiny_train_config(tmp_path / "run", steps=2))


def test_a_model_scoring_its_own_classes_with_templates_keeps_them_when_given_its_classes(tmp_path):
    model = tiny_model()
    model.set_classes(CLASSES, templates=["a video of {}."])  # its learned classes, scored zero-shot
    model.save_pretrained(tmp_path / "zs")
    assert ckpt.load_model(tmp_path / "zs", classnames=list(CLASSES)).zero_shot_templates == ["a video of {}."]


def test_training_from_a_model_with_a_class_specific_context_for_other_classes_starts_it_afresh(tmp_path):
    tiny_model().save_pretrained(tmp_path / "k")  # a context for each of CLASSES
    others = ["archery", "bowling", "golf"]
    with pytest.raises(ValueError, match="trained for 4 classes, got 3"):
        ckpt.load_model(tmp_path / "k", classnames=others)  # to score: refused
    with pytest.warns(UserWarning, match="context learned for its 4 classes, not these 3: it starts afresh"):
        model = ckpt.load_model(tmp_path / "k", classnames=others, for_training=True)
    assert model.classnames == others and model.prompt_learner.ctx.shape[0] == 3
    swapped = [CLASSES[1], CLASSES[0], *CLASSES[2:]]
    with pytest.warns(UserWarning, match="learned for 4 classes of other names or order than these: it starts "
                                         "afresh"):  # the same classes in another order: not theirs
        reordered = ckpt.load_model(tmp_path / "k", classnames=swapped, for_training=True)
    assert not torch.equal(reordered.prompt_learner.ctx, tiny_model().prompt_learner.ctx)
    own = ckpt.load_model(tmp_path / "k", classnames=list(CLASSES), for_training=True)
    assert torch.equal(own.prompt_learner.ctx, tiny_model().prompt_learner.ctx)


def test_a_run_started_from_the_authors_file_of_other_classes_reloads_with_its_own_context(tmp_path):
    state = {f"module.{k}": v for k, v in tiny_model().state_dict().items()}  # the authors' layout, 4 classes
    torch.save({"model": state}, tmp_path / "authors.pth")
    others = ["archery", "bowling", "golf", "hurling", "judo"]  # the tiny data's labels are 0-3
    with pytest.warns(UserWarning, match="starts afresh"):
        model = ckpt.load_model(tmp_path / "authors.pth", others, for_training=True, heads=2, text_heads=2)
    train(model, tiny_data(), tiny_train_config(tmp_path / "run", steps=2),
          backbone={"kind": "official", "path": str(tmp_path / "authors.pth")})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checkpoint's context replaces the fresh one: no news
        reloaded = ckpt.load_model(tmp_path / "run")
    assert reloaded.classnames == others
    assert torch.equal(reloaded.prompt_learner.ctx, model.prompt_learner.ctx)


def test_a_model_without_learned_prompts_scores_no_classes_without_templates(tmp_path):
    from engine_helpers import demo_model_config

    VitaCLIP(demo_model_config(FRAMES, SIZE)).save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="has no learned text prompts"):
        ckpt.load_model(tmp_path / "bare", classnames=list(CLASSES))
    assert ckpt.load_model(tmp_path / "bare", classnames=list(CLASSES), for_training=True).classnames == list(CLASSES)


class DescribedData(type(tiny_data())):
    """tiny_data() that describes itself as a VideoLoader does."""

    def description(self):
        return {"videos": len(self), "stride": 3}


def test_a_trained_model_keeps_what_it_was_trained_on_for_scoring_to_sample_as_training_did(tmp_path):
    from vitaclip.data.sampling import DEFAULT_STRIDE, trained_stride

    model = tiny_model()
    data = DescribedData(32, FRAMES, SIZE, seed=0)
    train(model, data, tiny_train_config(tmp_path, steps=2, save_final=True))
    assert model.training_data == {"videos": 32, "stride": 3}
    for loaded in (ckpt.load_model(tmp_path / "model"), ckpt.load_model(tmp_path)):  # saved model, checkpoint
        assert trained_stride(loaded.training_data) == 3
    assert trained_stride(tiny_model().training_data) == DEFAULT_STRIDE
    untrained = tiny_model()
    untrained.save_pretrained(tmp_path / "model")  # saved over: the other model's record goes
    assert ckpt.load_model(tmp_path / "model").training_data is None


def test_failed_checkpoint_write_leaves_previous_intact(tmp_path, monkeypatch):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, stop_after=2, checkpoint_every=2))
    before = (tmp_path / "checkpoint-00000002.pt").read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, checkpoint_every=2, resume="auto"))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-00000002.pt", "eval_log.csv", "train.lock", "train_log.csv"]
    assert (tmp_path / "checkpoint-00000002.pt").read_bytes() == before
    assert ckpt.load_checkpoint(tmp_path / "checkpoint-00000002.pt")["step"] == 2


class NaNAt:
    """Data whose item `bad` is all NaN."""

    def __init__(self, data, bad):
        self.data, self.bad, self.labels = data, bad, data.labels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.get(i, None)

    def get(self, i, rng):
        video, label, vid = self.data.get(i, rng)
        return (video * float("nan") if i == self.bad else video), label, vid


@pytest.mark.parametrize("default", ["fork", "forkserver"])
def test_loader_workers_of_a_fork_server_default_are_the_packages(monkeypatch, default):
    """From Python 3.14 the fork server is Linux's default start method: a DataLoader starting it
    itself left it unshielded from the job's stop signals (a SIGTERM ended it and the rank's workers).
    The package's (preloaded, shielded) one serves the training and evaluation workers instead."""
    import multiprocessing

    from vitaclip.engine import loader as engine_loader
    from vitaclip.engine import stopping

    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: default)
    contexts = []

    class Recorded(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            contexts.append(kwargs.get("multiprocessing_context"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(engine_loader, "DataLoader", Recorded)
    data = tiny_data(8)
    by_workers = next(iter(ShardedTrainLoader(data, 4, 2, num_workers=1)))
    alone = next(iter(ShardedTrainLoader(data, 4, 2)))
    evaluated = next(iter(engine_loader.eval_batches(data, 2, num_workers=1)))
    assert torch.equal(by_workers[0], alone[0]) and torch.equal(by_workers[1], alone[1])
    assert torch.equal(evaluated[0], next(iter(engine_loader.eval_batches(data, 2)))[0])
    if default == "fork":
        assert contexts == [None, None, None, None]
    else:
        from multiprocessing import forkserver

        assert [c and c.get_start_method() for c in contexts] == ["forkserver", None, "forkserver", None]
        assert forkserver._forkserver._forkserver_pid == stopping._fork_server_pid[0]  # started by the package


def test_loader_workers_get_a_seed_of_their_rank_and_epoch_not_of_the_process_stream():
    from engine_helpers import WorkerSeeds

    def worker_seeds(rank, epoch):
        loader = ShardedTrainLoader(WorkerSeeds(), 4, 2, rank=rank, world_size=2, num_workers=1)
        loader.load_state_dict({"seed": 0, "epoch": epoch, "micro_in_epoch": 0})
        torch.manual_seed(rank)  # the process's stream, which must not matter
        return int(next(iter(loader))[2][0])

    seeds = {(rank, epoch): worker_seeds(rank, epoch) for rank in (0, 1) for epoch in (0, 1)}
    assert len(set(seeds.values())) == 4  # each rank's workers, each epoch, a stream of their own
    torch.manual_seed(123)
    assert worker_seeds(0, 1) == seeds[0, 1]


def item_of_step(data, step):
    for s, (_, _, ids) in enumerate(ShardedTrainLoader(data, 4, 4), start=1):
        if s == step:
            return ids.tolist()[0]


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tmp_path):
    bad_step = 3
    data = NaNAt(tiny_data(), bad=item_of_step(tiny_data(), bad_step))
    with pytest.raises(FloatingPointError, match=f"at step {bad_step}"):
        train(tiny_model(), data, tiny_train_config(tmp_path / "stop", steps=8))
    # nothing after the last checkpoint before the bad step was written
    assert all(int(p.stem.split("-")[1]) < bad_step for p in ckpt.list_checkpoints(tmp_path / "stop"))

    model = tiny_model()
    result = train(model, data, tiny_train_config(tmp_path / "skip", steps=8, on_nonfinite="skip"))
    assert result.finished and not torch.isfinite(torch.tensor(result.losses[bad_step]))
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())
    with open(tmp_path / "skip" / "train_log.csv") as f:
        skipped = [int(r["step"]) for r in csv.DictReader(f) if r["skipped"] == "1"]
    assert skipped == [bad_step]


def test_nonfinite_gradients_of_a_finite_loss_stop_or_are_skipped(tmp_path):
    bad_step = 3

    def poisoned(model):
        """The context's gradient is NaN at `bad_step` (one backward per step: no accumulation)."""
        backwards = iter(range(1, 100))
        model.prompt_learner.ctx.register_hook(lambda g: g * float("nan") if next(backwards) == bad_step else g)
        return model

    with pytest.raises(FloatingPointError, match=f"non-finite gradient norm nan at step {bad_step}"):
        train(poisoned(tiny_model()), tiny_data(), tiny_train_config(tmp_path / "stop"))
    model = poisoned(tiny_model())
    result = train(model, tiny_data(), tiny_train_config(tmp_path / "skip", on_nonfinite="skip"))
    assert result.finished and all(map(math.isfinite, result.losses.values()))
    assert all(torch.isfinite(p).all() for p in model.trainable_parameters())
    with open(tmp_path / "skip" / "train_log.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r["skipped"] == "1"] == [bad_step]


def test_resume_with_other_classes_is_refused(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2))
    other = tiny_model(classes=["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError, match="4 classes"):
        train(other, tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto"))
    with pytest.raises(ValueError, match="trained for 4 classes"):
        ckpt.load_model(tmp_path, classnames=["a", "b", "c", "d", "e"])


def test_resume_with_another_micro_batch_goes_on_from_the_same_data_only_as_a_change(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, stop_after=2))
    with pytest.raises(ValueError, match=r"micro_batch_size: 4 -> 2\).*--resume-with-changes"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto", micro_batch_size=2))
    with pytest.raises(ValueError, match="global batch of 4, this run's is 8"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto", batch_size=8,
                                                           resume_with_changes=True))
    resumed, straight = FetchedItems(), FetchedItems()
    with pytest.warns(UserWarning, match="micro_batch_size: 4 -> 2"):
        train(tiny_model(), resumed, tiny_train_config(tmp_path, steps=4, resume="auto", micro_batch_size=2,
                                                       resume_with_changes=True))
    train(tiny_model(), straight, tiny_train_config(tmp_path / "straight", steps=4))
    assert len(straight.fetched) == 16 and resumed.fetched == straight.fetched[8:]


def test_resume_with_other_optimisation_settings_is_refused_naming_them_or_goes_on_with_them(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=6, stop_after=3))
    changed = dict(steps=8, lr=1e-3, weight_decay=0.5, grad_clip=1.0)
    with pytest.raises(ValueError, match=r"steps: 6 -> 8; lr: 0.01 -> 0.001; weight_decay: 0.05 -> 0.5; "
                                         r"grad_clip: None -> 1.0\).*--resume-with-changes"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume="auto", **changed))
    with pytest.warns(UserWarning, match="with changed settings, from its step 3 on: steps: 6 -> 8"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume="auto", resume_with_changes=True,
                                                           stop_after=4, **changed))
    new_schedule = lr_lambda(tiny_train_config(tmp_path, **changed))
    with open(tmp_path / "train_log.csv") as f:
        lrs = {int(row["step"]): float(row["lr"]) for row in csv.DictReader(f)}
    assert lrs[1] == pytest.approx(1e-2 * 0.5)  # before the resume: the first run's warmup
    # the first step after the resume is on the new schedule (past the warmup, so a step behind would show)
    assert lrs[4] == pytest.approx(1e-3 * new_schedule(3), rel=1e-9)
    groups = ckpt.load_checkpoint(tmp_path / "checkpoint-00000004.pt")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.5]
    # the checkpoint written since holds the new settings: resuming it with them is no change
    result = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume="auto", **changed))
    assert result.finished and result.step == 8


@pytest.mark.parametrize("on,rest_decay", [("all", 0.05), ("matrices", 0.0)])
def test_weight_decay_reaches_the_tensors_asked(tmp_path, on, rest_decay):
    """The authors' AdamW decays every trainable tensor; "matrices" spares vectors and scalars."""
    model = tiny_model()
    matrices, rest = make_optimizer(model, tiny_train_config(tmp_path, weight_decay_on=on)).param_groups
    names = {id(p): name for name, p in model.named_trainable_parameters()}
    assert all(p.dim() >= 2 for p in matrices["params"]) and all(p.dim() < 2 for p in rest["params"])
    assert "logit_scale" in {names[id(p)] for p in rest["params"]}
    assert len(matrices["params"]) + len(rest["params"]) == len(names)
    assert matrices["weight_decay"] == 0.05 and rest["weight_decay"] == rest_decay


def test_a_checkpoint_from_before_weight_decay_on_resumes_as_decaying_matrices_only(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, stop_after=2))
    path = ckpt.latest_checkpoint(tmp_path)
    payload = torch.load(path, weights_only=False)
    del payload["train_config"]["weight_decay_on"]  # as written before it was a setting
    torch.save(payload, path)
    with pytest.raises(ValueError, match="weight_decay_on: 'matrices' -> 'all'"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto"))
    assert train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto",
                                                              weight_decay_on="matrices")).finished


def test_resume_with_other_training_data_is_refused_or_goes_on_with_it(tmp_path):
    train(tiny_model(), tiny_data(32), tiny_train_config(tmp_path, steps=4, stop_after=2))
    with pytest.raises(ValueError, match="training data videos: 32 -> 36"):
        train(tiny_model(), tiny_data(36), tiny_train_config(tmp_path, steps=4, resume="auto"))
    with pytest.warns(UserWarning, match="training data videos: 32 -> 36"):
        result = train(tiny_model(), tiny_data(36), tiny_train_config(tmp_path, steps=4, resume="auto",
                                                                      resume_with_changes=True))
    assert result.finished


def test_a_run_resumed_mid_epoch_over_another_list_says_its_epoch_is_drawn_anew(tmp_path):
    """Another list shuffles to another order: the rest of the epoch at the same position may repeat
    videos and miss others, said in the warning; at an epoch's start, or over the same list, there is
    nothing to say."""
    from vitaclip.engine.train import reshuffled_epoch_note

    train(tiny_model(), tiny_data(32), tiny_train_config(tmp_path, steps=4, stop_after=2))
    with pytest.warns(UserWarning, match="training data videos: 32 -> 36 \\(the rest of epoch 0 comes from the new "
                                         "list's order at the same position: until epoch 1 some videos may come "
                                         "twice and others not at all\\)"):
        train(tiny_model(), tiny_data(36), tiny_train_config(tmp_path, steps=4, resume="auto", resume_with_changes=True))
    saved = {"train_data": {"videos": 32, "list": "ab", "frames": 8}}
    for loader, data, said in (({"epoch": 1, "batch_in_epoch": 0}, {"videos": 36, "list": "cd"}, False),
                               ([{"epoch": 1, "micro_in_epoch": 3}], {"videos": 32, "list": "ab", "frames": 4}, False),
                               ([{"epoch": 1, "micro_in_epoch": 3}], {"videos": 32, "list": "cd"}, True)):
        assert bool(reshuffled_epoch_note({**saved, "loader": loader}, data)) == said

def test_a_key_the_checkpoints_data_description_lacks_is_no_change():
    import dataclasses

    from vitaclip.engine.train import run_changes

    config = tiny_train_config("out")
    payload = {"train_config": dataclasses.asdict(config), "train_data": {"videos": 32, "stride": 4}}
    assert run_changes(payload, config, {"videos": 32, "stride": 4, "min_frames": 1}) == []  # added since
    assert run_changes(payload, config, {"videos": 30, "stride": 4}) == ["training data videos: 32 -> 30"]
    assert run_changes({"train_config": dataclasses.asdict(config)}, config, {"videos": 30}) == []  # older


def test_resuming_past_the_runs_steps_is_refused_even_with_changes(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=6, stop_after=4))
    with pytest.raises(ValueError, match="at step 4, past this run's 3 steps"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=3, resume="auto", resume_with_changes=True))


def test_resume_with_changes_needs_a_resume():
    with pytest.raises(ValueError, match="give resume too"):
        tiny_train_config("out", resume_with_changes=True).validate()


def test_class_specific_contexts_refuse_reordered_or_renamed_classes(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2))
    swapped = [CLASSES[0], CLASSES[2], CLASSES[1], *CLASSES[3:]]
    with pytest.raises(ValueError, match=f"class 1 is '{CLASSES[2]}' here and '{CLASSES[1]}' there"):
        ckpt.load_model(tmp_path, classnames=swapped)
    with pytest.raises(ValueError, match="class 3 is 'other' here"):
        ckpt.load_model(tmp_path, classnames=[*CLASSES[:3], "other"])
    assert ckpt.load_model(tmp_path, classnames=[n.replace(" ", "_") for n in CLASSES]).classnames == list(CLASSES)


def test_a_model_whose_requires_grad_was_changed_wholesale_is_refused_naming_freeze(tmp_path):
    """After model.requires_grad_(True) the backbone's gradients were computed and never applied; after
    requires_grad_(False) autograd failed with 'element 0 of tensors does not require grad'."""
    for requires_grad, problem in ((True, "others require gradients"), (False, "none of the model's trainable")):
        model = tiny_model().requires_grad_(requires_grad)
        with pytest.raises(ValueError, match=f"{problem}.*model.freeze()"):
            train(model, tiny_data(), tiny_train_config(tmp_path / str(requires_grad)))
        assert not (tmp_path / str(requires_grad)).exists()
        model.freeze()
        assert train(model, tiny_data(), tiny_train_config(tmp_path / str(requires_grad), steps=1,
                                                           warmup_steps=0)).finished
    # a part of the trainable set frozen by hand stays frozen, the rest trains
    model = tiny_model()
    model.prompt_learner.ctx.requires_grad_(False)
    before = trainable(model)
    train(model, tiny_data(), tiny_train_config(tmp_path / "part", steps=1, warmup_steps=0))
    after = trainable(model)
    assert torch.equal(after["prompt_learner.ctx"], before["prompt_learner.ctx"])
    assert not torch.equal(after["visual.time_embed"], before["visual.time_embed"])


def test_bad_input_fails_before_training(tmp_path):
    data = tiny_data()
    data.labels[3] = 7
    with pytest.raises(ValueError, match="label 7"):
        train(tiny_model(), data, tiny_train_config(tmp_path / "labels"))
    assert not (tmp_path / "labels").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "x", resume=str(tmp_path / "nope.pt")))
    (tmp_path / "run").mkdir()  # a run folder or saved model exists: not "does not exist"
    with pytest.raises(ValueError, match=r"run, is a folder: give a checkpoint file in it, resume='auto'"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "x", resume=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        train(tiny_model(), tiny_data(3), tiny_train_config(tmp_path / "small"))
    with pytest.raises(ValueError, match="cannot be split"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "split", micro_batch_size=3))
    with pytest.raises(ValueError, match="precision"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "p", precision="fp8"))
    with pytest.raises(FileNotFoundError):
        ckpt.load_model(tmp_path / "missing")


@pytest.mark.parametrize("capability,refused", [((7, 0), True), ((7, 5), True), ((8, 0), False), ((9, 0), False)])
def test_bf16_on_a_gpu_without_bfloat16_arithmetic_is_named(monkeypatch, capability, refused):
    import warnings

    from vitaclip.engine.precision import autocast

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    gpu = torch.device("cuda", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autocast's "CUDA is not available" on this machine
        autocast(gpu, "fp16")
        if refused:
            with pytest.raises(ValueError, match=r"bf16 needs .*V100-SXM2-32GB has 7\.\d: use fp16"):
                autocast(gpu, "bf16")
        else:
            autocast(gpu, "bf16")


def test_labels_outside_the_classes_in_a_batch_are_named(tmp_path):
    class Unlabelled:  # no `labels` to check up front: caught at the first batch
        def __init__(self):
            self.data = tiny_data()

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            video, label, vid = self.data[i]
            return video, 9, vid

    with pytest.raises(ValueError, match="label 9 of video"):
        train(tiny_model(), Unlabelled(), tiny_train_config(tmp_path))


def test_schedule_warmup_then_cosine():
    f = lr_lambda(tiny_train_config("x", steps=10, warmup_steps=2, lr=1.0, min_lr=0.1))
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(10) == pytest.approx(0.1)
    assert f(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 2 / 8)))  # cosine, not linear
    g = lr_lambda(tiny_train_config("x", steps=10, warmup_steps=0, lr=4e-4, min_lr=4e-5))
    assert g(10) == pytest.approx(0.1)  # the factor that ends at min_lr itself


def test_gradients_are_clipped_to_the_max_norm_and_the_norm_before_is_returned():
    import torch.nn.functional as F

    from vitaclip.engine.train import clip_gradients

    model = tiny_model()
    video, label, _ = tiny_data(2)[0]
    F.cross_entropy(model(video[None]), torch.tensor([label])).backward()
    grads = [p.grad for p in model.trainable_parameters() if p.grad is not None]
    before = torch.nn.utils.get_total_norm(grads).item()
    assert before > 1e-2
    assert clip_gradients(model, 1e-3) == pytest.approx(before, rel=1e-5)
    assert torch.nn.utils.get_total_norm(grads).item() == pytest.approx(1e-3, rel=1e-3)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    # a large Adam eps: some gradients are exactly zero in theory (e.g. key biases) and float noise
    # in practice, which plain Adam would blow up to full-size steps
    one = tiny_model()
    train(one, tiny_data(), tiny_train_config(tmp_path / "a", steps=3, adam_eps=1e-2))
    accum = tiny_model()
    train(accum, tiny_data(), tiny_train_config(tmp_path / "b", steps=3, adam_eps=1e-2, micro_batch_size=1))
    for k, v in trainable(one).items():
        torch.testing.assert_close(trainable(accum)[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_fp16_with_grad_scaler_resumes_exactly(tmp_path):
    full = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "full", steps=3, precision="fp16"))
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "part", steps=3, precision="fp16", stop_after=2))
    scaler = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "part"))["scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] == 2
    rest = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "part", steps=3, precision="fp16",
                                                              resume="auto"))
    assert rest.losses == {3: full.losses[3]}


def test_a_global_batch_that_does_not_divide_among_the_processes_is_named_so(tmp_path, monkeypatch):
    from vitaclip.engine import train as train_module
    from vitaclip.engine.distributed import DistEnv

    monkeypatch.setattr(train_module, "init_distributed",
                        lambda device=None: DistEnv(0, 2, 0, torch.device("cpu")))  # rank 0 of 2
    with pytest.raises(ValueError, match="global batch 7 does not divide among 2 processes: give a multiple of 2"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, batch_size=7))


def test_a_step_the_fp16_loss_scaler_skips_is_logged_as_skipped(tmp_path, monkeypatch):
    from vitaclip.engine import train as train_module

    # a scale so large that the first step's gradients overflow: the scaler skips it and lowers the scale
    monkeypatch.setattr(train_module, "grad_scaler", lambda device, precision: torch.amp.GradScaler(
        device.type, init_scale=2.0 ** 120, backoff_factor=2.0 ** -112))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2, precision="fp16"))
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    with open(tmp_path / "train_log.csv") as f:
        assert [row["skipped"] for row in csv.DictReader(f)] == ["1", "0"]


def test_resume_in_another_precision_starts_a_fresh_loss_scaler(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, stop_after=2, precision="bf16"))
    with pytest.warns(UserWarning, match="trained in bf16 resumes in fp16: the fp16 loss scaler starts afresh"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, stop_after=3, precision="fp16",
                                                           resume="auto"))
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["scaler"]["_growth_tracker"] == 1
    with pytest.warns(UserWarning, match="trained in fp16 resumes in bf16$"):
        assert train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, precision="bf16",
                                                                  resume="auto")).finished


def test_rng_states_keep_this_process_device_only(monkeypatch):
    """A checkpoint holds the CUDA generator of the process's own device, so that a resume which
    sees other devices (one per task under SLURM, all of a node's under torchrun) restores it."""
    from vitaclip.engine.loader import rng_states, set_rng_states

    generators = {0: torch.tensor([1], dtype=torch.uint8), 1: torch.tensor([2], dtype=torch.uint8)}
    device = {"current": 1}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: generators[device["current"]].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: generators.__setitem__(device["current"], s.clone()))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saved every device's generator"))
    state = rng_states()
    assert torch.equal(state["cuda"], torch.tensor([2], dtype=torch.uint8))
    generators[1] = torch.tensor([9], dtype=torch.uint8)
    device["current"] = 0  # resumed on a machine where the process's device is the first one
    set_rng_states(state)
    assert torch.equal(generators[0], torch.tensor([2], dtype=torch.uint8))


def test_a_stop_signal_ends_the_run_after_its_step_checkpointed_and_resuming_finishes_it(tmp_path):
    from engine_helpers import SignallingData
    seen = []

    def record(signum, frame):
        seen.append(signum)

    previous = signal.signal(signal.SIGUSR1, record)
    try:
        # items 5-8 make step 2 (4 clips a step): a signal at item 6, a second one at item 7
        data = SignallingData(signal.SIGUSR1, at=(6, 7))
        cut = train(tiny_model(), data, tiny_train_config(tmp_path / "run", checkpoint_every=4))
        # the first signal stopped the run; the second, milliseconds later, was the same stop
        assert seen == []
        assert signal.getsignal(signal.SIGUSR1) is record
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert cut.stopped_by == "SIGUSR1" and cut.step == 2 and not cut.finished
    assert cut.last_checkpoint is not None and ckpt.list_checkpoints(tmp_path / "run")[-1] == Path(cut.last_checkpoint)
    rest = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "run", checkpoint_every=4, resume="auto"))
    full = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "full", checkpoint_every=4))
    assert rest.finished and rest.stopped_by is None
    assert rest.losses == {s: full.losses[s] for s in (3, 4, 5, 6)}


def test_a_signal_not_asked_for_is_left_alone(tmp_path):
    from engine_helpers import SignallingData
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        result = train(tiny_model(), SignallingData(signal.SIGUSR1, at=(6,)),
                       tiny_train_config(tmp_path, steps=3, stop_signals=("SIGTERM",)))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert seen == [signal.SIGUSR1] and result.finished and result.stopped_by is None
    with pytest.raises(ValueError, match="unknown signal 'SIGNOPE'"):
        tiny_train_config(tmp_path, stop_signals=("SIGNOPE",)).validate()


def test_every_evaluation_comes_after_its_steps_checkpoint_marked_pending_until_it_ends(tmp_path, monkeypatch):
    """An evaluation can take minutes and a stop signalled during it gets seconds: the step's
    checkpoint must not wait for it, even where none is due (checkpoint_every 3, eval_every 2)."""
    from vitaclip.engine import train as train_module

    evaluate_and_log = train_module.evaluate_and_log
    on_disk = {}

    def recording(model, eval_data, eval_config, env, log, step, result, stop):
        on_disk[step] = [(p.name, ckpt.evaluation_pending(p, ckpt.load_checkpoint(p)))
                         for p in ckpt.list_checkpoints(tmp_path)]
        evaluate_and_log(model, eval_data, eval_config, env, log, step, result, stop)

    monkeypatch.setattr(train_module, "evaluate_and_log", recording)
    result = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, eval_every=2, checkpoint_every=3),
                   eval_data=tiny_data(8))
    assert on_disk == {2: [("checkpoint-00000002.pt", True)],
                       4: [("checkpoint-00000002.pt", False), ("checkpoint-00000003.pt", False),
                           ("checkpoint-00000004.pt", True)]}
    assert list(result.evals) == [2, 4]
    assert not any(ckpt.evaluation_pending(p, ckpt.load_checkpoint(p)) for p in ckpt.list_checkpoints(tmp_path))


def test_an_ended_evaluation_marks_its_checkpoint_beside_it_instead_of_writing_it_again(tmp_path, monkeypatch):
    """A checkpoint holds the optimizer's state (hundreds of MB for ViT-B/16): the end of its step's
    evaluation is a marker of a few bytes beside it. Pruning and --overwrite remove markers with
    their checkpoints."""
    from vitaclip.engine import train as train_module

    writes = []
    save_checkpoint = ckpt.save_checkpoint
    monkeypatch.setattr(train_module.ckpt, "save_checkpoint",
                        lambda directory, step, payload, keep=0: writes.append(step) or save_checkpoint(
                            directory, step, payload, keep))
    result = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, eval_every=2, checkpoint_every=100,
                                                                keep_checkpoints=1), eval_data=tiny_data(8))
    assert writes == [2, 4] and list(result.evals) == [2, 4]
    (last,) = ckpt.list_checkpoints(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [last.name, last.name + ".evaluated"]
    assert not ckpt.evaluation_pending(last, ckpt.load_checkpoint(last))
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=1, warmup_steps=0, overwrite=True))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-00000001.pt"]


def test_a_checkpoint_is_pending_until_a_marker_of_its_own_write_says_its_evaluation_ended(tmp_path):
    """The marker names the write it marks: one left by an earlier write of the same step (a resumed run
    that went back past it) does not mark the new one. Checkpoints of earlier versions kept the state in
    their own key."""
    pending = dict(step=2, evaluation_pending=True, write_id="first")
    path = ckpt.save_checkpoint(tmp_path, 2, pending)
    assert ckpt.evaluation_pending(path, ckpt.load_checkpoint(path))
    from importlib.metadata import version

    assert ckpt.load_checkpoint(path)["vitaclip_version"] == version("vitaclip")  # which release wrote it
    ckpt.mark_evaluated(path, "first")
    assert not ckpt.evaluation_pending(path, ckpt.load_checkpoint(path))
    ckpt.save_checkpoint(tmp_path, 2, {**pending, "write_id": "second"})
    assert ckpt.evaluation_pending(path, ckpt.load_checkpoint(path))
    assert ckpt.evaluation_pending(path, {"step": 2, "final_evaluation_pending": True})
    assert not ckpt.evaluation_pending(path, {"step": 2, "evaluation_pending": False, "write_id": "first"})
    assert not ckpt.evaluation_pending(path, {"step": 2})  # from before evaluations were marked


def test_a_checkpoint_that_cannot_be_written_is_named_with_the_systems_reason(tmp_path):
    """A full disk or a quota (here a file size limit) while writing a checkpoint: torch's writer says
    'unexpected pos' only; the command line shows an OSError as an error naming the file."""
    import resource
    import subprocess
    import sys

    code = ("import sys, torch; from vitaclip.engine import checkpoint as ckpt\n"
            "try:\n    ckpt.save_checkpoint(sys.argv[1], 1, {'weights': torch.zeros(1_000_000)})\n"
            "except OSError as err:\n    print(err.errno, err)")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, preexec_fn=limit)
    assert run.stdout.strip() == f"27 [Errno 27] File too large: writing checkpoint {tmp_path / 'checkpoint-00000001.pt'}", \
        run.stderr
    assert list(tmp_path.iterdir()) == []  # nor half a file


def test_evaluations_leave_the_training_runs_random_draws_as_they_were(tmp_path):
    """An evaluation drawing from the process's RNG (here the model's forward, as a user's loader or
    dropout would) changes nothing in training: the checkpoint written before it holds the states
    training goes on from, also once the evaluation is marked done."""
    runs = {}
    for name, evaluation in (("without", {}), ("with", dict(eval_every=2))):
        draws = []
        result = train(drawing_model(draws), tiny_data(), tiny_train_config(tmp_path / name, steps=4, **evaluation),
                       eval_data=tiny_data(8) if evaluation else None)
        runs[name] = (draws, result.losses)
    assert runs["with"] == runs["without"] and runs["with"][0]


def test_a_stop_signal_in_the_last_step_checkpoints_before_the_final_evaluation_which_resuming_does(tmp_path):
    from engine_helpers import SignallingData
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # were the handler missing, the test goes on
    try:
        with pytest.warns(UserWarning, match="step 3: evaluation skipped.*resuming the run evaluates it"):
            # items 9-12 make step 3, the last
            cut = train(tiny_model(), SignallingData(signal.SIGUSR1, at=(10,)),
                        tiny_train_config(tmp_path, steps=3, save_final=True), eval_data=tiny_data(8))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert cut.stopped_by == "SIGUSR1" and cut.step == 3 and not cut.finished and cut.evals == {}
    latest = ckpt.latest_checkpoint(tmp_path)
    assert ckpt.evaluation_pending(latest, ckpt.load_checkpoint(latest)) is True
    assert not (tmp_path / "model").exists()
    rest = train(tiny_model(seed=1), tiny_data(), tiny_train_config(tmp_path, steps=3, save_final=True, resume="auto"),
                 eval_data=tiny_data(8))
    assert rest.finished and rest.losses == {} and list(rest.evals) == [3]
    with open(tmp_path / "eval_log.csv", newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["3"]
    assert (tmp_path / "model").is_dir()
    again = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=3, resume="auto"), eval_data=tiny_data(8))
    assert again.finished and again.evals == {}  # a finished run is not evaluated again
    # without an evaluation to come, a stop in the last step changes nothing: the run finishes
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        done = train(tiny_model(), SignallingData(signal.SIGUSR1, at=(10,)),
                     tiny_train_config(tmp_path / "no-eval", steps=3, save_final=True))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert done.finished and done.stopped_by is None and (tmp_path / "no-eval" / "model").is_dir()


def test_a_stop_signal_during_an_evaluation_ends_it_and_resuming_evaluates_first(tmp_path):
    """The step's checkpoint is on disk, marked pending, when its evaluation starts: a stop signal
    during the evaluation ends it at the next batch (a real one takes minutes, a stop gets seconds),
    and so during a resumed run's pending evaluation; resuming then evaluates it and goes on as an
    uninterrupted run does."""
    from engine_helpers import SignallingData
    config = dict(steps=4, eval_every=2, checkpoint_every=100, eval_batch_size=3)
    full = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "full", **config), eval_data=tiny_data(8))
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # were the handler missing, the test goes on
    try:
        for resume in (None, "auto"):  # the step 2 evaluation, then the same again as the resumed run's first
            with pytest.warns(UserWarning, match="step 2: evaluation stopped.*resuming the run evaluates it"):
                cut = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume=resume, **config),
                            eval_data=SignallingData(signal.SIGUSR1, at=(5,), n=8))  # in its second batch
            assert cut.stopped_by == "SIGUSR1" and cut.step == 2 and cut.evals == {} and not cut.finished
            assert [(p.name, ckpt.evaluation_pending(p, ckpt.load_checkpoint(p)))
                    for p in ckpt.list_checkpoints(tmp_path)] == [("checkpoint-00000002.pt", True)]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    rest = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume="auto", **config), eval_data=tiny_data(8))
    assert rest.finished and rest.losses == {s: full.losses[s] for s in (3, 4)}
    assert {s: r.to_dict() for s, r in rest.evals.items()} == {s: r.to_dict() for s, r in full.evals.items()}
    with open(tmp_path / "eval_log.csv", newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["2", "4"]


def test_resuming_from_a_checkpoint_marked_evaluated_does_not_evaluate_its_step_again(tmp_path):
    """The checkpoint holds evaluation_pending as written, before its evaluation: the marker beside it,
    read when resuming, says the evaluation ended (an evaluation can take minutes)."""
    config = dict(steps=4, eval_every=2, eval_batch_size=3)
    first = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, stop_after=2, **config),
                  eval_data=tiny_data(8))
    assert list(first.evals) == [2] and ckpt.evaluated_marker(ckpt.latest_checkpoint(tmp_path)).exists()
    rest = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume="auto", **config),
                 eval_data=tiny_data(8))
    assert rest.finished and list(rest.evals) == [4]


def test_an_evaluation_made_again_on_resuming_is_logged_once(tmp_path):
    """A run that died after logging an evaluation, before its checkpoint was marked done: resuming
    evaluates that step again, and its earlier row goes."""
    config = dict(steps=4, eval_every=2, eval_batch_size=3)
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, **config), eval_data=tiny_data(8))
    ckpt.evaluated_marker(ckpt.latest_checkpoint(tmp_path)).unlink()  # as it stood while step 4 was evaluated
    rest = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, resume="auto", **config),
                 eval_data=tiny_data(8))
    assert rest.finished and list(rest.evals) == [4]
    with open(tmp_path / "eval_log.csv", newline="") as f:
        assert [row["step"] for row in csv.DictReader(f)] == ["2", "4"]


@pytest.mark.parametrize("setting,problem", [(dict(stop_signals=("SIGKILL",)), "SIGKILL cannot be caught"),
                                             (dict(stop_signals=("STOP",)), "SIGSTOP cannot be caught"),
                                             (dict(eval_every=-2), "eval_every must be >= 0"),
                                             (dict(keep_checkpoints=-1), "keep_checkpoints must be >= 0"),
                                             # these failed mid-run naming nothing ('float' object cannot be
                                             # interpreted as an integer, '<' not supported between 'str' and
                                             # 'int', range() arg 3 must not be zero after the last step)
                                             (dict(steps=6.0), "steps must be an integer"),
                                             (dict(batch_size="4"), "batch_size must be an integer"),
                                             (dict(keep_checkpoints=1.5), "keep_checkpoints must be an integer"),
                                             (dict(eval_batch_size=0), "eval_batch_size must be >= 1"),
                                             (dict(seed=-1), "seed must be >= 0"),
                                             (dict(lr="1e-3"), "lr must be a finite number"),
                                             (dict(stop_signals="SIGTERM"), "stop_signals must be a tuple"),
                                             (dict(output_dir=None), "output_dir must be a folder's path"),
                                             (dict(resume=True), "resume must be 'auto' or a checkpoint's path"),
                                             (dict(betas=0.9), r"betas must be a pair of numbers in \[0, 1\)"),
                                             # and these were taken: evaluations at step 5 only, no step and
                                             # no checkpoint, a run into the current folder, an earlier run's
                                             # checkpoints deleted, no update at all, or updates turned around
                                             (dict(eval_every=2.5), "eval_every must be an integer"),
                                             (dict(warmup_steps=True), "warmup_steps must be an integer"),
                                             (dict(stop_after=0), "stop_after must be >= 1"),
                                             (dict(output_dir=""), "output_dir must be a folder's path"),
                                             (dict(overwrite="False"), "overwrite must be True or False"),
                                             (dict(lr=0.0), "lr must be > 0"),
                                             (dict(min_lr=-1e-3), "min_lr must be >= 0"),
                                             (dict(min_lr=0.1), r"min_lr must be in \[0, lr\]"),
                                             (dict(weight_decay=-0.05), "weight_decay must be >= 0"),
                                             (dict(grad_clip=0.0), "grad_clip must be > 0"),
                                             (dict(grad_clip=-1.0), "grad_clip must be > 0"),
                                             (dict(on_nonfinite="ignore"), "on_nonfinite must be one of"),
                                             (dict(weight_decay_on="biases"), "weight_decay_on must be one of")])
def test_settings_that_cannot_work_are_refused_before_the_run(tmp_path, setting, problem):
    with pytest.raises(ValueError, match=problem):
        tiny_train_config(tmp_path, **setting).validate()


class LeavesOutBatchOne:
    """An epoch loader with VideoLoader's protocol (set_epoch with start_batch, next_batch) whose
    batch 1 is left out (none of its videos decoded); its batches are their positions."""

    def __init__(self, n=6, replay=False):
        self.n, self.start = n, 0
        if replay:  # a loader that cannot start mid-epoch
            self.set_epoch = lambda epoch: None

    def set_epoch(self, epoch, start_batch=0):
        self.start = start_batch

    def __len__(self):
        return self.n

    def __iter__(self):
        for position in range(self.start, self.n):
            self.next_batch = position + 1
            if position != 1:
                yield position


@pytest.mark.parametrize("replay", [False, True])
def test_epoch_loader_keeps_every_batch_after_one_left_out_and_resumes_after_the_last_used(replay):
    from vitaclip.engine.loader import EpochLoader

    batches = iter(EpochLoader(LeavesOutBatchOne(replay=replay)))
    assert [next(batches) for _ in range(5)] == [0, 2, 3, 4, 5]
    first = EpochLoader(LeavesOutBatchOne(replay=replay))
    used = iter(first)
    assert [next(used) for _ in range(2)] == [0, 2]
    resumed = EpochLoader(LeavesOutBatchOne(replay=replay))
    resumed.load_state_dict(first.state_dict())
    assert [next(iter(resumed)) for _ in range(1)] == [3]
    other_seed = LeavesOutBatchOne(replay=replay)
    other_seed.seed = 1
    with pytest.raises(ValueError, match=r"^the data order's seed is 0 in the checkpoint, 1 in this run: resume with "
                                         r"the checkpoint's \(--seed 0\)"):
        EpochLoader(other_seed).load_state_dict({**first.state_dict(), "seed": 0})


def test_a_resume_with_another_seed_names_the_checkpoint_and_its_seed(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, stop_after=2))
    with pytest.raises(ValueError, match=r"checkpoint-00000002\.pt: the data order's seed is 0 in the checkpoint, 3 in "
                                         r"this run: resume with the checkpoint's \(--seed 0\)"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto", seed=3))


class EpochOfFive:
    """An epoch loader of 5 batches of one item, the epoch's items shifted by its number (VideoLoader's
    set_epoch, end_batch too unless `plans_to_end`); records the (epoch, position) of each batch."""

    batch_size = 1

    def __init__(self, plans_to_end=False):
        self.data, self.epoch, self.start, self.end, self.used = tiny_data(8), 0, 0, None, []
        if plans_to_end:  # a loader that cannot end early: left part-read
            self.set_epoch = lambda epoch, start_batch=0: self.__dict__.update(epoch=epoch, start=start_batch)

    def set_epoch(self, epoch, start_batch=0, end_batch=None):
        self.epoch, self.start, self.end = epoch, start_batch, end_batch

    def __len__(self):
        return 5

    def __iter__(self):
        for position in range(self.start, 5 if self.end is None else self.end):
            self.used.append((self.epoch, position))
            video, label, video_id = self.data[(position + self.epoch) % 8]
            yield video[None], torch.tensor([label]), [video_id]


def test_an_epoch_loader_ends_its_epochs_at_whole_steps_of_accumulated_batches(tmp_path):
    """As ShardedTrainLoader drops an epoch's part-step: a step across two epochs could take a video
    twice, and layouts of the same global batch would end their epochs at other videos."""
    data = EpochOfFive()
    train(tiny_model(), data, tiny_train_config(tmp_path, steps=4, batch_size=2, micro_batch_size=1))
    assert data.used == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]  # none planned after
    last = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert last["loader"] == [{"epoch": 2, "batch_in_epoch": 0}]


def test_an_epoch_loader_that_cannot_end_early_is_left_at_whole_steps_and_one_without_a_step_is_named():
    from vitaclip.engine.loader import EpochLoader

    batches = iter(EpochLoader(EpochOfFive(plans_to_end=True), accum_steps=2))
    assert [next(batches)[2][0] for _ in range(6)] == [0, 1, 2, 3, 1, 2]
    with pytest.raises(ValueError, match="its 5 per epoch do not fill a step of 6"):
        next(iter(EpochLoader(EpochOfFive(), accum_steps=6)))


def test_resume_onto_other_frozen_weights_is_refused_and_a_moved_backbone_is_not(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    backbone = {"kind": "pretrained", "path": str(tmp_path / "base")}
    train(ckpt.load_model(tmp_path / "base"), tiny_data(), tiny_train_config(tmp_path / "run", steps=4, stop_after=2),
          backbone=backbone)
    other = tiny_model(seed=1)  # e.g. resumed with another --pretrained: the same architecture
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"trained on other frozen weights .* tensors differ, e.g. \['visual\."):
        train(ckpt.load_model(tmp_path / "other"), tiny_data(), tiny_train_config(tmp_path / "run", steps=4, resume="auto"),
              backbone={"kind": "pretrained", "path": str(tmp_path / "other")})
    (tmp_path / "base").rename(tmp_path / "moved")
    # loading the checkpoint alone names it and where its frozen weights were, not "base does not exist"
    with pytest.raises(FileNotFoundError, match=rf"checkpoint-00000002.pt holds none of its frozen weights, which "
                                                rf"came from {re.escape(str(tmp_path / 'base'))}: that no longer"):
        ckpt.load_model(tmp_path / "run")
    moved = {"kind": "pretrained", "path": str(tmp_path / "moved")}
    assert train(ckpt.load_model(tmp_path / "moved"), tiny_data(),
                 tiny_train_config(tmp_path / "run", steps=4, resume="auto"), backbone=moved).finished


def test_a_checkpoint_refuses_its_backbone_source_saved_over_since(tmp_path):
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    backbone = {"kind": "pretrained", "path": str(tmp_path / "base")}
    train(ckpt.load_model(tmp_path / "base"), tiny_data(), tiny_train_config(tmp_path / "run", steps=2),
          backbone=backbone)
    assert ckpt.load_model(tmp_path / "run").classnames == list(CLASSES)
    tiny_model(seed=1).save_pretrained(tmp_path / "base")  # e.g. another run's final model saved there
    with pytest.raises(ValueError, match=r"trained on other frozen weights \({'kind': 'pretrained'"):
        ckpt.load_model(tmp_path / "run")
    front = VitaCLIP(base.config.replace(ctx_position="front"), list(CLASSES))
    front.load_state_dict(base.state_dict())
    front.save_pretrained(tmp_path / "base")  # the same frozen weights, another architecture
    with pytest.raises(ValueError, match=r"another architecture .*'ctx_position': \('end', 'front'\)"):
        ckpt.load_model(tmp_path / "run")


def test_resume_onto_a_backbone_source_of_a_run_that_had_none_is_refused_unless_the_same_weights(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "run", steps=4, stop_after=2))  # the whole model
    tiny_model(seed=1).save_pretrained(tmp_path / "other")
    tiny_model().save_pretrained(tmp_path / "same")

    def resume(source):
        return train(ckpt.load_model(tmp_path / source), tiny_data(),
                     tiny_train_config(tmp_path / "run", steps=4, resume="auto"),
                     backbone={"kind": "pretrained", "path": str(tmp_path / source)})

    with pytest.raises(ValueError, match=r"trained on other frozen weights \(the whole model it holds\)"):
        resume("other")
    assert resume("same").finished


def test_resuming_an_earlier_checkpoint_refuses_a_folder_with_later_ones(tmp_path):
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "run", steps=6, keep_checkpoints=0))
    earlier = ckpt.checkpoint_path(tmp_path / "run", 2)
    with pytest.raises(ValueError, match="holds checkpoints after step 2 .*checkpoint-00000004.pt, "
                                         "checkpoint-00000006.pt.*another output directory"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "run", steps=6, resume=str(earlier)))
    with pytest.warns(UserWarning, match="steps: 6 -> 4"):
        branch = train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "branch", steps=4, keep_checkpoints=1,
                                                                    resume=str(earlier), resume_with_changes=True))
    assert branch.finished and [p.name for p in ckpt.list_checkpoints(tmp_path / "branch")] == ["checkpoint-00000004.pt"]


class ShortBatches:
    """An endless, resumable loader of micro-batches of 2 whose second is short one clip (a video
    the loader could not decode, in skip mode)."""

    batch_size = 2

    def __init__(self):
        self.data, self.served = tiny_data(), 0

    def state_dict(self):
        return {"served": self.served}

    def load_state_dict(self, state):
        self.served = state["served"]

    def __iter__(self):
        while True:
            n = 1 if self.served % 2 else 2
            items = [self.data[(2 * self.served + i) % len(self.data)] for i in range(n)]
            self.served += 1
            yield (torch.stack([v for v, _, _ in items]), torch.tensor([label for _, label, _ in items]),
                   torch.tensor([i for _, _, i in items]))


def test_a_step_short_of_clips_is_the_mean_over_the_clips_it_had(tmp_path):
    import torch.nn.functional as F

    model = tiny_model()
    first = list(zip(range(2), iter(ShortBatches())))  # the step's micro-batches: 2 clips, then 1
    video = torch.cat([b[0] for _, b in first])
    labels = torch.cat([b[1] for _, b in first])
    with torch.no_grad():
        want = F.cross_entropy(tiny_model().train()(video), labels).item()
    # a huge Adam eps makes the update proportional to the gradient, so its scale shows
    config = tiny_train_config(tmp_path, steps=1, warmup_steps=0, batch_size=4, micro_batch_size=2, adam_eps=1e3,
                               weight_decay=0.0)
    result = train(model, ShortBatches(), config)
    assert result.losses[1] == pytest.approx(want, rel=1e-5)  # not (mean of 2 + the 1) / 2
    reference = tiny_model().train()
    F.cross_entropy(reference(video), labels).backward()
    torch.optim.AdamW(reference.trainable_parameters(), lr=config.lr, eps=1e3, weight_decay=0.0).step()
    for name, value in trainable(reference).items():  # the update follows the mean gradient over the 3 clips
        torch.testing.assert_close(trainable(model)[name], value, rtol=1e-4, atol=1e-9, msg=name)


def test_a_run_that_learned_a_vector_per_token_of_its_phrase_is_told_how_to_resume(tmp_path):
    from vitaclip.demo import demo_model_config

    def model(**text):
        torch.manual_seed(0)
        return VitaCLIP(demo_model_config(2, 16).replace(**text), list(CLASSES))

    train(model(n_ctx=5), tiny_data(), tiny_train_config(tmp_path, steps=4, stop_after=2))
    path = ckpt.latest_checkpoint(tmp_path)  # as the code before wrote it: a vector for each of 5 tokens
    payload = ckpt.load_checkpoint(path)
    payload["config"]["ctx_init"] = "a_video_of"
    torch.save(payload, path)
    with pytest.raises(ValueError, match=r"'n_ctx': \(5, 3\).*one vector per word.*ctx_init=None, n_ctx=5"):
        train(model(ctx_init="a_video_of"), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto"))
    assert train(model(n_ctx=5), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto")).finished


def test_a_checkpoint_lacking_one_of_its_own_tensors_is_refused_naming_it(tmp_path):
    """load_own_state copied what the checkpoint held and left a missing prompt tensor at the
    backbone's (random) value, silently."""
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    train(ckpt.load_model(tmp_path / "base"), tiny_data(), tiny_train_config(tmp_path / "run", steps=2),
          backbone={"kind": "pretrained", "path": str(tmp_path / "base")})
    path = ckpt.latest_checkpoint(tmp_path / "run")
    payload = torch.load(path, weights_only=False)
    assert not payload["model_is_full"]
    del payload["model"]["visual.global_prompts"]
    torch.save(payload, path)
    with pytest.raises(ValueError, match="missing visual.global_prompts"):
        ckpt.load_model(tmp_path / "run")


def test_fp16_resume_restores_the_loss_scalers_state(tmp_path):
    """a resumed fp16 run started a fresh GradScaler (its growth tracker back at 0): its
    checkpoints then differ from the uninterrupted run's, and the scale grows late."""
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "full", steps=3, precision="fp16"))
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "part", steps=3, precision="fp16", stop_after=2))
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / "part", steps=3, precision="fp16", resume="auto"))
    full = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "full", 3))["scaler"]
    part = ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "part", 3))["scaler"]
    assert full["_growth_tracker"] == 3 and part == full


def test_a_resumed_run_draws_what_the_uninterrupted_run_draws_from_the_global_stream(tmp_path):
    """The checkpoint's RNG states come back (not the seed's), and making the loader anew draws
    nothing from the process's stream: a model drawing from it (dropout, torch.rand in a loss) goes
    on as in one run."""
    whole, first, resumed = [], [], []
    train(drawing_model(whole), tiny_data(), tiny_train_config(tmp_path / "whole", steps=4))
    train(drawing_model(first), tiny_data(), tiny_train_config(tmp_path / "part", steps=4, stop_after=2))
    train(drawing_model(resumed), tiny_data(), tiny_train_config(tmp_path / "part", steps=4, resume="auto"))
    assert first and len(first) == len(resumed)
    assert first + resumed == whole


def test_frozen_weights_differing_in_one_statistic_are_other_weights(tmp_path):
    """the fingerprint compares sum and sum of squares; a sign-flipped tensor keeps its sum of
    squares, so a tensor must count as changed when either figure differs, not only both."""
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    train(ckpt.load_model(tmp_path / "base"), tiny_data(), tiny_train_config(tmp_path / "run", steps=2),
          backbone={"kind": "pretrained", "path": str(tmp_path / "base")})
    with torch.no_grad():
        base.textual.text_projection.mul_(-1)  # other weights: the same sum of squares, another sum
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"trained on other frozen weights .*1 of \d+ tensors differ, "
                                         r"e.g. \['textual.text_projection'\]"):
        ckpt.load_model(tmp_path / "run")


def test_the_output_folders_lock_is_held_while_the_run_writes_its_checkpoints(tmp_path, monkeypatch):
    """The lock is the run's for as long as it writes there, not only while it chooses where to start."""
    import fcntl

    from vitaclip.engine import train as train_module

    held = []
    save_checkpoint = ckpt.save_checkpoint

    def checking(directory, step, payload, keep=0):
        with open(tmp_path / "train.lock", "a") as other:  # as a second run would take it
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(False)
            except BlockingIOError:
                held.append(True)
        return save_checkpoint(directory, step, payload, keep)

    monkeypatch.setattr(train_module.ckpt, "save_checkpoint", checking)
    assert train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, checkpoint_every=2)).finished
    assert held == [True, True]


def test_a_second_run_into_an_output_folder_being_written_is_refused(tmp_path):
    """Two runs writing one folder (a requeued job while the first one's ranks still run) would prune
    each other's checkpoints and interleave their logs: the second is refused while the first holds the
    folder's lock, which a run releases when it returns or raises."""
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / "train.lock", "a") as held:  # as a running train() holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ValueError, match=f"{tmp_path} is being written by another training run .*train.lock"):
            train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2))
    assert ckpt.list_checkpoints(tmp_path) == []
    assert train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=2)).finished
    with pytest.raises(ValueError, match="trained with other settings"):  # raised with the lock held
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto"))
    assert train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=4, resume="auto",
                                                              resume_with_changes=True)).finished


def test_the_training_loader_draws_item_seeds_as_batches_are_taken(monkeypatch):
    """An epoch's (index, seed) keys are made as the micro-batches are taken, not all at its start (a
    seed per item: seconds for a data set of Kinetics' size at every epoch), and are the same keys."""
    import vitaclip.engine.loader as engine_loader
    from vitaclip.engine.loader import ShardedTrainLoader

    data = tiny_data(64)
    expected = list(ShardedTrainLoader(data, 8, 4)._keys(0, 0))
    seeds = []
    real = engine_loader.derived_seed
    monkeypatch.setattr(engine_loader, "derived_seed", lambda *key: seeds.append(key) or real(*key))
    loader = ShardedTrainLoader(data, 8, 4)
    batches = iter(loader)
    next(batches)
    assert len(seeds) <= 3 * 4  # the first micro-batches' items, not the epoch's 64
    keys = engine_loader._EpochKeys(loader, 0, 0)
    assert len(keys) == 16 and list(keys) == expected
    assert len(engine_loader._EpochKeys(loader, 0, 5)) == 11 and list(engine_loader._EpochKeys(loader, 0, 5)) == expected[5:]
