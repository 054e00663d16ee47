"""Zero-shot recognition with hand-written prompts, and the paper's split protocols: HMDB51 and
UCF101 over their three test lists, Kinetics-600 over three novel-class splits (mean +- std)."""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

from ..model import VitaCLIP
from ..text import check_templates, zero_shot_tokens
from .distributed import DistEnv, init_distributed
from .evaluate import EvalConfig, EvalResult, check_outputs, evaluate, write_json
from .loader import check_labels

# Averaged per class (each template's feature normalised, then the mean; SPEC: zero-shot).
ZEROSHOT_TEMPLATES = (
    "a video of a person {}.",
    "a photo of a person {}.",
    "a person is {}.",
    "a video of {}.",
)


@dataclass
class Split:
    name: str
    classnames: Sequence[str]
    data: object  # map-style dataset or iterable of batches, labels index `classnames`


@dataclass
class ZeroShotResult:
    splits: Dict[str, EvalResult]
    top1_mean: float
    top1_std: float  # population std over the splits (0 for one split)
    top5_mean: float
    top5_std: float
    templates: Tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        lines = [f"{name}: top-1 {100 * r.top1:.2f}  top-5 {100 * r.top5:.2f}  ({r.num_videos} videos, "
                 f"{len(r.classnames)} classes" + (f", {r.num_skipped} videos skipped)" if r.num_skipped else ")")
                 for name, r in self.splits.items()]
        lines.append(f"mean: top-1 {100 * self.top1_mean:.2f} +- {100 * self.top1_std:.2f}  "
                     f"top-5 {100 * self.top5_mean:.2f} +- {100 * self.top5_std:.2f}")
        return "\n".join(lines)


def aggregate(results: Dict[str, EvalResult], templates: Sequence[str] = ()) -> ZeroShotResult:
    if not results:
        raise ValueError("no splits to aggregate")
    top1 = [r.top1 for r in results.values()]
    top5 = [r.top5 for r in results.values()]
    return ZeroShotResult(dict(results), statistics.fmean(top1), statistics.pstdev(top1),
                          statistics.fmean(top5), statistics.pstdev(top5), tuple(templates))


def check_split_classes(model: VitaCLIP, split: Split, templates: Sequence[str]) -> None:
    """Refuses, naming the split, what set_classes would refuse in its class names (a string, an
    empty list, duplicates, names CLIP's tokenizer cannot tell apart): left to set_classes, a later
    split's were refused after the splits before it had been evaluated."""
    try:
        zero_shot_tokens(split.classnames, templates, model.config.context_length)
    except (TypeError, ValueError) as error:
        raise type(error)(f"split {split.name!r}: {error}") from None


def zeroshot(model: VitaCLIP, splits: Sequence[Split], templates: Sequence[str] = ZEROSHOT_TEMPLATES,
             config: Optional[EvalConfig] = None, env: Optional[DistEnv] = None, **overrides) -> ZeroShotResult:
    """Score each split's videos against its own classes described by `templates` (the learned
    context is not used), then aggregate top-1/top-5 over the splits. The model keeps the last
    split's classes."""
    config = dataclasses.replace(config or EvalConfig(), **overrides)
    config.validate()  # before the first split's classes replace the model's
    if config.scores_path or config.confusion_png:
        raise ValueError("zeroshot() writes the aggregate as JSON only: for a split's per-video scores or "
                         "confusion matrix, evaluate() it with the model's classes set to its own")
    env = env or init_distributed(config.device)
    check_outputs(env, config.json_path)
    splits = list(splits)  # (splits made on the fly were used up by the check of their names)
    names = [s.name for s in splits]
    if len(set(names)) != len(names):
        raise ValueError(f"split names must be unique, got {names}")
    templates = check_templates(templates)
    for split in splits:  # each before the first is evaluated
        check_split_classes(model, split, templates)
        check_labels(split.data, len(split.classnames), f"split {split.name!r}")
    split_config = dataclasses.replace(config, json_path=None)
    results = {}
    for split in splits:
        model.set_classes(split.classnames, templates=templates)
        results[split.name] = evaluate(model, split.data, split_config, env=env)
    result = aggregate(results, templates)
    if config.json_path and env.is_main:
        write_json(config.json_path, result.to_dict())
    return result
