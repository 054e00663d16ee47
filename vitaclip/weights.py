"""Loading and saving weights: open_clip CLIP models, the authors' checkpoints, our own format.

Kept apart from the model: the model only knows its own (the authors') key layout.
"""
from __future__ import annotations

import difflib
import errno
import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import __version__
from .config import VitaCLIPConfig
from .errors import ClassNamesError, WeightsUnavailable
from .files import atomic_write_text, remove_unfinished_writes, save_safetensors
from .model import VitaCLIP
from .text import (PLACEHOLDER, class_prompts, clean_classname, get_tokenizer, keep_phrase_for_saved_context,
                   string_list, tokenize)

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CLASSES_FILE = "classnames.json"  # the learned context's classes
# the classes scored zero-shot, with their templates: only for a model switched to them
ZERO_SHOT_FILE = "zero_shot.json"
TRAINING_DATA_FILE = "training_data.json"  # VitaCLIP.training_data, where train() set it
SAVED_FILES = (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE, ZERO_SHOT_FILE, TRAINING_DATA_FILE)
# Keys of the authors' model that a converted CLIP backbone file does not hold: the Vita-CLIP
# additions (prompts, summary modules, cls_proj, time embedding, text context, logit scale).
VITA_ADDITION = re.compile(r"(summary|local_prompts|global_prompts|time_embed|cls_proj|prompt_learner|logit_scale)")
IGNORED_OFFICIAL_KEYS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")
# their prompt learner's embedded prompt after the context ([n_classes, L, width]): not loaded, but
# it tells the classes a class-specific context was learned for
OFFICIAL_CLASS_TOKENS = "prompt_learner.token_suffix"


def saved_model_holding(path) -> Optional[Path]:
    """The saved model's folder (save_pretrained) whose file `path` is (its weights or a .json), else None: such
    a file is no model of its own (its weights file would be read as the authors' checkpoint)."""
    file = Path(path)
    folder = file.parent
    if (file.is_file() and (file.name == WEIGHTS_FILE or file.suffix == ".json") and (folder / CONFIG_FILE).is_file()
            and (folder / WEIGHTS_FILE).is_file()):
        return folder
    return None


def is_trained_checkpoint(state: Dict[str, Tensor]) -> bool:
    """A trained Vita-CLIP model rather than a converted CLIP backbone: told by the vision additions
    (prompts, summary modules, cls_proj, time embedding), as a backbone may hold CLIP's logit_scale."""
    return any(k.startswith("visual.") and VITA_ADDITION.search(k) for k in state)


