import json
import math
import os
import re

import pytest
import torch

from conftest import CLASSES, random_video, randomize_, tiny_config
from vitaclip import VitaCLIP
from vitaclip.text import phrase_text, tokenize
from vitaclip.weights import load_state_exactly

TINY_CLIP = {  # B/16-shaped (patch 16, head dim 64) but shallow and small
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 128, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def register_tiny_clip(folder, name, changes=None):
    """Register TINY_CLIP with `changes` (its sections updated, not replaced) as open_clip model `name`."""
    import open_clip

    config = {**TINY_CLIP}
    for key, value in (changes or {}).items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    return name


@pytest.fixture(scope="module")
def tiny_clip_checkpoint(tmp_path_factory):
    """A randomly initialised open_clip CLIP saved as a local checkpoint, under a registered name."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    register_tiny_clip(folder, "vitaclip-test-b16")
    torch.manual_seed(1)
    clip = open_clip.create_model("vitaclip-test-b16")
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = folder / "weights.pt"
    torch.save(clip.state_dict(), path)
    return clip.eval(), path


def test_from_clip_without_prompts_is_clip_averaged_over_frames(tiny_clip_checkpoint):
    clip, path = tiny_clip_checkpoint
    model = VitaCLIP.from_clip("vitaclip-test-b16", str(path), CLASSES, num_frames=4,
                               use_summary=False, use_local=False, use_global=False)
    assert model.config.act == "quick_gelu" and model.config.heads == 2 and model.config.width == 128
    with torch.no_grad():
        model.visual.time_embed.zero_()
        video = torch.randn(2, 3, 4, 64, 64)
        ours = model.encode_video(video)
        theirs = clip.encode_image(video.transpose(1, 2).flatten(0, 1)).view(2, 4, -1).mean(1)
        assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
        texts = ["a video of a person swimming.", "dog"]
        assert torch.allclose(model.encode_text(texts), clip.encode_text(clip_tokenize(texts)), rtol=1e-4, atol=1e-5)


def test_plain_clip_scores_as_clip_does(tiny_clip_checkpoint):
    """No prompts, no time embedding, CLIP's own logit scale: open_clip's logits on the frames' mean
    feature (the zeroshot command's baseline without --model)."""
    clip, path = tiny_clip_checkpoint
    torch.manual_seed(0)  # the prompts vitaclip would draw must not matter
    model = VitaCLIP.plain_clip("vitaclip-test-b16", str(path)).eval()
    templates = ["a video of a person {}."]
    model.set_classes(CLASSES, templates=templates)
    video = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        image = torch.nn.functional.normalize(
            clip.encode_image(video.transpose(1, 2).flatten(0, 1)).view(2, 8, -1).mean(1), dim=-1)
        names = [name.replace("_", " ") for name in CLASSES]
        text = torch.nn.functional.normalize(clip.encode_text(clip_tokenize([templates[0].format(n) for n in names])),
                                             dim=-1)
        assert torch.allclose(model(video), clip.logit_scale.exp() * image @ text.t(), rtol=1e-4, atol=1e-4)


def test_resnet_clips_are_refused_by_name(tmp_path):
    name = register_tiny_clip(tmp_path, "vitaclip-test-rn", {"vision_cfg": {"layers": [1, 1, 1, 1], "width": 64,
                                                                             "image_size": 64}})
    with pytest.raises(ValueError, match="ViT image tower.*ModifiedResNet"):
        VitaCLIP.from_clip(name, None, CLASSES)


def test_a_model_name_open_clip_lacks_is_named_with_the_closest_it_has():
    """A mistyped --clip ended in open_clip's RuntimeError, a traceback listing every model it has."""
    with pytest.raises(ValueError, match=r"open_clip has no model 'ViT-B/61' \(closest: ViT-B-16"):
        VitaCLIP.from_clip("ViT-B/61", None, CLASSES)
    with pytest.raises(ValueError, match=r"open_clip has no model 'Nonesuch'; open_clip.list_models\(\) lists them"):
        VitaCLIP.from_clip("Nonesuch", None, CLASSES)


def test_a_gelu_model_from_a_file_warns_that_openai_weights_need_quick_gelu(tmp_path):
    import open_clip

    name = register_tiny_clip(tmp_path, "vitaclip-test-gelu", {"quick_gelu": False})
    path = tmp_path / "weights.pt"
    torch.save(open_clip.create_model(name).state_dict(), path)
    with pytest.warns(UserWarning, match=f"{name}-quickgelu"):
        VitaCLIP.from_clip(name, str(path), CLASSES)


def test_a_missing_clip_weights_file_is_named_as_missing(tiny_clip_checkpoint, tmp_path):
    """open_clip said 'not a known tag or valid file path', and vitaclip then spoke of downloads and networks."""
    _, path = tiny_clip_checkpoint
    for missing in (tmp_path / "nope" / "weights.pt", "weights.safetensors"):
        with pytest.raises(FileNotFoundError, match=f"^CLIP weights file {re.escape(str(missing))} does not exist$"):
            VitaCLIP.from_clip("vitaclip-test-b16", str(missing), CLASSES)
    assert VitaCLIP.from_clip("vitaclip-test-b16", str(path), CLASSES).config.width == 128  # one that exists


def clip_tokenize(texts):
    import open_clip

    return open_clip.tokenize(texts)


def test_empty_pretrained_means_random_weights_and_unavailable_weights_say_so(tiny_clip_checkpoint):
    """'' is random weights on the command line (it failed in zeroshot's plain CLIP); weights open_clip
    cannot get (offline) end in one error naming them, not a chain of download tracebacks."""
    from vitaclip.weights import WeightsUnavailable

    assert VitaCLIP.plain_clip("vitaclip-test-b16", "").config.layers == TINY_CLIP["vision_cfg"]["layers"]
    with pytest.raises(WeightsUnavailable, match="could not load the 'no-such-tag' weights of 'vitaclip-test-b16'"
                                                 ".*give a weights file"):
        VitaCLIP.from_clip("vitaclip-test-b16", "no-such-tag", CLASSES)


def test_from_clip_with_prompts_loads_every_backbone_tensor(tiny_clip_checkpoint):
    clip, path = tiny_clip_checkpoint
    model = VitaCLIP.from_clip("vitaclip-test-b16", str(path), CLASSES)
    sd = model.state_dict()
    assert torch.equal(sd["visual.blocks.1.attn.k_proj.weight"],
                       clip.state_dict()["visual.transformer.resblocks.1.attn.in_proj_weight"][128:256])
    assert torch.equal(sd["visual.patch_embed.proj.bias"], torch.zeros(128))
    assert model(torch.randn(1, 3, 8, 64, 64)).shape == (1, len(CLASSES))


def test_from_clip_refuses_contradicting_overrides(tiny_clip_checkpoint):
    _, path = tiny_clip_checkpoint
    with pytest.raises(ValueError, match="width"):
        VitaCLIP.from_clip("vitaclip-test-b16", str(path), CLASSES, width=64)


@pytest.mark.parametrize("changes, named", [
    ({"vision_cfg": {"ls_init_value": 0.1}}, "LayerScale"),
    ({"text_cfg": {"ls_init_value": 0.1}}, "LayerScale"),
    ({"vision_cfg": {"no_ln_pre": True}}, "no_ln_pre"),
    ({"vision_cfg": {"pool_type": "avg"}}, "vision pool_type 'avg'"),
    ({"vision_cfg": {"final_ln_after_pool": True}}, "final_ln_after_pool"),
    ({"text_cfg": {"pool_type": "eos"}}, "text pool_type 'eos'"),
    ({"text_cfg": {"no_causal_mask": True}}, "no_causal_mask"),
    ({"text_cfg": {"hf_tokenizer_name": "bert-base-uncased"}}, "tokenizer"),
    ({"text_cfg": {"tokenizer_kwargs": {"clean": "canonicalize"}}}, "tokenizer"),
    ({"quick_gelu": False, "vision_cfg": {"act_kwargs": {"approximate": "tanh"}}}, "activation"),
    ({"vision_cfg": {"norm_kwargs": {"eps": 1e-6}}}, "eps"),
    # features with weights of their own: refused as tensors the conversion leaves unused
    ({"vision_cfg": {"scale_fc": True}}, "'visual.transformer.resblocks.0.mlp.ln.weight'"),
    ({"text_cfg": {"qk_norm": True}}, "'transformer.resblocks.0.attn.ln_q.weight'"),
])
def test_from_clip_refuses_open_clip_features_it_does_not_implement(tmp_path, changes, named):
    name = register_tiny_clip(tmp_path, f"vitaclip-test-{tmp_path.name}", changes)
    with pytest.raises(ValueError, match=re.escape(named)):
        VitaCLIP.from_clip(name, None, CLASSES)


def official_checkpoint(model):
    """A training checkpoint in the authors' layout: DDP prefixes, prompt buffers, optimizer state."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    n = len(model.classnames)
    # their prompt learner's buffers: the embedded prompt "X X X name." before and after the context
    n_ctx, config = model.config.n_ctx, model.config
    before = phrase_text(config.ctx_init) if config.ctx_init else " ".join(["X"] * n_ctx)
    tokens = tokenize([f"{before} {name}." for name in model.classnames], config.context_length)
    with torch.no_grad():
        embedded = model.textual.token_embedding(tokens)
    state["module.prompt_learner.token_prefix"] = embedded[:, :1].clone()
    state["module.prompt_learner.token_suffix"] = embedded[:, 1 + n_ctx:].clone()
    if model.prompt_learner.ctx is None:  # the authors' learner keeps a context of 0 prompts
        state["module.prompt_learner.ctx"] = torch.zeros(n, 0, model.config.text_width)
    if model.config.use_global and not model.config.num_global:  # and their model 0 global prompts
        state["module.visual.global_prompts"] = torch.zeros(model.config.layers, 0, model.config.width)
    return {"model": state, "optimizer": {"state": {}, "param_groups": []}, "lr_sched": {"last_epoch": 3},
            "loss_scaler": {"scale": 1024.0}, "next_step": 4}


@pytest.mark.parametrize("overrides", [dict(), dict(use_summary=False, num_global_prompts=5, csc=False),
                                       dict(use_local=False, use_global=False, num_frames=2, n_ctx=0),
                                       dict(num_global_prompts=0)])
def test_official_checkpoint_round_trip(tmp_path, overrides):
    model = randomize_(VitaCLIP(tiny_config(**overrides), CLASSES)).eval()
    path = tmp_path / "ckpt.pth"
    torch.save(official_checkpoint(model), path)
    loaded = VitaCLIP.from_official_checkpoint(path, CLASSES, heads=2, text_heads=2).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for field in ("num_global", "n_ctx", "num_frames", "use_summary", "use_local", "image_size", "layers"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    video = random_video(model.config)
    assert torch.equal(loaded(video), model(video))


def test_official_checkpoint_loads_without_its_learned_context_for_templates(tmp_path):
    model = randomize_(VitaCLIP(tiny_config(), CLASSES)).eval()
    torch.save(official_checkpoint(model), tmp_path / "ckpt.pth")
    loaded = VitaCLIP.from_official_checkpoint(tmp_path / "ckpt.pth", None, learned_context=False, heads=2,
                                               text_heads=2).eval()
    assert loaded.prompt_learner is None
    for m in (model, loaded):
        m.set_classes(["run", "jump"], templates=["a video of {}."])
    video = random_video(model.config)
    assert torch.equal(loaded(video), model(video))


def backbone_state(model):
    """A converted CLIP backbone file in the authors' layout: the model's state without Vita-CLIP's additions."""
    return {k: v for k, v in model.state_dict().items()
            if not any(s in k for s in ("summary", "local", "global", "time_embed", "cls_proj",
                                        "prompt_learner", "logit_scale"))}


@pytest.mark.parametrize("clip_logit_scale", [None, math.log(100)])
def test_official_backbone_file_loads_non_strictly_with_fresh_prompts(tmp_path, clip_logit_scale):
    model = randomize_(VitaCLIP(tiny_config(), CLASSES))
    backbone = backbone_state(model)
    if clip_logit_scale is not None:  # CLIP's own: still a backbone, and the authors' non-strict load takes it
        backbone["logit_scale"] = torch.tensor(clip_logit_scale)
    torch.save(backbone, tmp_path / "backbone.pth")
    loaded = VitaCLIP.from_official_checkpoint(tmp_path / "backbone.pth", CLASSES, heads=2, text_heads=2,
                                               num_frames=3, n_ctx=3, num_global_prompts=2)
    assert loaded.logit_scale.item() == pytest.approx(clip_logit_scale or math.log(1 / 0.07))
    assert torch.equal(loaded.visual.blocks[1].mlp.fc2.weight, model.visual.blocks[1].mlp.fc2.weight)
    assert loaded.visual.global_prompts.shape == (2, 2, 64)
    assert loaded.prompt_learner.ctx.shape == (len(CLASSES), 3, 32)
    # random prompts to score with: only a model to train from (--init) takes the file
    from vitaclip.engine.checkpoint import load_model

    for templates_only in (False, True):
        with pytest.raises(ValueError, match="holds a CLIP backbone only.*--init"):
            load_model(tmp_path / "backbone.pth", CLASSES, templates_only=templates_only, heads=2, text_heads=2)
    assert load_model(tmp_path / "backbone.pth", CLASSES, for_training=True, heads=2, text_heads=2).prompt_learner


def test_file_of_another_model_is_not_taken_for_a_clip_backbone(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")  # e.g. a ResNet's state dict
    from vitaclip.engine.checkpoint import load_model

    # not "holds a CLIP backbone only ... train from it (--init)": --init refuses it too
    with pytest.raises(ValueError, match="not a Vita-CLIP/CLIP checkpoint in the authors' layout"):
        load_model(tmp_path / "other.pth", CLASSES)


@pytest.mark.parametrize("dropped, named", [
    ("visual.pos_embed", "lacks 'visual.pos_embed'"),
    ("textual.transformer.resblocks.", r"has no text layers \(no 'textual\.transformer\.resblocks\.<i>\.\*' keys\)"),
])
def test_a_checkpoint_lacking_what_the_architecture_is_read_from_is_named(tmp_path, dropped, named):
    """The message said 'checkpoint lacks ...', not which of the files given."""
    ckpt = official_checkpoint(VitaCLIP(tiny_config(), CLASSES))
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if not k.startswith(f"module.{dropped}")}
    torch.save(ckpt, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'cut.pth'))} {named}: not a"):
        VitaCLIP.from_official_checkpoint(tmp_path / "cut.pth", CLASSES, heads=2, text_heads=2)


