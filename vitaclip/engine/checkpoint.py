"""Training checkpoints: written atomically, found again by `resume="auto"`, turned back into
models by `load_model`.

A checkpoint holds the trainable tensors and the other Vita-CLIP additions only (the frozen CLIP
backbone is rebuilt from its recorded source: an open_clip model, a saved model folder or the
authors' file), unless the backbone has no source to rebuild from (e.g. a random one): then the
whole model state is stored.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import __version__
from ..config import VitaCLIPConfig
from ..errors import ClassNamesError
from ..model import VitaCLIP, is_trainable
from ..text import clean_classname, keep_phrase_for_saved_context
from ..files import atomic_write, atomic_write_text
from ..weights import CONFIG_FILE, VITA_ADDITION, load_state_exactly, read_torch_file, saved_model_holding

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d{8,})\.pt$")  # 8 digits, more from step 10^8 on
TEMPORARY_RE = re.compile(r"^\.checkpoint-\d{8,}\.pt\.")  # atomic_write's temporary files
FORMAT = "vitaclip-train-checkpoint-v1"
UNREADABLE_SUFFIX = ".unreadable"  # added to checkpoints a resume found unreadable and went back past
# beside a checkpoint written before its step's evaluation, once that ended: it holds the write's id
# (a marker left by an earlier write of the same step names another)
EVALUATED_SUFFIX = ".evaluated"


def checkpoint_path(directory, step: int) -> Path:
    return Path(directory) / f"checkpoint-{step:08d}.pt"


def checkpoint_step(path) -> int:
    return int(CHECKPOINT_RE.match(Path(path).name).group(1))


def list_checkpoints(directory) -> list[Path]:
    """Checkpoints of a run folder, oldest first (temporary files of interrupted writes skipped)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if CHECKPOINT_RE.match(p.name)), key=checkpoint_step)


def latest_checkpoint(directory) -> Optional[Path]:
    found = list_checkpoints(directory)
    return found[-1] if found else None


def load_latest_checkpoint(directory) -> Tuple[Optional[Path], Optional[Dict[str, Any]]]:
    """The newest checkpoint that can be read and its contents ((None, None) when there is none).
    Unreadable newer ones (e.g. truncated by a full disk) are skipped with a warning and, once an
    older one is read, renamed <name>.unreadable: kept, but out of the way of the resumed run's
    pruning (which keeps the highest steps: it deleted the checkpoints the run wrote) and of the
    next resume."""
    found = list_checkpoints(directory)
    unreadable = []
    for path in reversed(found):
        try:
            payload = load_checkpoint(path)
        except ValueError as err:
            warnings.warn(f"skipping a checkpoint that cannot be read: {err}")
            unreadable.append(path)
            continue
        for bad in unreadable:
            bad.replace(set_aside_name(bad))
        return path, payload
    if found:
        raise ValueError(f"none of the {len(found)} checkpoints in {directory} can be read")
    return None, None


def set_aside_name(path: Path) -> Path:
    """<name>.unreadable, or .unreadable.1, .2, ... where one was set aside before (a step written
    and found unreadable again): each is kept."""
    candidate, n = path.with_name(path.name + UNREADABLE_SUFFIX), 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}{UNREADABLE_SUFFIX}.{n}")
    return candidate


def remove_temporary_files(directory) -> None:
    """Delete the temporary files of checkpoint writes that were killed midway."""
    directory = Path(directory)
    if directory.is_dir():
        for path in directory.iterdir():
            if TEMPORARY_RE.match(path.name):
                path.unlink(missing_ok=True)