# ---------------------------------------------------------------------------- state-dict checks
def load_state_exactly(model: VitaCLIP, state: Dict[str, Tensor], allow_missing=lambda key: False,
                       source: str = "checkpoint") -> None:
    """load_state_dict that names every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in state and not allow_missing(k))
    unexpected = sorted(k for k in state if k not in expected)
    mismatched = sorted(f"{k}: {tuple(state[k].shape)} in {source}, {tuple(expected[k].shape)} in the model"
                        for k in state if k in expected and state[k].shape != expected[k].shape)
    raise_problems(f"{source} does not fit this VitaCLIP architecture",
                   {"missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched})
    model.load_state_dict(state, strict=False)


PROBLEMS_SHOWN = 8  # per kind: a checkpoint of another model size misses hundreds of keys


def raise_problems(what: str, problems: Dict[str, list]) -> None:
    """A ValueError `what: label [items]; ...` for every non-empty list of problems, each cut to its
    first PROBLEMS_SHOWN items and a count."""
    found = [f"{label} {items}" if len(items) <= PROBLEMS_SHOWN else
             f"{len(items)} {label} {items[:PROBLEMS_SHOWN]} and {len(items) - PROBLEMS_SHOWN} more"
             for label, items in problems.items() if items]
    if found:
        raise ValueError(f"{what}: " + "; ".join(found))


# ---------------------------------------------------------------------------- open_clip
def _names_a_file(pretrained: str) -> bool:
    """Whether `pretrained` reads as a path rather than an open_clip tag (those have no folder or suffix)."""
    return "/" in pretrained or os.sep in pretrained or Path(pretrained).suffix in (".pt", ".pth", ".bin",
                                                                                  ".safetensors")


def load_from_clip(cls, name: str, pretrained: Optional[str], classnames: Optional[Sequence[str]],
                   plain: bool = False, **overrides) -> VitaCLIP:
    """A VitaCLIP whose frozen backbone comes from an open_clip CLIP model.

    `name` is an open_clip model name (e.g. "ViT-B-16-quickgelu"), `pretrained` a tag
    ("openai", "laion2b_s34b_b88k", ...) or a local checkpoint file. Tags of weights trained with
    QuickGELU (OpenAI's, and every tag open_clip's pretrained table marks so: DFN, MetaCLIP, ...)
    get it whatever the model name says; a local file cannot tell, so the name decides: OpenAI
    weights saved to a file need a "-quickgelu" name (a warning says so for a GELU model from a file).
    `plain`: CLIP itself, as open_clip scores frames (averaged over them): no prompts, a zero time
    embedding and CLIP's own logit scale.
    """
    if plain:
        overrides.update(use_global=False, use_local=False, use_summary=False)
    pretrained = pretrained or None  # "" means random weights, as on the command line
    import open_clip

    tag_config = open_clip.get_pretrained_cfg(builtin_model_name(name), str(pretrained)) if pretrained else {}
    is_openai = pretrained is not None and str(pretrained).lower() == "openai"
    force_quick_gelu = bool(tag_config.get("quick_gelu")) or is_openai
    check_open_clip_tokenizer(name)  # before create_model: no download for a model that is refused
    if pretrained is not None and not tag_config and _names_a_file(str(pretrained)) and not Path(pretrained).is_file():
        # (open_clip's word for it is "not a known tag or valid file path", and ours was about networks)
        raise FileNotFoundError(f"CLIP weights file {pretrained} does not exist")
    try:
        clip = open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=force_quick_gelu,
                                      require_pretrained=pretrained is not None)
    except RuntimeError as err:
        if pretrained is None:
            raise
        # open_clip's own error ends a chain of download errors (tracebacks of every retry)
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise WeightsUnavailable(f"open_clip could not load the {pretrained!r} weights of {name!r} ({reason}); a "
                                 f"tag open_clip knows is downloaded the first time, which needs a network: offline, "
                                 f"give a weights file (or '' / None for random weights)") from err
    config = config_from_open_clip(clip, **overrides)
    if pretrained is not None and Path(pretrained).is_file() and config.act != "quick_gelu":
        warnings.warn(f"{name!r} from the file {pretrained} uses GELU; if these are OpenAI's (or other "
                      f"QuickGELU-trained) weights, load them with the name {name}-quickgelu", stacklevel=3)
    state = convert_open_clip_state(clip.state_dict(), config.layers, config.text_layers)
    model = cls(config)
    load_state_exactly(model, state, allow_missing=lambda k: VITA_ADDITION.search(k) is not None,
                       source=f"open_clip model {name!r}")
    if plain:
        with torch.no_grad():
            model.visual.time_embed.zero_()
            model.logit_scale.copy_(clip.logit_scale)
    if classnames is not None:  # after the weights: a ctx_init phrase is embedded with CLIP's token embedding
        model.set_classes(classnames)
    return model


def builtin_model_name(name: str) -> str:
    """`name` as open_clip's built-in tables spell it: create_model takes "ViT-B/16" for "ViT-B-16"
    (a name with a schema, such as "hf-hub:org/repo", is not built-in and stays as it is)."""
    return name if ":" in name else name.replace("/", "-")


def check_open_clip_tokenizer(name: str) -> None:
    """Vita-CLIP tokenizes with CLIP's BPE tokenizer: refuse models whose config asks for another,
    and names open_clip has no config for (with the closest it has)."""
    import open_clip

    model_config = open_clip.get_model_config(builtin_model_name(name))
    if model_config is None and ":" not in name:  # (a schema, e.g. hf-hub:, brings its own config)
        close = difflib.get_close_matches(builtin_model_name(name), open_clip.list_models(), n=3, cutoff=0.5)
        raise ValueError(f"open_clip has no model {name!r}" + (f" (closest: {', '.join(close)})" if close else "")
                         + "; open_clip.list_models() lists them")
    text_config = (model_config or {}).get("text_cfg", {})
    if text_config.get("hf_tokenizer_name") or text_config.get("tokenizer_kwargs"):
        raise ValueError(f"open_clip model {name!r} uses another tokenizer than CLIP's (its text_cfg sets "
                         f"hf_tokenizer_name or tokenizer_kwargs); Vita-CLIP tokenizes with CLIP's")


def activation_name(module: torch.nn.Module) -> Optional[str]:
    """The config's name of an open_clip MLP activation; None for one Vita-CLIP does not implement."""
    from open_clip.transformer import QuickGELU

    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if type(module) is torch.nn.GELU and module.approximate == "none":
        return "gelu"
    return None


