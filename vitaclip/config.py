"""Architecture of a Vita-CLIP model: one dataclass holding every choice, plus presets."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Optional

CONTEXT_POSITIONS = ("end", "front", "middle")
ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class VitaCLIPConfig:
    # vision tower (frozen CLIP ViT)
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    embed_dim: int = 512
    num_frames: int = 8  # T0: frames per clip in training, size of the time embedding
    # text tower (frozen CLIP text transformer)
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    act: str = "quick_gelu"  # OpenAI weights need QuickGELU
    # vision prompts
    use_summary: bool = True
    use_local: bool = True
    use_global: bool = True
    num_global_prompts: int = 8
    # text prompts (CoOp-style context)
    n_ctx: int = 8
    csc: bool = True  # class-specific context; False = one context shared by all classes
    ctx_position: str = "end"  # where the class name goes (CoOp): end "X X X name.", front "name X X X.", middle
    ctx_init: Optional[str] = None  # initialise the context from this phrase's embeddings
    train_cls_proj: bool = False  # the public code never trains cls_proj

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"VitaCLIPConfig: {msg}")

        need(self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        need(self.width % self.heads == 0, f"width {self.width} is not divisible by heads {self.heads}")
        need(self.text_width % self.text_heads == 0,
             f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}")
        need(self.num_frames >= 1, f"num_frames must be >= 1, got {self.num_frames}")
        need(self.layers >= 1 and self.text_layers >= 1, "layers and text_layers must be >= 1")
        need(self.ctx_position in CONTEXT_POSITIONS,
             f"ctx_position must be one of {CONTEXT_POSITIONS}, got {self.ctx_position!r}")
        need(self.act in ACTIVATIONS, f"act must be one of {ACTIVATIONS}, got {self.act!r}")
        need(self.num_global_prompts >= 0, "num_global_prompts must be >= 0")
        need(self.n_ctx >= 0, "n_ctx must be >= 0")
        if self.ctx_init is not None:
            need(bool(self.ctx_init.strip()), "ctx_init must not be empty")

    # derived sizes
    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def num_global(self) -> int:
        """Global prompts actually present (0 when switched off)."""
        return self.num_global_prompts if self.use_global else 0

    @property
    def uses_cls_proj(self) -> bool:
        return self.use_summary or self.use_local

    @property
    def groups_frames(self) -> bool:
        """Whether frames interact across time inside a layer (T must be k * T0)."""
        return self.use_summary or self.use_local

    def check_frames(self, frames: int, what: str = "T") -> None:
        """A frame count the model takes: any, or k * T0 where frames interact across time."""
        if self.groups_frames and frames % self.num_frames:
            raise ValueError(f"{what} = {frames} frames is not a multiple of the model's T0 = {self.num_frames}: "
                             f"summary and local prompts act on groups of T0 consecutive frames")

    def replace(self, **changes) -> "VitaCLIPConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "VitaCLIPConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "VitaCLIPConfig":
        key = name.replace("-", "/").replace("_", "/").upper().replace("VIT", "ViT")
        key = {"ViT/B/32": "ViT-B/32", "ViT/B/16": "ViT-B/16", "ViT/L/14": "ViT-L/14",
               "ViT/L/14/336": "ViT-L/14-336", "ViT/L/14/336PX": "ViT-L/14-336"}.get(key, name)
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})


_TEXT_B = dict(embed_dim=512, text_width=512, text_layers=12, text_heads=8)
_TEXT_L = dict(embed_dim=768, text_width=768, text_layers=12, text_heads=12)

PRESETS = {
    "ViT-B/32": dict(image_size=224, patch_size=32, width=768, layers=12, heads=12, **_TEXT_B),
    "ViT-B/16": dict(image_size=224, patch_size=16, width=768, layers=12, heads=12, **_TEXT_B),
    "ViT-L/14": dict(image_size=224, patch_size=14, width=1024, layers=24, heads=16, **_TEXT_L),
    "ViT-L/14-336": dict(image_size=336, patch_size=14, width=1024, layers=24, heads=16, **_TEXT_L),
}