def test_an_open_clip_weights_file_given_as_a_vita_clip_checkpoint_is_pointed_to_pretrained(tiny_clip_checkpoint):
    """--init or --model with the file --pretrained takes: 'lacks visual.patch_embed.proj.weight', nothing more."""
    _, path = tiny_clip_checkpoint
    from vitaclip.engine.checkpoint import load_model

    for for_training in (False, True):
        with pytest.raises(ValueError, match=r"weights\.pt holds an open_clip CLIP's weights, not a Vita-CLIP "
                                             r"checkpoint: .*--pretrained FILE"):
            load_model(path, CLASSES, for_training=for_training)


def test_mismatched_official_checkpoints_fail_clearly(tmp_path):
    model = VitaCLIP(tiny_config(), CLASSES)
    ckpt = official_checkpoint(model)
    torch.save(ckpt, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match="4 classes"):
        VitaCLIP.from_official_checkpoint(tmp_path / "ok.pth", ["a", "b"], heads=2, text_heads=2)
    from vitaclip.engine.checkpoint import load_model  # to train on other classes: a fresh context for them

    with pytest.warns(UserWarning, match="learned for 4 classes, not these 2: it starts afresh"):
        other = load_model(tmp_path / "ok.pth", ["a", "b"], for_training=True, heads=2, text_heads=2)
    assert other.prompt_learner.ctx.shape[0] == 2 and other.config.csc
    assert torch.equal(other.visual.global_prompts, model.visual.global_prompts)
    with pytest.raises(ValueError, match="class names"):
        VitaCLIP.from_official_checkpoint(tmp_path / "ok.pth", None, heads=2, text_heads=2)
    with pytest.raises(ValueError, match=f"contradict the shapes of {tmp_path / 'ok.pth'} .*'width': \\(128, "):
        VitaCLIP.from_official_checkpoint(tmp_path / "ok.pth", CLASSES, width=128)
    broken = dict(ckpt["model"])
    del broken["module.visual.blocks.1.norm2.bias"]
    broken["module.visual.blocks.1.extra.weight"] = torch.zeros(1)
    broken["module.visual.blocks.0.cls_proj.weight"] = torch.zeros(64, 32)
    torch.save({"model": broken}, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        VitaCLIP.from_official_checkpoint(tmp_path / "bad.pth", CLASSES, heads=2, text_heads=2)
    msg = str(err.value)
    assert "visual.blocks.1.norm2.bias" in msg and "visual.blocks.1.extra.weight" in msg and "cls_proj" in msg
    deeper = VitaCLIP(tiny_config(layers=4), CLASSES).state_dict()  # another model size
    with pytest.raises(ValueError) as err:
        load_state_exactly(model, deeper)
    extra = [k for k in deeper if "blocks.2." in k or "blocks.3." in k]
    assert len(extra) > 8 and f"{len(extra)} unexpected keys [" in str(err.value)
    assert f"and {len(extra) - 8} more" in str(err.value) and str(err.value).count("blocks.") == 8
    assert "shape mismatches ['visual.global_prompts: (4, 2, 64) in checkpoint" in str(err.value)
    torch.save({"something": 1}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="neither"):
        VitaCLIP.from_official_checkpoint(tmp_path / "junk.pth", CLASSES)
    with pytest.raises(FileNotFoundError):
        VitaCLIP.from_official_checkpoint(tmp_path / "missing.pth", CLASSES)


class NotATensor:
    pass


def test_a_file_that_is_no_checkpoint_of_tensors_says_so_without_pytorchs_advice_to_load_it_unsafely(tmp_path):
    from vitaclip.weights import read_torch_file

    (tmp_path / "clip.mp4").write_bytes(b"not a checkpoint at all")
    torch.save({"model": NotATensor()}, tmp_path / "objects.pt")
    for name, reason in (("clip.mp4", "Unsupported operand"), ("objects.pt", "Unsupported global")):
        with pytest.raises(ValueError) as err:
            read_torch_file(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"cannot read checkpoint {tmp_path / name}: not a file of tensors and plain "
                                  f"containers ({reason}")
        assert "weights_only" not in message and "file an issue" not in message
        assert "safe_globals" not in message  # its advice to allow the file's classes: the first sentence only
    torch.save(VitaCLIP(tiny_config(), CLASSES), tmp_path / "model.pt")  # a whole model pickled
    with pytest.raises(ValueError, match=r"Unsupported global.*VitaCLIP.*\); a whole model saved by torch.save\(model\)\? "
                                         r"save it with model.save_pretrained\(DIR\) and give DIR$"):
        read_torch_file(tmp_path / "model.pt")
    (tmp_path / "note.pt").write_bytes(b"junk\n")  # PyTorch's error: KeyError(174812789), a number alone
    with pytest.raises(ValueError, match=f"^cannot read checkpoint {re.escape(str(tmp_path / 'note.pt'))}: damaged or "
                                         r"no PyTorch file \(KeyError: "):
        read_torch_file(tmp_path / "note.pt")


def test_a_checkpoint_that_is_not_there_or_a_folder_is_named_as_missing(tmp_path):
    from vitaclip.weights import read_torch_file

    for missing in (tmp_path / "none.pt", tmp_path):  # (PyTorch: errno 2 or 21, not saying which file it wanted)
        with pytest.raises(FileNotFoundError, match=f"^checkpoint {re.escape(str(missing))} does not exist$"):
            read_torch_file(missing)


@pytest.mark.parametrize("name,damaged", [("model.safetensors", b"\x08\x00\x00"), ("config.json", b'{"width": '),
                                          ("classnames.json", b'["a'), ("zero_shot.json", b"\xff{}")])
def test_a_damaged_saved_model_names_the_file(tmp_path, name, damaged):
    import shutil

    model = VitaCLIP(tiny_config(), CLASSES)
    model.set_classes(["a", "b"], templates=["a video of {}."])
    model.save_pretrained(tmp_path / "good")
    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    (tmp_path / "bad" / name).write_bytes(damaged)
    with pytest.raises(ValueError, match=f"cannot read {re.escape(str(tmp_path / 'bad' / name))}"):
        VitaCLIP.from_pretrained(tmp_path / "bad")
    assert VitaCLIP.from_pretrained(tmp_path / "good").classnames == ["a", "b"]


def test_save_and_load_pretrained(tmp_path):
    model = randomize_(VitaCLIP(tiny_config(ctx_position="middle", ctx_init="a clip of"), CLASSES))
    model.save_pretrained(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["classnames.json", "config.json",
                                                                      "model.safetensors"]
    from importlib.metadata import version
    from safetensors import safe_open

    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as weights:
        assert weights.metadata() == {"format": "pt", "vitaclip": version("vitaclip")}
    loaded = VitaCLIP.from_pretrained(tmp_path / "saved")
    video = random_video(model.config)
    assert torch.equal(loaded(video), model(video))
    assert loaded.classnames == model.classnames
    with pytest.raises(FileNotFoundError, match="config.json"):
        (tmp_path / "saved" / "config.json").unlink()
        VitaCLIP.from_pretrained(tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="savd does not exist"):  # a mistyped path: no file is "missing"
        VitaCLIP.from_pretrained(tmp_path / "savd")
    torch.save({}, tmp_path / "checkpoint-00000001.pt")
    with pytest.raises(FileNotFoundError, match="vitaclip.load_model also reads training checkpoints"):
        VitaCLIP.from_pretrained(tmp_path / "checkpoint-00000001.pt")


def test_a_save_removes_what_a_save_killed_midway_left_in_its_folder(tmp_path):
    """A save killed by SIGKILL (a lost node, the OOM killer) leaves atomic_write's temporary copies:
    the next save into the folder removes them, and nothing else of the folder's."""
    import tempfile

    model = VitaCLIP(tiny_config(), CLASSES)
    tmp_path.joinpath("notes.txt").write_text("mine")
    left = [tempfile.mkstemp(dir=tmp_path, prefix=f".{name}.")[1]
            for name in ("model.safetensors", "config.json", "training_data.json")]
    kept = [tmp_path / ".model.safetensors.backup", tmp_path / ".other.json.abcd1234"]
    for path in kept:
        path.write_text("not a leftover")
    model.save_pretrained(tmp_path)
    assert not any(os.path.exists(path) for path in left)
    assert all(path.exists() for path in kept) and tmp_path.joinpath("notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "classnames.json", "config.json", "model.safetensors", "notes.txt"]


def test_a_uniform_augmentation_magnitude_is_saved_as_strict_json(tmp_path):
    """mstd above 100 (a uniform RandAugment magnitude) is inf in the loader's description:
    Python's json wrote it as Infinity, which jq, JavaScript and Go refuse."""
    from vitaclip.data.augment import RandAugmentConfig

    model = VitaCLIP(tiny_config(), CLASSES)
    augment = vars(RandAugmentConfig.parse("rand-m9-n2-mstd101"))
    model.training_data = {"stride": 2, "frames": 8, "augment": augment, "crop_scale": [0.08, 1.0]}
    model.save_pretrained(tmp_path)

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    written = json.loads((tmp_path / "training_data.json").read_text(), parse_constant=refuse)
    assert written["augment"]["magnitude_std"] == "inf"
    assert written["augment"]["magnitude"] == 9.0 and written["crop_scale"] == [0.08, 1.0]
    assert VitaCLIP.from_pretrained(tmp_path).training_data == written


def test_saved_files_follow_the_umask_and_reach_the_disk_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []

    def recorded(name, real):
        def call(*args):
            events.append(name)
            return real(*args)
        return call

    monkeypatch.setattr(os, "fsync", recorded("fsync", os.fsync))
    monkeypatch.setattr(os, "replace", recorded("replace", os.replace))
    before = os.umask(0o027)
    try:
        VitaCLIP(tiny_config(), CLASSES).save_pretrained(tmp_path / "saved")
    finally:
        os.umask(before)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "saved").iterdir()} == {
        "classnames.json": "0o640", "config.json": "0o640", "model.safetensors": "0o640"}
    assert events == ["fsync", "replace", "fsync"] * 3  # the file, its rename, the folder holding the rename


def test_a_model_that_cannot_be_written_is_named_with_the_systems_reason(tmp_path):
    """A full disk or a quota (here a file size limit) while saving: safetensors says "(os error 27)" and
    names no file; the command line shows an OSError as an error naming the file."""
    import resource
    import subprocess
    import sys

    code = ("import sys, vitaclip\n"
            "model = vitaclip.VitaCLIP(vitaclip.VitaCLIPConfig.preset('ViT-B/32', layers=1), ['a'])\n"
            "try:\n    model.save_pretrained(sys.argv[1])\nexcept OSError as err:\n    print(err.errno, err)")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # noqa: E731
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, preexec_fn=limit)
    assert run.stdout.strip() == f"27 [Errno 27] File too large: writing {tmp_path / 'model.safetensors'}", run.stderr
    assert list(tmp_path.iterdir()) == []  # nor half a file