def unsupported_open_clip_features(clip) -> List[str]:
    """What an open_clip CLIP computes that Vita-CLIP's towers do not, without weights that would
    betray it: such a model would load and give other features."""
    from open_clip.transformer import LayerScale

    visual = clip.visual
    found = []
    if any(isinstance(m, LayerScale) for m in clip.modules()):
        found.append("LayerScale (ls_init_value)")
    if isinstance(visual.ln_pre, torch.nn.Identity):
        found.append("no LayerNorm before the vision transformer (no_ln_pre)")
    if visual.pool_type != "tok":
        found.append(f"vision pool_type {visual.pool_type!r} (Vita-CLIP reads the class token: 'tok')")
    if visual.final_ln_after_pool:
        found.append("vision final_ln_after_pool")
    if clip.text_pool_type != "argmax":
        found.append(f"text pool_type {clip.text_pool_type!r} (Vita-CLIP reads the end-of-text token: 'argmax')")
    if clip.attn_mask is None:
        found.append("a text transformer without causal mask (no_causal_mask)")
    activations = [b.mlp.gelu for b in (*visual.transformer.resblocks, *clip.transformer.resblocks)]
    names = {activation_name(a) for a in activations}
    if None in names or len(names) > 1:
        found.append(f"MLP activations {sorted({repr(a) for a in activations})} (Vita-CLIP has QuickGELU "
                     f"or exact GELU, the same in both towers)")
    eps = {m.eps for m in clip.modules() if isinstance(m, torch.nn.LayerNorm)}
    if eps != {1e-5}:
        found.append(f"LayerNorm eps {sorted(eps)} (Vita-CLIP's is 1e-5)")
    return found


def config_from_open_clip(clip, **overrides) -> VitaCLIPConfig:
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    if type(clip) is not CLIP or not isinstance(clip.visual, VisionTransformer):
        raise ValueError(f"only open_clip CLIP models with a ViT image tower and CLIP text tower are "
                         f"supported, got {type(clip).__name__} with {type(clip.visual).__name__}")
    visual, blocks = clip.visual, clip.visual.transformer.resblocks
    if getattr(visual, "attn_pool", None) is not None or not isinstance(visual.proj, torch.nn.Parameter):
        raise ValueError("open_clip vision towers with attentional pooling or a linear projection "
                         "are not Vita-CLIP backbones")
    unsupported = unsupported_open_clip_features(clip)
    if unsupported:
        raise ValueError("the open_clip model uses what Vita-CLIP does not implement: " + "; ".join(unsupported))
    image_size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    found = dict(
        image_size=int(image_size),
        patch_size=int(visual.conv1.kernel_size[0]),
        width=int(visual.conv1.out_channels),
        layers=len(blocks),
        heads=int(blocks[0].attn.num_heads),
        mlp_ratio=blocks[0].mlp.c_fc.out_features / visual.conv1.out_channels,
        embed_dim=int(visual.proj.shape[1]),
        context_length=int(clip.positional_embedding.shape[0]),
        vocab_size=int(clip.token_embedding.num_embeddings),
        text_width=int(clip.token_embedding.embedding_dim),
        text_layers=len(clip.transformer.resblocks),
        text_heads=int(clip.transformer.resblocks[0].attn.num_heads),
        act=activation_name(blocks[0].mlp.gelu),
    )
    clash = {k: (v, found[k]) for k, v in overrides.items() if k in found and v != found[k]}
    if clash:
        raise ValueError(f"overrides contradict the CLIP weights (given, found): {clash}")
    return VitaCLIPConfig(**{**found, **overrides})


