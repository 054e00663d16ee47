"""VitaCLIP: video encoder + text encoder + prompt learner + logit scale (SPEC)."""
from __future__ import annotations

import math
import weakref
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends import check_backend_name, resolve_backend
from .config import VitaCLIPConfig
from .graphs import GraphCache, tensor_states
from .text import (PromptLearner, TextEncoder, check_templates, clean_classname, phrase_words, string_list, tokenize,
                   zero_shot_tokens)
from .vision import VisionTransformer, autocast_dtype, autocast_off

# Substrings of the vision parameters the public code trains (SPEC: "what trains").
TRAINABLE_VISION_KEYS = ("summary", "local", "global", "time_embed")

DEFAULT_TEMPLATES = ("a video of a person {}.",)


def at_least_fp32(t: Tensor) -> Tensor:
    """t in float32, or kept in its own dtype where that is wider (a float64 model computes in float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# A cache of text features: (key of the tensors' states, features, copies of the tensors that train,
# weak references to the tensors the key was made of)
TextCache = Tuple[tuple, Tensor, List[Tensor], List[weakref.ref]]


def refreshed(cache: Optional[TextCache], key: tuple, tensors: List[Tensor], compute) -> TextCache:
    """`cache`, or compute()'s features cached anew where the key differs, a tensor is another object
    than the one cached from, or a tensor that trains holds other values than its copy (fused
    optimizers, AdamW(fused=True), update them in place without bumping the version counters the key
    holds). The key's addresses alone do not tell tensors apart: a tensor freed after its pass (a
    candidate given to torch.func.functional_call) leaves its memory, version 0, to the next one."""
    trained = [t for t in tensors if t.requires_grad]
    if (cache is not None and cache[0] == key and len(cache[2]) == len(trained)
            and len(cache[3]) == len(tensors) and all(ref() is t for ref, t in zip(cache[3], tensors))
            and all(torch.equal(copy, t) for copy, t in zip(cache[2], trained))):
        return cache
    # normal tensors even when made under inference_mode: a training forward, or the caller's own
    # autograd graph, may read them later (compute() runs without gradients either way)
    with torch.inference_mode(False), torch.no_grad():
        return key, compute(), [t.detach().clone() for t in trained], [weakref.ref(t) for t in tensors]


def is_trainable(name: str, train_cls_proj: bool = False) -> bool:
    """Whether the public code trains the parameter `name` (a key of the model's state dict)."""
    if name.startswith("visual."):
        return any(k in name for k in TRAINABLE_VISION_KEYS) or (train_cls_proj and ".cls_proj." in name)
    return name in ("prompt_learner.ctx", "logit_scale")


class VitaCLIP(nn.Module):
    """Vita-CLIP video classifier.

    `model(video)` gives logits [B, n_classes] for a normalised video [B, 3, T, H, W];
    T may be any multiple of the training frame count T0 (SPEC).
    """

    def __init__(self, config: Optional[VitaCLIPConfig] = None, classnames: Optional[Sequence[str]] = None,
                 backend: str = "auto"):
        super().__init__()
        if config is not None and not isinstance(config, VitaCLIPConfig):
            raise TypeError(f"config must be a VitaCLIPConfig (e.g. VitaCLIPConfig.preset('ViT-B/16')), got "
                            f"{type(config).__name__}")
        self.config = (config or VitaCLIPConfig()).replace()  # own copy: the prompt learner may fix n_ctx
        if self.config.ctx_init:  # one context vector per word of the phrase (SPEC), classes set or not yet
            self.config.n_ctx = phrase_words(self.config.ctx_init)
        check_backend_name(backend)
        self.backend = backend
        self.visual = VisionTransformer(self.config)
        self.textual = TextEncoder(self.config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.prompt_learner: Optional[PromptLearner] = None
        self._fixed_classnames: Optional[List[str]] = None
        self._fixed_templates: Optional[List[str]] = None
        self._fixed_text: Optional[TextCache] = None  # the zero-shot classes' (key: the text tower's state)
        self._text_cache: Optional[TextCache] = None  # the learned classes'
        self._graphs = GraphCache()
        # what `train` trained it on (the loader's description: frame stride, ...), kept by save_pretrained
        # and in checkpoints, so that scoring samples clips as training did
        self.training_data: Optional[Dict[str, Any]] = None
        if classnames is not None:
            self.set_classes(classnames)
        self.freeze()

    # ---------------------------------------------------------------- parameters
    def freeze(self) -> None:
        """Freeze the CLIP backbone; only the public code's trainable set keeps requires_grad."""
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name, self.config.train_cls_proj))

    def named_trainable_parameters(self) -> Iterator[Tuple[str, nn.Parameter]]:
        for name, p in self.named_parameters():
            if is_trainable(name, self.config.train_cls_proj):
                yield name, p

    def trainable_parameters(self) -> List[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        # PyTorch would report a learned context as an unexpected key, without the fix
        if strict and self.prompt_learner is None and "prompt_learner.ctx" in state_dict:
            raise RuntimeError("the state dict holds a learned text context (prompt_learner.ctx) but the model has "
                               "no classes to hold it: build it with its class names (VitaCLIP(config, classnames)) "
                               "or call set_classes(classnames) before loading")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getstate__(self):
        # pickled (torch.save(model), a copy): without the cached text features, whose weak references
        # do not pickle and whose keys name this process's memory; the copy remakes them
        state = self.__dict__.copy()
        state["_text_cache"] = state["_fixed_text"] = None
        return state

    # ---------------------------------------------------------------- backends
    def _apply(self, fn, *args, **kwargs):
        # a .to(), .cuda() or .half() that gives tensors new memory ends the captured CUDA graphs:
        # they read addresses and hold no reference (a .to() that changes nothing keeps them)
        def addresses():
            return [t.data_ptr() for t in (*self.parameters(), *self.buffers())]

        before = addresses()
        module = super()._apply(fn, *args, **kwargs)
        if addresses() != before:
            self._graphs.clear()
        return module

    def set_backend(self, name: str) -> None:
        check_backend_name(name)
        self.backend = name

    # ---------------------------------------------------------------- classes and text
    @property
    def classnames(self) -> List[str]:
        if self._fixed_classnames is not None:
            return list(self._fixed_classnames)
        if self.prompt_learner is not None:
            return list(self.prompt_learner.classnames)
        return []

    @property
    def zero_shot_templates(self) -> Optional[List[str]]:
        """The templates the current classes are scored with zero-shot; None with the learned context."""
        return None if self._fixed_templates is None else list(self._fixed_templates)

    def set_classes(self, classnames: Sequence[str], templates: Optional[Sequence[str]] = None) -> None:
        """Switch the label set.

        Without templates the learned context is used (a class-specific context only fits its
        own number of classes). With templates (e.g. "a video of a person {}.") the classes are
        scored zero-shot against hand-written prompts, averaged over the templates.
        """
        classnames = string_list(classnames, "class names")
        if self.logit_scale.is_meta:  # built under `with torch.device("meta")`
            raise ValueError("class prompts cannot be made on the meta device (their tokens come from the class "
                             "names, not from saved weights): build the model on the CPU or GPU, or without class "
                             "names and set them after model.to_empty(device=...)")
        self._text_cache = None
        self._graphs.clear("text")  # passes of the old classes: their memory goes now, not at eviction
        if templates is not None:
            templates = check_templates(templates)
            self._fixed_text = refreshed(None, self._text_tower_state(), list(self.textual.parameters()),
                                         lambda: self._fixed_text_features(classnames, templates))
            self._fixed_classnames = [clean_classname(n) for n in classnames]
            self._fixed_templates = templates
            return
        if self.prompt_learner is None:
            self.prompt_learner = PromptLearner(self.config, self.textual.token_embedding, classnames)
            # the model's device and dtype (one cast with .half() or .double() before its classes were set)
            self.prompt_learner.to(self.logit_scale.device, self.logit_scale.dtype)
            # the new context alone: the rest keeps what the caller may have frozen or unfrozen
            for name, p in self.prompt_learner.named_parameters(prefix="prompt_learner"):
                p.requires_grad_(is_trainable(name, self.config.train_cls_proj))
        else:
            self.prompt_learner.set_classes(classnames)  # refuses before changing anything
        # once the learned classes are set: a refused class list leaves the zero-shot ones in place
        self._fixed_text = None
        self._fixed_classnames = None
        self._fixed_templates = None

    def encode_text(self, texts: Optional[Sequence[str]] = None, truncate: bool = True) -> Tensor:
        """Text features [n, D] (before normalisation): of the learned class prompts when `texts`
        is None, else of the given hand-written texts."""
        if texts is None:
            if self._fixed_classnames is not None:  # the learned prompts (if any) are of other classes now
                raise ValueError("the model scores its classes zero-shot with templates (set_classes(names, "
                                 "templates=...)): they have no learned prompts to encode; text_features() gives "
                                 "their features")
            if self.prompt_learner is None:
                raise ValueError("no classes set: pass classnames to the model or call set_classes()")
            backend = resolve_backend(self.backend, self.logit_scale.device)

            def learned_text_features() -> Tensor:
                embeds, eot = self.prompt_learner(self.textual.token_embedding, truncate)
                # cut already, to a length known without waiting for the GPU (a CUDA graph capture cannot)
                return self.textual(embeds, eot, truncate, compiled=backend.compile_modules, length=embeds.shape[1])

            # without gradients the features are computed once per evaluation and cached: not worth a graph
            if backend.cuda_graphs and self.logit_scale.is_cuda and torch.is_grad_enabled():
                return self._graphs.run(f"{backend.name} text, truncate={truncate}", learned_text_features, [],
                                        [self.textual, self.prompt_learner], self.logit_scale.device)
            return learned_text_features()
        tokens = tokenize(texts, self.config.context_length)
        return self.textual.encode_tokens(tokens, truncate)

    @torch.no_grad()
    def zero_shot_text_features(self, classnames: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES,
                                batch_size: int = 1024) -> Tensor:
        """Normalised class features [n_classes, D]: each template's feature normalised, averaged."""
        return self._zero_shot_features(classnames, templates, batch_size)

    def _zero_shot_features(self, classnames: Sequence[str], templates: Sequence[str],
                            batch_size: int = 1024) -> Tensor:
        """zero_shot_text_features, differentiable where gradients are on."""
        names, templates, tokens = zero_shot_tokens(classnames, templates, self.config.context_length)
        feats = torch.cat([at_least_fp32(self.textual.encode_tokens(tokens[i:i + batch_size]))
                           for i in range(0, len(tokens), batch_size)])
        feats = F.normalize(feats, dim=-1).view(len(names), len(templates), -1).mean(dim=1)
        return F.normalize(feats, dim=-1)

    def text_features(self) -> Tensor:
        """Normalised features [n_classes, D] of the current label set, in float32 (float64 for a
        float64 model); cached when nothing can change them (fixed prompts of a frozen text tower,
        or any prompts evaluated without gradients)."""
        if torch.is_grad_enabled():
            if self._fixed_classnames is None:
                return self._learned_text_features()
            if any(p.requires_grad for p in self.textual.parameters()):  # the user trains the text tower
                with autocast_off(self.logit_scale.device.type):  # as the cached features are made
                    return self._zero_shot_features(self._fixed_classnames, self._fixed_templates)
        return self._cached_text_features()

    def _learned_text_features(self) -> Tensor:
        return F.normalize(at_least_fp32(self.encode_text()), dim=-1)

    # Its caches are keyed on tensors' memory and version counters (`refreshed`), which a graph of
    # torch.compile cannot guard on: under a user's torch.compile of the model, it runs as it is
    # (one graph break).
    @torch.compiler.disable
    def _cached_text_features(self) -> Tensor:
        if self._fixed_classnames is not None:  # remade when the text tower changed (reloaded, updated, cast or moved)
            self._fixed_text = refreshed(
                self._fixed_text, self._text_tower_state(), list(self.textual.parameters()),
                lambda: self._fixed_text_features(self._fixed_classnames, self._fixed_templates))
            return self._fixed_text[1]
        learner = self.prompt_learner
        # its buffers too: the class tokens, which its own set_classes replaces
        text_tensors = [*self.textual.parameters(), *(learner.parameters() if learner is not None else ()),
                        *(learner.buffers() if learner is not None else ())]
        self._text_cache = refreshed(self._text_cache, self._text_cache_key(), text_tensors,
                                     self._learned_text_features)
        return self._text_cache[1]

    def _text_cache_key(self) -> tuple:
        """What the cached text features depend on: every text tensor's memory, dtype and version
        (an in-place update, a reload, an assign=True load or a cast all change one; writes through
        `.data` bypass version counters, and so every cache keyed on them), the autocast state and
        the device. The class tokens are told apart by identity (`refreshed`'s weak references): an
        id() here could be the freed tokens' of two class switches before."""
        device = self.logit_scale.device
        learner = self.prompt_learner
        state = self._text_tower_state() + tensor_states([learner.ctx] if learner is not None and learner.ctx is not None
                                                         else [])
        return (state, autocast_dtype(device.type), device)

    def _fixed_text_features(self, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
        """The zero-shot class features, in the model's own precision whatever autocast the caller is
        under (kept for every later call, they may be remade inside an evaluation's autocast)."""
        with autocast_off(self.logit_scale.device.type):
            return self.zero_shot_text_features(classnames, templates)

    def _text_tower_state(self) -> tuple:
        return tensor_states(self.textual.parameters())

    # ---------------------------------------------------------------- video
    def encode_video(self, video: Tensor) -> Tensor:
        """Video features [B, D] (mean of the frame features, before normalisation)."""
        self.visual.check_video(video)  # before its device is read; a replayed graph checks nothing
        backend = resolve_backend(self.backend, video.device)
        if backend.cuda_graphs and video.is_cuda:
            frames = self._graphs.run(f"{backend.name} video",
                                      lambda v: self.visual(v, backend.block_forward, backend.compile_modules),
                                      [video], [self.visual], video.device)
        else:
            frames = self.visual(video, backend.block_forward, backend.compile_modules)
        return frames.mean(dim=1)

    def forward(self, video: Tensor) -> Tensor:
        text = self.text_features()
        video_features = self.encode_video(video)
        # cosines in fp32 whatever the autocast (in float64 for a float64 model, as gradcheck needs)
        dtype = torch.promote_types(torch.promote_types(video_features.dtype, text.dtype), torch.float32)
        with autocast_off(video.device.type):
            video_features = F.normalize(video_features.to(dtype), dim=-1)
            return self.logit_scale.to(dtype).exp() * video_features @ text.to(dtype).t()

    # ---------------------------------------------------------------- loading and saving
    @classmethod
    def from_clip(cls, name: str, pretrained: Optional[str] = None, classnames: Optional[Sequence[str]] = None,
                  **overrides) -> "VitaCLIP":
        from .weights import load_from_clip

        return load_from_clip(cls, name, pretrained, classnames, **overrides)

    @classmethod
    def plain_clip(cls, name: str, pretrained: Optional[str] = None) -> "VitaCLIP":
        """CLIP itself (no prompts, no time embedding, CLIP's logit scale), for zero-shot baselines:
        the logits of open_clip's CLIP on the frames' mean feature. Set classes with templates."""
        from .weights import load_from_clip

        return load_from_clip(cls, name, pretrained, None, plain=True)

    @classmethod
    def from_official_checkpoint(cls, path, classnames: Optional[Sequence[str]] = None, **overrides) -> "VitaCLIP":
        from .weights import load_official_checkpoint

        return load_official_checkpoint(cls, path, classnames, **overrides)

    @classmethod
    def from_pretrained(cls, directory, backend: str = "auto") -> "VitaCLIP":
        from .weights import load_pretrained

        return load_pretrained(cls, directory, backend)

    def save_pretrained(self, directory) -> None:
        from .weights import save_pretrained

        save_pretrained(self, directory)