@pytest.mark.parametrize("name, pretrained, quick_gelu", [
    ("ViT-B-16", "openai", True), ("ViT-B/16", "OpenAI", True), ("ViT-B-16", "dfn2b", True),
    ("ViT-B-16", "metaclip_400m", True), ("ViT-B-32", "laion400m_e32", True), ("ViT-L-14", "metaclip_fullcc", True),
    ("ViT-B-16", "laion2b_s34b_b88k", False), ("ViT-B-16", "a local file", False)])
def test_weights_trained_with_quick_gelu_always_get_it(monkeypatch, tmp_path, name, pretrained, quick_gelu):
    import open_clip

    if pretrained == "a local file":
        pretrained = tmp_path / "weights.pt"
        pretrained.touch()
    seen = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        seen.update(kwargs, name=name, pretrained=pretrained)
        raise RuntimeError("stop after the call")

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    with pytest.raises(RuntimeError, match="stop"):
        VitaCLIP.from_clip(name, pretrained, CLASSES)
    assert seen["force_quick_gelu"] is quick_gelu and seen["require_pretrained"] is True


def test_official_checkpoint_keeps_an_mlp_width_that_is_no_whole_multiple_of_the_width(tmp_path):
    # 176 * (240 / 176) is 239.99999999999997 in floating point: int() made fc1 one unit short
    model = randomize_(VitaCLIP(tiny_config(width=176, heads=2, mlp_ratio=240 / 176), CLASSES)).eval()
    assert model.visual.blocks[0].mlp.fc1.out_features == 240
    torch.save(official_checkpoint(model), tmp_path / "ckpt.pth")
    loaded = VitaCLIP.from_official_checkpoint(tmp_path / "ckpt.pth", CLASSES, heads=2, text_heads=2).eval()
    video = random_video(model.config)
    assert torch.equal(loaded(video), model(video))