# open_clip's names of a layer's tensors (text and vision alike) besides the fused in_proj, and the
# authors' vision names for them; their text layers keep open_clip's names
OPEN_CLIP_BLOCK_RENAMES = {"attn.out_proj": "attn.out_proj", "ln_1": "norm1", "ln_2": "norm2",
                           "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
OPEN_CLIP_TEXT_TENSORS = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                          "text_projection")


def convert_open_clip_state(sd: Dict[str, Tensor], layers: int, text_layers: int) -> Dict[str, Tensor]:
    """open_clip CLIP keys -> the authors' keys (patch bias zero: CLIP's conv has none). Every tensor
    of the two towers must find its place: one left over belongs to a feature Vita-CLIP does not
    compute, and dropping it would change the features silently."""
    renames = {"visual.conv1.weight": "visual.patch_embed.proj.weight", "visual.class_embedding": "visual.cls_token",
               "visual.positional_embedding": "visual.pos_embed", "visual.proj": "visual.proj"}
    renames.update({f"visual.{ln}.{p}": f"visual.{ln}.{p}" for ln in ("ln_pre", "ln_post") for p in ("weight", "bias")})
    renames.update({k: f"textual.{k}" for k in OPEN_CLIP_TEXT_TENSORS})
    fused_qkv = {}  # open_clip's in_proj tensor -> the authors' q, k, v tensors
    for i in range(layers):
        src, dst = f"visual.transformer.resblocks.{i}.", f"visual.blocks.{i}."
        for p in ("weight", "bias"):
            fused_qkv[f"{src}attn.in_proj_{p}"] = [f"{dst}attn.{n}.{p}" for n in ("q_proj", "k_proj", "v_proj")]
            renames.update({f"{src}{a}.{p}": f"{dst}{b}.{p}" for a, b in OPEN_CLIP_BLOCK_RENAMES.items()})
    for i in range(text_layers):
        src = f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            for name in (f"attn.in_proj_{p}", *(f"{a}.{p}" for a in OPEN_CLIP_BLOCK_RENAMES)):
                renames[src + name] = f"textual.{src}{name}"
    needed = {*renames, *fused_qkv}
    missing = sorted(needed - set(sd))
    unused = sorted(set(sd) - needed - {"logit_scale"})  # CLIP's logit scale: Vita-CLIP starts its own (SPEC)
    raise_problems("the open_clip model does not convert to Vita-CLIP",
                   {"tensors of features Vita-CLIP does not implement": unused, "missing tensors": missing})
    out = {dst: sd[src] for src, dst in renames.items()}
    for src, dsts in fused_qkv.items():
        out.update(zip(dsts, sd[src].chunk(3)))
    conv = sd["visual.conv1.weight"]
    out["visual.patch_embed.proj.bias"] = torch.zeros(conv.shape[0], dtype=conv.dtype)
    return out