def save_checkpoint(directory, step: int, payload: Dict[str, Any], keep: int = 0) -> Path:
    """Write `payload` as checkpoint-<step>.pt through a temporary file + rename, then delete all
    but the newest `keep` checkpoints (0 keeps every one), never the one just written. One that
    cannot be deleted (another user's, in a sticky scratch folder) is warned of: the new one is safe."""
    path = checkpoint_path(directory, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    written_by = {"format": FORMAT, "vitaclip_version": __version__}  # the release, for whoever reads it later

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # (a file object: a failed write raises its OSError in Python)
            try:
                torch.save({**written_by, **payload}, f)
            except RuntimeError as err:  # torch's writer reports that OSError (a full disk, a quota) as its own
                if not isinstance(err.__context__, OSError):  # 'unexpected pos', the OSError its context
                    raise
                raise OSError(err.__context__.errno, err.__context__.strerror) from err  # named by atomic_write

    atomic_write(path, write, what="checkpoint")
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            if old == path:  # a higher step was there already (another run's, unlocked)
                continue
            try:
                remove_checkpoint(old)
            except OSError as err:
                warnings.warn(f"could not delete the old checkpoint {old}: {err}; the run goes on")
    return path


def remove_checkpoint(path) -> None:
    Path(path).unlink(missing_ok=True)
    evaluated_marker(path).unlink(missing_ok=True)


def evaluated_marker(path) -> Path:
    return Path(path).with_name(Path(path).name + EVALUATED_SUFFIX)


def mark_evaluated(path, write_id: str) -> None:
    """Record that the step's evaluation, which the checkpoint at `path` (written with `write_id`)
    was written before, has ended: a few bytes beside it, not the checkpoint again."""
    atomic_write_text(evaluated_marker(path), write_id)


def evaluation_pending(path, payload: Dict[str, Any]) -> bool:
    """Whether the checkpoint at `path` was written before its step's evaluation and that has not
    ended since (checkpoints of earlier versions: marked in their own key; the oldest marked the
    last step's only)."""
    if not payload.get("evaluation_pending", payload.get("final_evaluation_pending", False)):
        return False
    try:
        return evaluated_marker(path).read_text() != payload.get("write_id")
    except FileNotFoundError:
        return True


def load_checkpoint(path) -> Dict[str, Any]:
    payload = read_torch_file(path)
    if not is_training_checkpoint(payload):
        raise ValueError(f"{path} is not a vitaclip training checkpoint")
    return payload


def is_training_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def read_training_checkpoint(path) -> Optional[Dict[str, Any]]:
    """The checkpoint at `path` if it is one of ours, else None (e.g. the authors' file)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not ours; the authors' loader explains what is wrong
        return None
    return payload if is_training_checkpoint(payload) else None


# ---------------------------------------------------------------------------- model state
def own_state(model: VitaCLIP) -> Dict[str, Tensor]:
    """The tensors a backbone source cannot restore: the trainable ones and every other Vita-CLIP
    addition (e.g. the frozen cls_proj, which keeps its random initialisation)."""
    state = model.state_dict()
    return {k: state[k].detach().cpu().clone() for k in own_state_names(model)}


def own_state_names(model: VitaCLIP) -> list:
    trainable = {name for name, _ in model.named_trainable_parameters()}
    return [k for k in model.state_dict() if k in trainable or VITA_ADDITION.search(k)]


def load_own_state(model: VitaCLIP, state: Dict[str, Tensor], source: str) -> None:
    """Copy `own_state` tensors into the model, naming any key or shape that does not fit."""
    ctx = state.get("prompt_learner.ctx")
    if ctx is not None and ctx.dim() == 3 and ctx.shape[0] != len(model.classnames):
        raise ValueError(f"{source} has a class-specific context for {ctx.shape[0]} classes, but the model "
                         f"has {len(model.classnames)} classes")
    expected = own_state(model)
    current = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: {tuple(v.shape)} in {source}, {tuple(expected[k].shape)} in the model"
                 for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if problems:
        raise ValueError(f"{source} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for k, v in state.items():
            current[k].copy_(v)


def plain_values(value):
    """`value` (settings a script gave) in the types a checkpoint is read back with (weights_only):
    paths as str, numpy scalars as Python numbers. A TrainConfig's output_dir given as a pathlib.Path,
    or its steps as a numpy integer, made every checkpoint of the run unreadable."""
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_values(v) for v in value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value.item() if isinstance(value, np.generic) else value


def model_payload(model: VitaCLIP, backbone: Optional[Dict[str, Any]],
                  fingerprint: Optional[Dict[str, Tuple[float, float]]] = None) -> Dict[str, Any]:
    """What a checkpoint needs to rebuild the model: its own tensors + where the backbone came
    from and its `backbone_fingerprint` (given, or computed here), or the whole state when there
    is no such source."""
    full = backbone is None
    state = ({k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if full
             else own_state(model))
    return {"model": state, "model_is_full": full, "backbone": backbone,
            "backbone_fingerprint": None if full else fingerprint or backbone_fingerprint(model),
            "config": model.config.to_dict(), "classnames": model.classnames}


def backbone_fingerprint(model: VitaCLIP) -> Dict[str, Tuple[float, float]]:
    """Sum and sum of squares, in float64, of each tensor a backbone source restores: the same
    weights give the same figures on any device (to rounding), other weights do not."""
    return state_fingerprint(model.state_dict(), set(own_state_names(model)))


def state_fingerprint(state: Dict[str, Tensor], own: set) -> Dict[str, Tuple[float, float]]:
    """`backbone_fingerprint` of a state dict whose Vita-CLIP tensors are named in `own`."""
    frozen = {name: t.detach() for name, t in state.items() if name not in own and t.is_floating_point()}
    if not frozen:
        return {}
    stats = torch.stack([torch.stack([t.sum(dtype=torch.float64), t.square().sum(dtype=torch.float64)])
                         for t in frozen.values()])
    return dict(zip(frozen, map(tuple, stats.cpu().tolist())))


def check_backbone_fingerprint(now: Dict[str, Tuple[float, float]], payload: Dict[str, Any], source: str) -> None:
    """Refuse to put a checkpoint's prompts on frozen weights (fingerprint `now`) other than those
    they were trained with (e.g. resumed with another `--pretrained`, or a saved model it was
    started from saved again over); checkpoints without a fingerprint pass. A checkpoint holding
    the whole model is compared by its own frozen tensors."""
    if payload["model_is_full"]:
        saved = state_fingerprint(payload["model"], set(own_state_names_of(payload)))
        origin = "the whole model it holds"
    else:
        saved, origin = payload.get("backbone_fingerprint"), payload.get("backbone")
    if saved is None:
        return
    differing = [name for name, stats in saved.items()
                 if name not in now or not all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for a, b in zip(stats, now[name]))]
    if differing:
        raise ValueError(f"{source} was trained on other frozen weights ({origin}) than the model's: "
                         f"{len(differing)} of {len(saved)} tensors differ, e.g. {differing[:3]}")


def own_state_names_of(payload: Dict[str, Any]) -> list:
    """`own_state_names` of the model a checkpoint was written from."""
    train_cls_proj = VitaCLIPConfig.from_dict(payload["config"]).train_cls_proj
    return [k for k in payload["model"] if is_trainable(k, train_cls_proj) or VITA_ADDITION.search(k)]


def check_saved_architecture(model: VitaCLIP, payload: Dict[str, Any], source: str) -> None:
    """Refuse a model whose architecture differs from the one the checkpoint was trained as."""
    saved = VitaCLIPConfig.from_dict(payload["config"])
    keep_phrase_for_saved_context(saved)  # a context saved with a vector per token of its phrase stands alone
    current = model.config.to_dict()
    if saved.to_dict() != current:
        diff = {k: (v, current.get(k)) for k, v in saved.to_dict().items() if current.get(k) != v}
        hint = ""
        if "n_ctx" in diff and set(diff) <= {"n_ctx", "ctx_init"} and model.config.ctx_init:
            hint = (f" (a context from the phrase {model.config.ctx_init!r} now has one vector per word; this run "
                    f"learned one per token: resume it with ctx_init=None, n_ctx={diff['n_ctx'][0]})")
        raise ValueError(f"{source} is of another architecture (checkpoint, model): {diff}{hint}")


# ---------------------------------------------------------------------------- building models
BACKBONE_SOURCES = {"clip": "name", "pretrained": "path", "official": "path"}  # kind: the key that locates it


def recorded_backbone_source(backbone: Dict[str, Any]) -> Dict[str, Any]:
    """A training run's record of its frozen weights, checked before its first step, as its
    checkpoints keep it: they hold none of those weights, so a source `build_backbone` cannot rebuild
    them from (a mistyped kind, a missing key or file, a random CLIP, a file named relative to the
    folder the run started in) left every checkpoint of the run unloadable, found out on loading one.
    Files are recorded by absolute path, the rest as plain values."""
    kind = backbone.get("kind") if isinstance(backbone, dict) else None
    if kind not in BACKBONE_SOURCES or not backbone.get(BACKBONE_SOURCES[kind]):
        raise ValueError(f"backbone must be None (checkpoints then hold the whole model), {{'kind': 'clip', 'name', "
                         f"'pretrained'}}, {{'kind': 'pretrained', 'path'}} or {{'kind': 'official', 'path'}}; got "
                         f"{backbone!r}")
    if kind == "clip" and not backbone.get("pretrained"):
        raise ValueError(f"backbone {backbone!r} is a randomly initialised CLIP, which cannot be rebuilt: pass "
                         f"backbone=None (checkpoints then hold the whole model)")
    if kind != "clip" and not Path(backbone["path"]).exists():
        raise FileNotFoundError(f"backbone source {backbone['path']} does not exist")
    record = plain_values(backbone)
    if kind != "clip":
        record["path"] = os.path.abspath(record["path"])
    elif os.path.isfile(record["pretrained"]):  # a weights file, not an open_clip tag
        record["pretrained"] = os.path.abspath(record["pretrained"])
    return record


def build_backbone(backbone: Dict[str, Any], classnames: Optional[Sequence[str]], backend: str = "auto",
                   **overrides) -> VitaCLIP:
    """A model whose frozen weights come from a recorded source:
    {"kind": "clip", "name", "pretrained"}, {"kind": "pretrained", "path"}, {"kind": "official", "path"}."""
    kind = backbone.get("kind")
    if kind == "clip":
        model = VitaCLIP.from_clip(backbone["name"], backbone.get("pretrained"), classnames, **overrides)
    elif kind == "official":
        with warnings.catch_warnings():  # a context for other classes: the checkpoint's own replaces it
            warnings.filterwarnings("ignore", message=".*starts afresh")
            model = VitaCLIP.from_official_checkpoint(backbone["path"], classnames, other_classes_fresh=True,
                                                      **overrides)
    elif kind == "pretrained":
        model = VitaCLIP.from_pretrained(backbone["path"], backend=backend)
        if overrides:
            raise ValueError("a saved model's architecture is fixed: no overrides allowed "
                             f"(got {sorted(overrides)})")
        if classnames is not None:  # learned prompts, also where it was saved scoring zero-shot
            train_classes(model, classnames)
    else:
        raise ValueError(f"unknown backbone source {backbone!r}")
    model.set_backend(backend)
    return model


def check_backbone_file_exists(backbone: Dict[str, Any], source: str) -> None:
    """A checkpoint's frozen weights come from a file recorded by absolute path: where it has gone,
    say so, naming both (open_clip takes a missing weights file for an unknown tag, and asks for a
    network; the authors' file would be called a missing checkpoint)."""
    path = backbone.get("pretrained") if backbone.get("kind") == "clip" else backbone.get("path")
    if path and os.path.isabs(path) and not os.path.exists(path):
        raise FileNotFoundError(f"{source} holds none of its frozen weights, which came from {path}: that no "
                                f"longer exists (moved? put it back, or resume the run naming its new place, which "
                                f"later checkpoints record)")


def model_from_checkpoint(payload: Dict[str, Any], source: str, backend: str = "auto") -> VitaCLIP:
    config = VitaCLIPConfig.from_dict(payload["config"])
    keep_phrase_for_saved_context(config)
    classnames = payload["classnames"] or None
    if payload["model_is_full"]:
        model = VitaCLIP(config, classnames, backend=backend)
        load_state_exactly(model, payload["model"], source=source)
    else:
        backbone = payload["backbone"]
        check_backbone_file_exists(backbone, source)
        overrides = {} if backbone.get("kind") == "pretrained" else config.to_dict()
        model = build_backbone(backbone, classnames, backend, **overrides)
        # the source is read as it is now: a saved model folder saved again over, a weights file replaced
        check_saved_architecture(model, payload, source)
        check_backbone_fingerprint(backbone_fingerprint(model), payload, source)
        load_own_state(model, payload["model"], source)
    model.training_data = payload.get("train_data")
    return model


def load_model(path, classnames: Optional[Sequence[str]] = None, backend: str = "auto",
               templates_only: bool = False, for_training: bool = False, **overrides) -> VitaCLIP:
    """Any trained model: a saved model folder (save_pretrained), a vitaclip training checkpoint,
    a run folder (its latest checkpoint) or the authors' checkpoint file (needs `classnames`
    unless `templates_only`: when classes will only be scored with hand-written templates, e.g.
    zero-shot, its learned text context is left out).
    classnames: the classes to score (see `use_classes`). for_training: the model to train from
    (`--init`): the classes get learned prompts, fresh where the model has none, and a file of the
    authors' layout holding only a CLIP backbone is taken; to score, both would mean random prompts
    and are refused.
    `overrides` (VitaCLIPConfig fields) complete the architecture of a file of the authors'
    layout that holds only a CLIP backbone; a trained model refuses any they contradict."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_FILE).is_file():
            model = VitaCLIP.from_pretrained(path, backend=backend)
        else:
            latest = latest_checkpoint(path)
            if latest is None:
                raise FileNotFoundError(f"{path} holds neither a saved model ({CONFIG_FILE}) nor checkpoints")
            model = model_from_checkpoint(load_checkpoint(latest), str(latest), backend)
    elif not path.is_file():
        raise FileNotFoundError(f"model {path} does not exist")
    elif saved_model_holding(path) is not None:
        raise ValueError(f"{path} is a file of the saved model {path.parent}: load the folder {path.parent}")
    else:
        payload = read_training_checkpoint(path)
        if payload is not None:
            model = model_from_checkpoint(payload, str(path), backend)
        else:
            model = VitaCLIP.from_official_checkpoint(path, classnames, learned_context=not templates_only,
                                                      trained_only=not for_training,
                                                      other_classes_fresh=for_training, **overrides)
            model.set_backend(backend)
            return model
    if for_training and overrides.get("train_cls_proj"):  # which weights this run trains, not architecture
        model.config = model.config.replace(train_cls_proj=overrides.pop("train_cls_proj"))
        model.freeze()
    check_architecture(model, overrides, str(path))
    if classnames is not None:
        use_classes(model, classnames, str(path), for_training)
    return model


def use_classes(model: VitaCLIP, classnames: Sequence[str], source: str, for_training: bool = False) -> None:
    """Give a loaded model the classes `classnames`. The classes it scores already stay as they are;
    a model saved scoring its classes with templates (zero-shot) scores others with them too, and
    its learned classes with their learned context; a model with learned prompts takes other names
    into its learned context (a class-specific one only its own classes, in their order).
    for_training: learned prompts whatever the model scored with, fresh where it has none."""
    wanted = [clean_classname(name) for name in classnames]
    learner = model.prompt_learner
    learned = list(learner.classnames) if learner is not None else None
    templates = model.zero_shot_templates
    if not for_training and wanted == model.classnames:
        return
    if templates is not None and not for_training and wanted != learned:
        model.set_classes(classnames, templates=templates)
        return
    if for_training:
        if train_classes(model, classnames):
            differ = (f"its {len(learned)} classes, not these {len(wanted)}" if len(learned) != len(wanted) else
                      f"{len(learned)} classes of other names or order than these")
            warnings.warn(f"{source} has a class-specific context learned for {differ}: it starts afresh for "
                          f"them (its other prompts are kept)")
        return
    if learner is None:
        raise ClassNamesError(f"{source} has no learned text prompts (e.g. a plain CLIP) and no templates to "
                              f"score classes with: score them zero-shot with templates (vitaclip zeroshot, or "
                              f"set_classes(names, templates=...))")
    if wanted == learned and templates is None:
        return
    check_class_order(model, classnames, source)
    model.set_classes(classnames)


def train_classes(model: VitaCLIP, classnames: Sequence[str]) -> bool:
    """Learned prompts for `classnames`, to train: a class-specific context learned for other classes
    (another list, or the same in another order) starts afresh, as does a missing one. Returns
    whether a learned context was replaced."""
    learner = model.prompt_learner
    replaced = (learner is not None and learner.ctx is not None and learner.ctx.dim() == 3
                and [clean_classname(name) for name in classnames] != list(learner.classnames))
    if replaced:
        model.prompt_learner = None  # set_classes makes a new one
    model.set_classes(classnames)
    return replaced


def check_architecture(model: VitaCLIP, overrides: Dict[str, Any], source: str) -> None:
    wanted = model.config.replace(**overrides).to_dict()
    trained = model.config.to_dict()
    clash = {field: (wanted[field], trained[field]) for field in overrides if wanted[field] != trained[field]}
    if clash:
        raise ValueError(f"{source} is a trained model: its architecture cannot change, but settings contradict "
                         f"it (given, trained): {clash}")


def check_class_order(model: VitaCLIP, classnames: Sequence[str], source: str) -> None:
    """A class-specific context is learned per class: the same number of other or reordered
    class names would silently score each class with another class's context."""
    learner = model.prompt_learner
    if learner is None or learner.ctx is None or learner.ctx.dim() != 3 or len(classnames) != len(learner.classnames):
        return  # nothing learned per class, or another number of classes, which the prompt learner refuses
    given = [clean_classname(n) for n in classnames]
    for position, (trained, name) in enumerate(zip(learner.classnames, given)):
        if name != trained:
            raise ClassNamesError(f"{source} has a context learned for each of its classes, in its order, but "
                                  f"class {position} is {name!r} here and {trained!r} there: give its class list")