@pytest.mark.parametrize("dropped, named", [("textual.", "textual.transformer.resblocks"),
                                            ("visual.blocks.", "visual.blocks")])
def test_official_checkpoint_without_layers_names_the_missing_group(tmp_path, dropped, named):
    state = official_checkpoint(VitaCLIP(tiny_config(), CLASSES))["model"]
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith(f"module.{dropped}")}},
               tmp_path / "part.pth")
    with pytest.raises(ValueError, match=named):
        VitaCLIP.from_official_checkpoint(tmp_path / "part.pth", CLASSES, heads=2, text_heads=2)


def phrase_embedding(token_embedding, phrase):
    """The token embeddings [n_words, width] of a phrase's words (without start and end of text)."""
    ids = clip_tokenize([phrase])[0]
    return token_embedding.weight[ids[1:int(ids.argmax())]].detach()


def test_from_clip_initialises_the_context_from_clips_token_embedding(tiny_clip_checkpoint):
    clip, path = tiny_clip_checkpoint
    model = VitaCLIP.from_clip("vitaclip-test-b16", str(path), CLASSES, ctx_init="a video of a")
    expected = phrase_embedding(clip.token_embedding, "a video of a")
    assert model.prompt_learner.ctx.shape == (len(CLASSES), 4, 128)
    assert all(torch.equal(ctx, expected) for ctx in model.prompt_learner.ctx)
    assert model.prompt_learner.ctx.requires_grad