# ---------------------------------------------------------------------------- the authors' files
def read_torch_file(path):
    """torch.load on the CPU, tensors and plain containers only, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as err:
        if err.errno == errno.EINVAL:  # PyTorch's zip reader seeking past the end of a cut-off file
            raise ValueError(f"cannot read checkpoint {path}: cut off or damaged ({err})") from err
        raise  # the disk, not the file: raised as it is (not unreadable)
    except MemoryError:
        raise
    except pickle.UnpicklingError as err:  # PyTorch's advice (load it unsafely, file an issue) is not ours
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", str(err))
        reason = found.group(1).strip() if found else str(err).splitlines()[0]
        hint = ("; a whole model saved by torch.save(model)? save it with model.save_pretrained(DIR) and give DIR"
                if "vitaclip." in reason else "")
        raise ValueError(f"cannot read checkpoint {path}: not a file of tensors and plain containers "
                         f"({reason}){hint}") from err
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same to the user
        raise ValueError(f"cannot read checkpoint {path}: damaged or no PyTorch file ({type(err).__name__}: "
                         f"{err})") from err  # (e.g. a few bytes of text: KeyError and a number alone)


def read_official_state(path) -> Tuple[Dict[str, Tensor], Optional[Tensor]]:
    """The model's state dict without `module.` prefixes and the prompt buffers, and their
    OFFICIAL_CLASS_TOKENS where the file has them."""
    obj = read_torch_file(path)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds neither a training checkpoint with a 'model' dict nor a state dict")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    class_tokens = state.get(OFFICIAL_CLASS_TOKENS)
    state = {k: v for k, v in state.items() if k not in IGNORED_OFFICIAL_KEYS}
    # the authors' model keeps empty tensors for 0 text prompts or 0 global prompts: none here
    for key in ("prompt_learner.ctx", "visual.global_prompts"):
        if key in state and state[key].numel() == 0:
            del state[key]
    return state, class_tokens


def learned_for_other_classes(path, state: Dict[str, Tensor], class_tokens: Optional[Tensor],
                              classnames: Sequence[str], config: VitaCLIPConfig) -> Optional[Tuple[str, str]]:
    """None where the authors' class-specific context was learned for `classnames`, in their order;
    else (what it was learned for, the error refusing it for them). Their `class_tokens` embed each
    class's prompt "X X ... X <name>." after the context (their code never initialises a
    class-specific context from a phrase), so the same number of other or reordered names is told."""
    learned, classnames = state["prompt_learner.ctx"].shape[0], string_list(classnames, "class names")
    if len(classnames) != learned:
        return (f"{learned} classes, not these {len(classnames)}",
                f"{path} has a class-specific context for {learned} classes, got {len(classnames)} class names")
    if class_tokens is None:
        return None
    n_ctx = config.n_ctx
    prompts = class_prompts(" ".join([PLACEHOLDER] * n_ctx), [clean_classname(name) for name in classnames])
    expected = state["textual.token_embedding.weight"][tokenize(prompts, config.context_length)[:, 1 + n_ctx:]]
    if expected.shape != class_tokens.shape:  # not what their prompt learner makes: nothing to tell by
        return None
    # embedded with the same frozen token embedding; a tolerance for a file cast in part (bf16's
    # rounding), far below the difference between two tokens' embeddings
    same = torch.isclose(expected.float(), class_tokens.float(), rtol=1e-2, atol=1e-6).flatten(1).all(dim=1).tolist()
    unlike = [i for i, ok in enumerate(same) if not ok]
    if not unlike:
        return None
    theirs = _spelt_class(state["textual.token_embedding.weight"], class_tokens[unlike[0]])
    return (f"other classes than these {len(classnames)} (or in another order)",
            f"{path} has a context learned for each of its classes, in its order, but class {unlike[0]} is "
            f"{clean_classname(classnames[unlike[0]])!r} here and {theirs!r} there (as CLIP's tokenizer reads "
            f"it back; {len(unlike)} of {len(classnames)} differ): give its class list")


def _spelt_class(token_embedding: Tensor, prompt: Tensor) -> str:
    """The class name a class's embedded prompt [L, width] after the context ("<name>." and the end
    of text) spells: each row's nearest token, read back by the tokenizer (lower case, spaced)."""
    tokenizer = get_tokenizer()
    ids = torch.cdist(prompt.float(), token_embedding.float()).argmin(dim=1).tolist()
    ids = ids[:ids.index(tokenizer.eot_token_id)] if tokenizer.eot_token_id in ids else ids
    return tokenizer.decode(ids).strip().removesuffix(".").strip()


# attention heads by width, which shapes cannot tell: open_clip's CLIP towers (64 wide but in
# ViT-H/14, ViT-g/14 and ViT-bigG/14's vision towers)
CLIP_VISION_HEADS = {384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}
CLIP_TEXT_HEADS = {512: 8, 768: 12, 1024: 16, 1280: 20}


def clip_heads(table: Dict[int, int], width: int, key: str) -> int:
    if width not in table:
        raise ValueError(f"no CLIP has a {'text' if key == 'text_heads' else 'vision'} width of {width}, and the "
                         f"number of attention heads cannot be read off the shapes: pass {key}=... "
                         f"(--{key.replace('_', '-')} on the command line)")
    return table[width]