def test_official_backbone_file_initialises_the_context_from_its_token_embedding(tmp_path):
    model = randomize_(VitaCLIP(tiny_config(), CLASSES))
    torch.save(backbone_state(model), tmp_path / "backbone.pth")
    loaded = VitaCLIP.from_official_checkpoint(tmp_path / "backbone.pth", CLASSES, heads=2, text_heads=2,
                                               num_frames=3, num_global_prompts=2, csc=False,
                                               ctx_init="a video of a")
    assert torch.equal(loaded.prompt_learner.ctx, phrase_embedding(model.textual.token_embedding, "a video of a"))


@pytest.mark.parametrize("learned_classes", [None, CLASSES])
def test_save_and_load_pretrained_keeps_zero_shot_classes(tmp_path, learned_classes):
    model = randomize_(VitaCLIP(tiny_config(), learned_classes)).eval()
    templates = ["a video of {}.", "someone doing {}"]
    model.set_classes(["brush_hair", "cartwheel", "wave"], templates=templates)
    model.save_pretrained(tmp_path / "saved")
    loaded = VitaCLIP.from_pretrained(tmp_path / "saved").eval()
    assert loaded.classnames == ["brush hair", "cartwheel", "wave"]
    assert loaded.zero_shot_templates == templates
    video = random_video(model.config)
    assert torch.equal(loaded(video), model(video))
    if learned_classes is not None:  # the learned context is still there to switch back to
        for m in (model, loaded):
            m.set_classes(learned_classes)
        assert loaded.zero_shot_templates is None and torch.equal(loaded(video), model(video))
    loaded.save_pretrained(tmp_path / "saved")  # a model with learned classes (or none) over it
    assert VitaCLIP.from_pretrained(tmp_path / "saved").classnames == loaded.classnames


def test_heads_come_from_the_clip_of_that_width_or_must_be_given(tmp_path):
    from vitaclip.weights import config_from_official_state

    def state(width, text_width):  # the shapes the architecture is read from
        return {"visual.patch_embed.proj.weight": torch.zeros(width, 3, 14, 14),
                "visual.pos_embed": torch.zeros(257, width), "visual.blocks.0.mlp.fc1.weight": torch.zeros(4 * width, width),
                "visual.proj": torch.zeros(width, 1024), "textual.positional_embedding": torch.zeros(77, text_width),
                "textual.token_embedding.weight": torch.zeros(49408, text_width),
                "textual.transformer.resblocks.0.ln_1.weight": torch.zeros(text_width)}

    h14 = config_from_official_state(state(1280, 1024))  # ViT-H/14: 16 heads of 80
    assert (h14.heads, h14.text_heads) == (16, 16)
    b16 = config_from_official_state(state(768, 512))
    assert (b16.heads, b16.text_heads) == (12, 8)
    with pytest.raises(ValueError, match="no CLIP has a vision width of 320.*pass heads="):
        config_from_official_state(state(320, 512))
    assert config_from_official_state(state(320, 512), heads=4).heads == 4
    with pytest.raises(ValueError, match="no CLIP has a text width of 96.*pass text_heads="):
        config_from_official_state(state(768, 96))