def config_from_official_state(state: Dict[str, Tensor], source: str = "checkpoint", **overrides) -> VitaCLIPConfig:
    """Read the architecture off the tensor shapes (SPEC); what shapes cannot tell comes from
    `overrides` (heads default to those of the CLIP of that width). `source` names the state in
    errors (the file it came from)."""
    def shape(key):
        if key not in state:
            raise ValueError(f"{source} lacks {key!r}: not a Vita-CLIP/CLIP checkpoint in the authors' layout")
        return state[key].shape

    def count_layers(prefix, tower):
        indices = [int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))]
        if not indices:
            raise ValueError(f"{source} has no {tower} layers (no '{prefix}<i>.*' keys): not a full "
                             f"Vita-CLIP/CLIP checkpoint in the authors' layout")
        return 1 + max(indices)

    width, _, patch, _ = shape("visual.patch_embed.proj.weight")
    grid = math.isqrt(shape("visual.pos_embed")[0] - 1)
    layers = count_layers("visual.blocks.", "vision")
    text_layers = count_layers("textual.transformer.resblocks.", "text")
    vocab, text_width = shape("textual.token_embedding.weight")
    found = dict(
        image_size=grid * patch, patch_size=patch, width=width, layers=layers,
        mlp_ratio=shape("visual.blocks.0.mlp.fc1.weight")[0] / width,
        embed_dim=shape("visual.proj")[1], context_length=shape("textual.positional_embedding")[0],
        vocab_size=vocab, text_width=text_width, text_layers=text_layers,
    )
    if is_trained_checkpoint(state):
        found.update(
            num_frames=shape("visual.time_embed")[0],
            use_summary="visual.blocks.0.summary_attn_layer.q_proj.weight" in state,
            use_local="visual.blocks.0.local_prompts" in state,
            use_global="visual.global_prompts" in state,
        )
        if found["use_global"]:
            found["num_global_prompts"] = shape("visual.global_prompts")[1]
        ctx = state.get("prompt_learner.ctx")
        found.update(n_ctx=0 if ctx is None else ctx.shape[-2], csc=ctx is not None and ctx.dim() == 3)
    settable = {"heads", "text_heads", "act", "ctx_position", "ctx_init", "train_cls_proj"}
    clash = {k: (v, found[k]) for k, v in overrides.items() if k in found and k not in settable and v != found[k]}
    if clash:
        raise ValueError(f"overrides contradict the shapes of {source} (given, found): {clash}")
    for key, table, tower_width in (("heads", CLIP_VISION_HEADS, width), ("text_heads", CLIP_TEXT_HEADS, text_width)):
        if key not in overrides:
            found[key] = clip_heads(table, tower_width, key)
    return VitaCLIPConfig(**{**found, **overrides})


def load_official_checkpoint(cls, path, classnames: Optional[Sequence[str]], learned_context: bool = True,
                             trained_only: bool = False, other_classes_fresh: bool = False,
                             **overrides) -> VitaCLIP:
    """The authors' training checkpoint (`model` dict, `module.` prefixes) or converted backbone file
    (loaded non-strictly as their code does: fresh prompts, and CLIP's logit_scale if it holds one).
    learned_context=False leaves the learned text context out (no class names needed): for
    scoring classes with hand-written templates only. trained_only: refuse a backbone file (its
    prompts would be random), as scoring with it would be meaningless. other_classes_fresh: a
    class-specific context learned for other classes (another number, or other names or order, as
    the file's prompt buffers tell) starts afresh (to train on other classes) instead of being refused."""
    state, class_tokens = read_official_state(path)
    if "visual.conv1.weight" in state:  # open_clip's (OpenAI's) layout: only from_clip converts it
        raise ValueError(f"{path} holds an open_clip CLIP's weights, not a Vita-CLIP checkpoint: give it as the "
                         f"frozen CLIP's weights (--pretrained FILE with --clip naming its model; "
                         f"VitaCLIP.from_clip(name, FILE) in Python)")
    if not learned_context:
        state.pop("prompt_learner.ctx", None)
    # first: it refuses a file of another model, which is no CLIP backbone to train from either
    config = config_from_official_state(state, source=str(path), **overrides)
    if trained_only and not is_trained_checkpoint(state):
        raise ValueError(f"{path} holds a CLIP backbone only, no trained Vita-CLIP prompts: train from it "
                         f"(vitaclip train --init), or score CLIP itself zero-shot (vitaclip zeroshot without "
                         f"--model, VitaCLIP.plain_clip)")
    ctx = state.get("prompt_learner.ctx")
    if ctx is not None and classnames is None:
        raise ValueError(f"{path} holds a learned text context: pass the class names it was trained with")
    differ = ctx is not None and ctx.dim() == 3 and learned_for_other_classes(path, state, class_tokens, classnames,
                                                                              config)
    if differ:
        learned_for, refusal = differ
        if not other_classes_fresh:
            raise ClassNamesError(refusal)
        warnings.warn(f"{path} has a class-specific context learned for {learned_for}: it starts afresh for "
                      f"them (its other prompts are kept)")
        del state["prompt_learner.ctx"]  # the architecture (n_ctx, csc) stays the file's
        ctx = None
    # a learned context is loaded over the prompt learner's; without one the classes come after the
    # weights, so that a ctx_init phrase is embedded with the file's token embedding
    model = cls(config, classnames if ctx is not None else None)
    is_backbone = not is_trained_checkpoint(state)
    load_state_exactly(model, state, source=str(path),
                       allow_missing=lambda k: is_backbone and VITA_ADDITION.search(k) is not None)
    if ctx is None and classnames is not None:
        model.set_classes(classnames)
    return model