def test_the_heads_tables_agree_with_open_clips_model_configs():
    """Heads cannot be read off an official checkpoint's shapes; the tables must be CLIP's own."""
    import glob

    import open_clip

    from vitaclip.weights import CLIP_TEXT_HEADS, CLIP_VISION_HEADS

    checked = 0
    for path in glob.glob(os.path.join(os.path.dirname(open_clip.__file__), "model_configs", "*.json")):
        with open(path) as f:
            config = json.load(f)
        vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
        if isinstance(vision.get("layers"), int) and vision.get("width") in CLIP_VISION_HEADS \
                and not vision.get("timm_model_name"):
            assert CLIP_VISION_HEADS[vision["width"]] == vision["width"] // vision.get("head_width", 64), path
            checked += 1
        if "heads" in text and text.get("width") in CLIP_TEXT_HEADS and not text.get("hf_model_name"):
            assert CLIP_TEXT_HEADS[text["width"]] == text["heads"], path
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("dropped", ["visual.blocks.1.local_prompts", "visual.blocks.0.summary_attn_layer.q_proj.bias",
                                     "logit_scale", "visual.time_embed"])
def test_a_trained_checkpoint_missing_a_prompt_tensor_is_refused_naming_it(tmp_path, dropped):
    """Only a CLIP backbone file may lack Vita-CLIP's additions; a trained checkpoint that lacks one
    would score with a random tensor in its place."""
    ckpt = official_checkpoint(randomize_(VitaCLIP(tiny_config(), CLASSES)))
    del ckpt["model"][f"module.{dropped}"]
    torch.save(ckpt, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=re.escape(dropped)):
        VitaCLIP.from_official_checkpoint(tmp_path / "cut.pth", CLASSES, heads=2, text_heads=2, num_frames=3)


def test_from_pretrained_passes_its_backend_on(tmp_path):
    """from_pretrained(path, backend=...) and load_model pass the backend on."""
    VitaCLIP(tiny_config(), CLASSES).save_pretrained(tmp_path / "m")
    assert VitaCLIP.from_pretrained(tmp_path / "m", backend="reference").backend == "reference"
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        VitaCLIP.from_pretrained(tmp_path / "m", backend="nope")
    from vitaclip.engine.checkpoint import load_model

    assert load_model(tmp_path / "m", backend="reference").backend == "reference"


def test_a_saved_model_with_a_vector_per_token_of_its_phrase_loads(tmp_path):
    """A model saved before n_ctx was the phrase's word count (a context vector per token, the phrase
    in its config) loads as it was saved: its context stands alone."""
    model = randomize_(VitaCLIP(tiny_config(n_ctx=5), CLASSES)).eval()
    model.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config["ctx_init"] = "a_video_of"  # as such a model's config read
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = VitaCLIP.from_pretrained(tmp_path / "old").eval()
    assert loaded.config.n_ctx == 5 and loaded.config.ctx_init is None
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(), model.encode_text(), rtol=0, atol=0)