# ---------------------------------------------------------------------------- our own format
def save_pretrained(model: VitaCLIP, directory) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in SAVED_FILES:  # an earlier save here that was killed midway
        remove_unfinished_writes(directory / name)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    learner = model.prompt_learner
    classnames = learner.classnames if learner is not None else []
    # which release wrote them, for whoever gets the folder (safe_open(...).metadata() reads it)
    written_by = {"format": "pt", "vitaclip": __version__}
    save_safetensors(state, directory / WEIGHTS_FILE, metadata=written_by)
    atomic_write_text(directory / CONFIG_FILE, model.config.to_json())
    atomic_write_text(directory / CLASSES_FILE, json.dumps(classnames, indent=1))
    templates = model.zero_shot_templates
    if templates is None:  # one from an earlier save here would switch the reloaded model's classes
        (directory / ZERO_SHOT_FILE).unlink(missing_ok=True)
    else:
        zero_shot = {"classnames": model.classnames, "templates": templates}
        atomic_write_text(directory / ZERO_SHOT_FILE, json.dumps(zero_shot, indent=1))
    if model.training_data is None:  # nor an earlier save's record of another model's training
        (directory / TRAINING_DATA_FILE).unlink(missing_ok=True)
    else:
        atomic_write_text(directory / TRAINING_DATA_FILE, json.dumps(_finite_json(model.training_data), indent=1))


def load_pretrained(cls, directory, backend: str = "auto") -> VitaCLIP:
    from safetensors.torch import load_file

    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"{directory} does not exist")
    for name in (WEIGHTS_FILE, CONFIG_FILE, CLASSES_FILE):
        if not (directory / name).is_file():  # a checkpoint or run folder given here, perhaps
            raise FileNotFoundError(f"{directory} is not a saved VitaCLIP: {name} is missing (vitaclip.load_model "
                                    "also reads training checkpoints, run folders and the authors' checkpoints)")
    config = VitaCLIPConfig.from_dict(_read_json(directory / CONFIG_FILE))
    keep_phrase_for_saved_context(config)
    classnames = _read_json(directory / CLASSES_FILE) or None
    model = cls(config, classnames, backend=backend)
    try:
        state = load_file(directory / WEIGHTS_FILE)
    except Exception as err:  # noqa: BLE001 - safetensors' own error types name no file
        raise ValueError(f"cannot read {directory / WEIGHTS_FILE} (cut short, or not a safetensors file?): "
                         f"{err}") from err
    load_state_exactly(model, state, source=str(directory / WEIGHTS_FILE))
    if (directory / ZERO_SHOT_FILE).is_file():  # their text features come from the loaded weights
        zero_shot = _read_json(directory / ZERO_SHOT_FILE)
        model.set_classes(zero_shot["classnames"], templates=zero_shot["templates"])
    if (directory / TRAINING_DATA_FILE).is_file():
        model.training_data = _read_json(directory / TRAINING_DATA_FILE)
    return model


def _finite_json(value):
    """`value` with each non-finite float written as its name ('inf', '-inf', 'nan'): strict JSON
    readers (jq, JavaScript, Go) refuse Python's Infinity, which a uniform RandAugment magnitude
    (mstd above 100) records."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_json(item) for item in value]
    return value


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"cannot read {path}: not JSON ({err})") from err
