"""Command line: `vitaclip COMMAND ...` or `python -m vitaclip COMMAND ...`.

Several GPUs or nodes: `torchrun --nproc_per_node N [--nnodes ... --rdzv_endpoint ...] -m vitaclip train ...`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import select
import signal
import sys
import textwrap
import warnings
from pathlib import Path
from typing import List, Optional

# (nothing here imports torch: the commands import what they use, after their arguments are read)
from . import __version__
from .choices import (DEFAULT_STRIDE, PRECISIONS, PREPARE_TIMEOUT, WEIGHT_DECAY_ON, X264_PRESETS,
                      default_num_workers)
from .config import PRESETS
from .engine.stopping import DEFAULT_STOP_SIGNALS, declare_stop_signals, ignore_signals, parse_signal
from .errors import ClassNamesError, VideoDecodeError, WeightsUnavailable


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except None: those options' help says what happens unset."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


FORMATTER = DefaultsHelpFormatter
DEFAULT_CLIP, DEFAULT_PRETRAINED = "ViT-B-16-quickgelu", "openai"
DEFAULT_PRESET = "ViT-B/16"  # bench's
EXIT_STOPPED = 75  # sysexits' EX_TEMPFAIL: stopped early by a signal, to be resumed


# ---------------------------------------------------------------------------- shared helpers
def signal_names(text: str) -> tuple:
    """"SIGTERM,USR1" -> ("SIGTERM", "SIGUSR1"); "" -> ()."""
    try:
        return tuple(parse_signal(name).name for name in text.split(",") if name.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def whole_number(least: int):
    """An argparse type: an integer >= least (a count of frames, views, prompts, ...)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= {least}")
        return value

    return parse


positive_int = whole_number(1)


def read_classes(path: str) -> List[str]:
    from .data import read_class_names

    if not os.path.exists(path):
        raise FileNotFoundError(f"class list {path} does not exist")
    return read_class_names(path)


def read_templates(path: str) -> List[str]:
    """The zero-shot templates of a file, one per non-blank line; a bad one is named by file and line."""
    from .data.lists import text_lines
    from .text import check_templates

    if not os.path.exists(path):
        raise FileNotFoundError(f"template file {path} does not exist")
    templates = []
    for line_no, text in text_lines(path):
        if text.strip():
            try:
                templates += check_templates([text.strip()])
            except ValueError as error:
                raise ValueError(f"{path}:{line_no}: {error}") from None
    if not templates:
        raise ValueError(f"template file {path} holds no templates")
    return templates


def read_video_paths(path: str, data_root: str = "") -> List[str]:
    """The video paths of a file ('-': standard input), one per non-blank line, as written; a
    labelled list (`path,label` lines that name no file) is refused for what it is."""
    from .data.lists import is_list_line, text_lines

    if path == "-":
        lines = sys.stdin.read().splitlines()
    elif not os.path.exists(path):
        raise FileNotFoundError(f"video path file {path} does not exist")
    else:
        lines = [text for _, text in text_lines(path)]
    paths = [line for line in lines if line.strip()]
    # else each line would be named as a missing video
    if paths and all(is_list_line(p) and not os.path.exists(os.path.join(data_root, p)) for p in paths):
        raise ValueError(f"{'standard input' if path == '-' else path} holds 'path,label' lines (the first: "
                         f"{paths[0]!r}), a labelled list, not video paths: `vitaclip eval --list` scores those")
    return paths


def architecture_overrides(args) -> dict:
    """The architecture settings given on the command line, as config fields; the others come
    from the defaults or the --init model."""
    given = dict(num_frames=args.frames, n_ctx=args.n_ctx, num_global_prompts=args.global_prompts,
                 ctx_position=args.ctx_position, csc=False if args.shared_ctx else None,
                 use_summary=False if args.no_summary else None, use_local=False if args.no_local else None,
                 use_global=False if args.no_global else None, train_cls_proj=True if args.train_cls_proj else None)
    return {**{field: value for field, value in given.items() if value is not None}, **heads_overrides(args)}


def heads_overrides(args) -> dict:
    """--heads/--text-heads, for a file of the authors' layout whose widths no CLIP has."""
    given = dict(heads=args.heads, text_heads=args.text_heads)
    return {field: value for field, value in given.items() if value is not None}


def add_heads(p) -> None:
    p.add_argument("--heads", type=positive_int, default=None,
                   help="attention heads of the vision tower of a file in the authors' layout (default: those "
                        "of the CLIP of its width)")
    p.add_argument("--text-heads", type=positive_int, default=None, help="the same for the text tower")


def build_training_model(args, classes: List[str]):
    """The model to train and the record of where its frozen weights came from."""
    from .engine import checkpoint as ckpt

    if args.init is None:
        pretrained = clip_weights(args)
        backbone = {"kind": "clip", "name": args.clip or DEFAULT_CLIP, "pretrained": pretrained}
        model = ckpt.build_backbone(backbone, classes, args.backend, **architecture_overrides(args))
        # a randomly initialised CLIP cannot be rebuilt: checkpoints then hold the whole model
        return model, backbone if pretrained else None
    refuse_clip_flags(args, "--init")
    check_not_in_saved_model(args.init, "--init")
    path = Path(args.init).resolve()
    # a checkpoint to resume from replaces a fresh class context: no news; --resume auto that finds none
    # (a requeue script's first run) trains that context
    resumes = args.resume is not None and (args.resume != "auto" or ckpt.latest_checkpoint(args.output_dir))
    with warnings.catch_warnings():
        if resumes:
            warnings.filterwarnings("ignore", message=".*starts afresh")
        model = ckpt.load_model(path, classes, args.backend, for_training=True, **architecture_overrides(args))
    if path.is_dir():
        if (path / "config.json").is_file():
            return model, {"kind": "pretrained", "path": str(path)}
        path = ckpt.latest_checkpoint(path)
    payload = ckpt.read_training_checkpoint(path)
    return model, (payload["backbone"] if payload is not None else {"kind": "official", "path": str(path)})


def clip_weights(args) -> Optional[str]:
    """--pretrained, its default filled in; '' (random weights) as None."""
    return (DEFAULT_PRETRAINED if args.pretrained is None else args.pretrained) or None


def refuse_clip_flags(args, instead: str) -> None:
    """--clip/--pretrained pick the CLIP a command starts from; with `instead` (--init, --model) they
    would be ignored: a run on other weights than those asked for."""
    given = [flag for flag, value in (("--clip", args.clip), ("--pretrained", args.pretrained)) if value is not None]
    if given:
        verb = "pick" if len(given) > 1 else "picks"
        raise ValueError(f"{' and '.join(given)} {verb} the CLIP to start from; {instead} gives the model and its "
                         f"weights: give one or the other")


def video_loader(args, env, list_file: str, classes: List[str], train: bool, num_frames: int, size: int, **kw):
    """A loader decoding on this process's device (`env.device`: its rank's GPU under torchrun)."""
    from .data import VideoLoader

    loader = VideoLoader(list_file, args.data_root, train=train, num_frames=num_frames, stride=args.stride,
                         size=size, backend=args.decoder, num_classes=len(classes), num_workers=args.num_workers,
                         device=env.device, on_error=args.on_error, min_frames=args.min_frames,
                         worker_timeout=args.worker_timeout, progress=env.is_main and not args.no_progress, **kw)
    if env.is_main:
        warn_classes_without_videos(args, list_file, classes, {entry.label for _, entry, _ in loader.videos})
    return loader


def warn_classes_without_videos(args, list_file: str, classes: List[str], labels: set) -> None:
    """A training list or test split normally holds every class: classes it lacks still count as
    answers (distractors), the mark of a class list of another data set or an extra header line."""
    missing = [name for label, name in enumerate(classes) if label not in labels]
    if missing:
        print(f"vitaclip {args.command}: warning: {len(missing)} of the {len(classes)} classes have no video in "
              f"{list_file} (e.g. {missing[:3]}) but are still possible answers: is the class list this data "
              "set's?", file=sys.stderr)


def report_skipped(args, env, *loaders) -> None:
    """In skip mode, how many bad list lines and videos the loaders skipped, on all processes
    (each skips the bad videos of its own shard; one skipped on several counts once)."""
    from .engine.distributed import skipped_on_any_rank

    if args.on_error != "skip":
        return
    skipped = skipped_on_any_rank(env, loaders)
    if env.is_main:
        print(f"vitaclip {args.command}: skipped {len(skipped)} bad list lines or videos "
              "(the warnings above name them)", file=sys.stderr)


def print_json_or(args, obj, text: str) -> None:
    print(json.dumps(obj, indent=1) if getattr(args, "json", False) else text)


# ---------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    import torch

    from .backends import resolve_backend
    from .data.augment import RandAugment
    from .data.lists import check_list_file
    from .engine.distributed import init_distributed
    from .engine.precision import check_precision
    from .engine.train import TrainConfig, train

    if args.eval_every and not args.val_list:
        raise ValueError("--eval-every needs the videos to evaluate on: give --val-list")
    for flag, views in (("--temporal-views", args.temporal_views), ("--spatial-crops", args.spatial_crops)):
        if views != 1 and not args.val_list:  # (they would be ignored: no evaluation during training)
            raise ValueError(f"{flag} sets the views of the evaluations during training: give --val-list")
    if args.tsn and args.stride is not None:
        # TSN training takes a frame per segment and its model records no stride: eval, zeroshot and predict
        # score it at the default one, which the evaluations during training must use too
        raise ValueError(f"--stride with --tsn: TSN training samples a frame per segment, not at a stride, and its "
                         f"model records none, so eval, zeroshot and predict score it at stride {DEFAULT_STRIDE} "
                         "(as its evaluations during training do): give --stride to those commands instead")
    # vitaclip's notes (INFO: --resume auto found no checkpoint) are shown as its warnings are; others' INFO is not
    logging.basicConfig(format="%(message)s")
    logging.getLogger("vitaclip").setLevel(logging.INFO)
    declare_stop_signals(args.stop_signals)  # before the loaders' worker pools start the fork server
    env = init_distributed(args.device)
    config = TrainConfig(
        output_dir=args.output_dir, steps=args.steps, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, lr=args.lr, min_lr=args.min_lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, weight_decay_on=args.weight_decay_on,
        grad_clip=args.grad_clip, precision=args.precision, seed=args.seed, num_workers=args.num_workers,
        device=args.device, eval_every=args.eval_every, eval_batch_size=args.eval_batch_size,
        checkpoint_every=args.checkpoint_every, keep_checkpoints=args.keep_checkpoints, log_every=args.log_every,
        resume=args.resume, resume_with_changes=args.resume_with_changes, overwrite=args.overwrite,
        on_nonfinite=args.on_nonfinite, stop_after=args.stop_after, stop_signals=args.stop_signals,
        progress=not args.no_progress, tensorboard=not args.no_tensorboard)
    # the settings, the batch split, the augmentation, and the backend and precision on this device, before
    # the model (minutes, a download) and the loaders (probing new videos) that train(), the training loader
    # and the first step would check them after
    config.validate()
    micro = config.micro_batch(env.world_size)
    if args.augment:
        RandAugment(args.augment)
    resolve_backend(args.backend, env.device)
    check_precision(config.precision, env.device)
    classes = read_classes(args.classes)
    for list_file in filter(None, (args.train_list, args.val_list)):  # before the model (minutes, a download)
        check_list_file(list_file)
    torch.manual_seed(args.seed)  # the same prompt initialisation on every process
    model, backbone = build_training_model(args, classes)
    args.stride = args.stride or DEFAULT_STRIDE
    cfg = model.config
    train_data = video_loader(args, env, args.train_list, classes, True, cfg.num_frames, cfg.image_size,
                              batch_size=micro, tsn=args.tsn, augment=args.augment or None, flip=not args.no_flip,
                              seed=args.seed)
    eval_data = None
    if args.val_list:
        eval_data = video_loader(args, env, args.val_list, classes, False, cfg.num_frames, cfg.image_size,
                                 batch_size=args.eval_batch_size, temporal_views=args.temporal_views,
                                 spatial_crops=args.spatial_crops)
    result = train(model, train_data, config, eval_data=eval_data, backbone=backbone)
    if result.stopped_by:  # checkpointed and on its way out: more of the same stop must not end it midway
        ignore_signals(config.stop_signals)
    report_skipped(args, env, train_data, eval_data)
    if env.is_main:
        evaluated = max(result.evals) if result.evals else None
        print(f"step {result.step}/{args.steps}; checkpoint {result.last_checkpoint}"
              + (f"; top-1 {100 * result.evals[evaluated].top1:.2f} at step {evaluated}" if result.evals else ""))
    return EXIT_STOPPED if result.stopped_by else 0


def load_eval_model(args, classes: Optional[List[str]]):
    from .engine.checkpoint import load_model

    check_not_in_saved_model(args.model, "--model")
    try:
        return load_model(args.model, classes, args.backend, **heads_overrides(args))
    except ClassNamesError as error:
        if classes is None:
            raise
        # what refuses the names (another number or order of classes than the model's) names neither file nor flag
        raise ClassNamesError(f"--model {args.model} with the {len(classes)} class names of --classes "
                              f"{args.classes}: {error}") from None


def check_not_in_saved_model(path: str, flag: str) -> None:
    """Refuses a file of a saved model's folder as load_model does, naming the flag to give the folder with."""
    from .weights import saved_model_holding

    folder = saved_model_holding(path)
    if folder is not None:
        raise ValueError(f"{path} is a file of the saved model {folder}: give the folder, {flag} {folder}")


def scored_frames(args, model) -> int:
    """The frames per view a model is scored on (and `args.stride`): as given, else as it was trained."""
    from .data import sampling

    args.stride = args.stride or sampling.trained_stride(model.training_data)
    frames = args.frames or sampling.trained_frames(model.training_data, model.config.num_frames)
    model.config.check_frames(frames, "--frames")  # else refused by the model after every video is read
    return frames


def cmd_eval(args) -> int:
    from .data.lists import check_list_file
    from .engine.distributed import init_distributed, on_every_rank
    from .engine.evaluate import EvalConfig, evaluate

    def load():
        model = load_eval_model(args, read_classes(args.classes) if args.classes else None)
        check_list_file(args.list)
        return model

    env = init_distributed(args.device)  # before the loader, which shards the videos by rank
    # (a rank that cannot load its copy of a file is named on every rank, not waited for)
    model = on_every_rank(env, load, "loading the model, classes and list")
    frames = scored_frames(args, model)
    data = video_loader(args, env, args.list, model.classnames, False, frames, model.config.image_size,
                        batch_size=args.batch_size, temporal_views=args.temporal_views,
                        spatial_crops=args.spatial_crops)
    result = evaluate(model, data, EvalConfig(batch_size=args.batch_size, precision=args.precision,
                                              num_workers=args.num_workers, device=args.device,
                                              progress=not args.no_progress, json_path=args.json_out,
                                              confusion_png=args.confusion_png, scores_path=args.scores_out),
                      env=env)
    report_skipped(args, env, data)
    if env.is_main:  # every process has the result
        print_json_or(args, result.to_dict(),
                      f"top-1 {100 * result.top1:.2f}  top-5 {100 * result.top5:.2f}  mean class accuracy "
                      f"{100 * result.mean_class_accuracy:.2f}  ({result.num_videos} videos, "
                      f"{result.num_views} views" + (f", {result.num_skipped} skipped)" if result.num_skipped else ")"))
    return 0


def parse_split(text: str, default_classes: Optional[str]):
    """LIST[:CLASSES] -> (list file, class file). A path may hold a colon (a run folder 'run:1'):
    the cut is at the first colon after which the list file exists, else at the first colon."""
    colons = [i for i, c in enumerate(text) if c == ":"]
    cut = len(text) if os.path.isfile(text) else next((i for i in colons if os.path.isfile(text[:i])),
                                                      colons[0] if colons else len(text))
    list_file, classes = text[:cut], text[cut + 1:]
    classes = classes or default_classes
    if not classes:
        raise ValueError(f"split {text!r} names no class list: use LIST:CLASSES or --classes")
    return list_file, classes


def cmd_zeroshot(args) -> int:
    import torch

    from .data.lists import check_list_file
    from .engine.checkpoint import load_model
    from .engine.distributed import init_distributed, on_every_rank
    from .engine.evaluate import EvalConfig
    from .engine.zeroshot import ZEROSHOT_TEMPLATES, Split, zeroshot
    from .model import VitaCLIP

    def load():
        templates = read_templates(args.templates) if args.templates else ZEROSHOT_TEMPLATES
        # each split's list file and classes
        split_lists = [(list_file, read_classes(class_file))
                       for list_file, class_file in (parse_split(text, args.classes) for text in args.split)]
        if args.model:
            refuse_clip_flags(args, "--model")
            check_not_in_saved_model(args.model, "--model")
            model = load_model(args.model, backend=args.backend, templates_only=True, **heads_overrides(args))
        else:
            if heads_overrides(args):
                raise ValueError("--heads/--text-heads complete a --model file of the authors' layout; a plain CLIP "
                                 "(no --model) has its own")
            # random weights ('') drawn from one seed: under torchrun each rank builds its own, and evaluate()
            # refuses ranks whose weights differ (this also makes such a baseline the same from run to run)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = VitaCLIP.plain_clip(args.clip or DEFAULT_CLIP, clip_weights(args))
            model.set_backend(args.backend)
        for list_file, _ in split_lists:
            check_list_file(list_file)
        return templates, split_lists, model

    env = init_distributed(args.device)  # before the loaders, which shard the videos by rank
    # (a rank that cannot load its copy of a file is named on every rank, not waited for)
    templates, split_lists, model = on_every_rank(env, load, "loading the model, classes, templates and lists")
    frames = scored_frames(args, model)
    splits = []
    for text, (list_file, classes) in zip(args.split, split_lists):
        data = video_loader(args, env, list_file, classes, False, frames, model.config.image_size,
                            batch_size=args.batch_size, temporal_views=args.temporal_views,
                            spatial_crops=args.spatial_crops)
        splits.append(Split(text, classes, data))
    result = zeroshot(model, splits, templates, EvalConfig(batch_size=args.batch_size, precision=args.precision,
                                                           num_workers=args.num_workers, device=args.device,
                                                           progress=not args.no_progress,
                                                           json_path=args.json_out), env=env)
    report_skipped(args, env, *(split.data for split in splits))
    if env.is_main:  # every process has the result
        print_json_or(args, result.to_dict(), result.summary())
    return 0


def cmd_predict(args) -> int:
    from tqdm.auto import tqdm

    from .engine.distributed import launched_world_size
    from .engine.predict import PredictConfig, predictions

    if launched_world_size() > 1:  # torchrun: each process would score and print every video
        raise ValueError("predict runs in one process: run it without torchrun (eval and zeroshot share a list "
                         "among processes)")
    classes = read_classes(args.classes) if args.classes else None
    videos = list(args.videos) + (read_video_paths(args.videos_from, args.data_root) if args.videos_from else [])
    if not videos:
        raise ValueError("no videos to predict: give VIDEO files or --videos-from FILE")
    model = load_eval_model(args, classes)
    frames = scored_frames(args, model)  # as eval's: a frame count the model cannot take is named by its flag
    results = predictions(model, videos, PredictConfig(
        top_k=args.top_k, frames=frames, stride=args.stride, temporal_views=args.temporal_views,
        spatial_crops=args.spatial_crops, batch_size=args.batch_size, precision=args.precision, device=args.device,
        decoder=args.decoder, data_root=args.data_root, num_workers=args.num_workers, on_error=args.on_error,
        progress=not args.no_progress))
    # the results on stdout are written between refreshes of the bar on stderr: on one terminal, else
    # each would overwrite the other's line
    between_bars = (functools.partial(tqdm.external_write_mode, file=sys.stdout) if not args.no_progress
                    else contextlib.nullcontext)
    # each video's result printed as soon as it is known (a crash at video 200,000 keeps the
    # others); --json: the list json.dumps(results, indent=1) prints, item by item
    failed = count = 0
    with contextlib.closing(results):  # its bar closed before an error's message
        for count, r in enumerate(results, start=1):
            if args.json:  # every video has an item (an error's too): each but the last is followed by a comma
                text = (("[\n" if count == 1 else "") + textwrap.indent(json.dumps(r, indent=1), " ")
                        + ("\n]" if count == len(videos) else ","))
            else:
                text = f"{r['video']}\n" + ("\n".join(f"  {t['probability']:.4f}  {t['label']}" for t in r["top"])
                                            if "top" in r else f"  error: {r['error']}")
            with between_bars():
                print(text, flush=True)
            failed += "error" in r
    if failed:
        print(f"vitaclip predict: {failed} of {count} videos could not be read", file=sys.stderr)
    return 1 if failed else 0  # as `prepare --on-error skip`: a script can tell


def cmd_bench(args) -> int:
    from .data.lists import check_list_file
    from .engine.bench import bench_loader, bench_model

    if args.tiny and args.preset is not None:  # (the tiny model would be timed, the preset not)
        raise ValueError(f"--tiny times the demo's tiny model, --preset {args.preset} a preset: give one or the other")
    if args.list:  # before the model's timing, which takes minutes
        check_list_file(args.list)
    report = bench_model(args.preset or DEFAULT_PRESET, args.batch_size, args.frames, args.iters, args.warmup,
                         args.precision, args.device, args.backend, train=args.train, tiny=args.tiny)
    if args.list:
        args.stride = args.stride or DEFAULT_STRIDE
        report.update(bench_loader(args.list, args.data_root, args.batch_size, args.frames, args.iters,
                                   args.decoder, args.num_workers, args.device, train=args.train,
                                   size=report["image_size"], stride=args.stride, progress=not args.no_progress))
    print_json_or(args, report, "\n".join(f"{k}: {v}" for k, v in report.items()))
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import run

    return run(args)


def cmd_demo(args) -> int:
    from .demo import CLASSES, DemoConfig, run_demo

    base = DemoConfig.small() if args.small else DemoConfig()
    overrides = {"output_dir": args.output_dir, "seed": args.seed, "progress": not args.no_progress}
    if args.steps is not None:
        overrides["steps"] = args.steps
    print(f"demo: training a tiny Vita-CLIP on synthetic clips ({', '.join(CLASSES)}) on the CPU")
    s = run_demo(base, **overrides)
    print(f"predicted '{s['predicted']}' for a '{s['true']}' clip")
    print("per-class accuracy: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["per_class"].items()))
    print(f"accuracy {100 * s['accuracy']:.1f}% on held-out clips (chance {100 * s['chance']:.0f}%) after "
          f"{s['steps']} steps in {s['seconds']:.0f} s; run folder {s['output_dir']}")
    return 0


# ---------------------------------------------------------------------------- parser
def add_runtime(p, workers: Optional[int] = None, no_progress: str = "no progress bars") -> None:
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: this process's GPU, else CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="bf16", help="autocast precision")
    p.add_argument("--backend", default="auto", help="vision backend: auto, reference or a fast one")
    share = ", by default this process's share of the node's cores less one" if workers is None else ""
    p.add_argument("--num-workers", type=int, default=default_num_workers() if workers is None else workers,
                   help=f"decoding worker processes{share} (0: decode in this process)")
    p.add_argument("--no-progress", action="store_true", help=no_progress)


def add_view_frames(p) -> None:
    p.add_argument("--frames", type=positive_int, default=None,
                   help="frames per view (default: as many as the model's training clips had where it records "
                        "them, else its T0)")


SCORING_STRIDE = ("frames between sampled frames (default: the stride the model was trained with where it records "
                  f"one, else {DEFAULT_STRIDE})")


def add_data(p, stride: str = SCORING_STRIDE, views: Optional[str] = "", lists: bool = True) -> None:
    """The data options; `stride`: --stride's help; `views`: what the --temporal-views and --spatial-crops
    helps add (None: no such options)."""
    p.add_argument("--data-root", default="", help="folder relative video paths (in list files, or given) are "
                                                   "taken from")
    p.add_argument("--stride", type=positive_int, default=None, help=stride)
    p.add_argument("--decoder", default="auto", choices=("auto", "dali-gpu", "dali-cpu", "pyav"),
                   help="video decoder")
    if lists:
        p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                       help="a bad list line or video (missing, corrupt, too short) stops the run naming it, "
                            "or is skipped with a warning and counted at the end")
        p.add_argument("--min-frames", type=positive_int, default=1, help="videos with fewer frames are bad input")
        p.add_argument("--worker-timeout", type=float, default=600.0,
                       help="seconds without a decoded clip from the PyAV workers before the run stops, "
                            "naming the videos awaited (a hung decoder); also the longest a new video's probe "
                            "may take before it counts as a bad video")
    if views is not None:
        p.add_argument("--temporal-views", type=positive_int, default=1, help="evenly spaced clips per video" + views)
        p.add_argument("--spatial-crops", type=int, default=1, choices=(1, 3), help="crops per clip" + views)


def add_model_source(p, required: bool = True) -> None:
    p.add_argument("--model", required=required,
                   help="saved model folder, training checkpoint, run folder (latest checkpoint) or the "
                        "authors' checkpoint (with --classes)")
    p.add_argument("--classes", default=None, help="class names: file (one per line) or folder of class folders")
    add_heads(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitaclip", description=__doc__, formatter_class=FORMATTER)
    parser.add_argument("--version", action="version", version=f"vitaclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the prompts (single GPU, or under torchrun)", formatter_class=FORMATTER)
    p.add_argument("--train-list", required=True, help="training list file (path,label per line)")
    p.add_argument("--val-list", default=None, help="validation list file for periodic evaluation")
    p.add_argument("--classes", required=True, help="class names: file (one per line) or folder of class folders")
    p.add_argument("--output-dir", default="runs/vitaclip", help="checkpoints, logs and the final model")
    g = p.add_argument_group("model")
    g.add_argument("--clip", default=None,
                   help=f"open_clip model name of the frozen backbone (default: {DEFAULT_CLIP}; not with --init)")
    g.add_argument("--pretrained", default=None, help=f"open_clip weights tag or file ('' for random weights; "
                                                      f"default: {DEFAULT_PRETRAINED}; not with --init)")
    g.add_argument("--init", default=None, help="start from a saved model, training checkpoint or the "
                                                "authors' checkpoint instead of CLIP")
    g.add_argument("--frames", type=positive_int, default=None,
                   help="frames per clip (T0; default 8, or the --init model's)")
    g.add_argument("--n-ctx", type=whole_number(0), default=None,
                   help="learned text context vectors (default 8, or the --init model's)")
    g.add_argument("--shared-ctx", action="store_true", help="one context for all classes (default: CSC)")
    g.add_argument("--ctx-position", default=None, choices=("end", "front", "middle"),
                   help="where the class name goes, as CoOp names it: end 'X X X name.', front 'name X X X.', "
                        "middle 'X X name X X.' (default end, or the --init model's)")
    g.add_argument("--global-prompts", type=whole_number(0), default=None,
                   help="global prompts per layer (default 8, or the --init model's)")
    g.add_argument("--no-summary", action="store_true", help="drop the summary token")
    g.add_argument("--no-local", action="store_true", help="drop the local prompts")
    g.add_argument("--no-global", action="store_true", help="drop the global prompts")
    g.add_argument("--train-cls-proj", action="store_true", help="also train cls_proj (the public code does not)")
    add_heads(g)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=30_000, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=256, help="global batch (all processes, accumulation)")
    g.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="clips per process per forward (default: batch-size / processes; smaller = accumulation)")
    g.add_argument("--lr", type=float, default=4e-4, help="peak learning rate (AdamW)")
    g.add_argument("--min-lr", type=float, default=0.0, help="end of the cosine decay")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--weight-decay-on", choices=WEIGHT_DECAY_ON, default="all",
                   help="the trainable tensors decayed: all (as the authors' code) or matrices only (no decay on "
                        "biases, norms and the logit scale)")
    g.add_argument("--grad-clip", type=float, default=None, help="max gradient norm")
    g.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation")
    g.add_argument("--tsn", action="store_true", help="TSN-style segment sampling instead of a fixed stride")
    g.add_argument("--augment", default="rand-m7-n4-mstd0.5-inc1", help="RandAugment spec ('' for none)")
    g.add_argument("--no-flip", action="store_true",
                   help="no random horizontal flip of training clips (the authors' public loader never flipped)")
    g = p.add_argument_group("run")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end only)")
    g.add_argument("--eval-batch-size", type=positive_int, default=16, help="videos per evaluation batch")
    g.add_argument("--checkpoint-every", type=positive_int, default=1000, help="steps between checkpoints")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (0: all)")
    g.add_argument("--log-every", type=positive_int, default=10, help="steps between log rows")
    g.add_argument("--resume", default=None, help="'auto' (latest checkpoint in --output-dir) or a checkpoint")
    g.add_argument("--resume-with-changes", action="store_true",
                   help="resume with other optimisation settings (--lr, --steps, --weight-decay, ...), training "
                        "data, process count or --micro-batch-size than the checkpoint's, going on with the new "
                        "ones (refused without this)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output-dir that holds an earlier run: delete its checkpoints and "
                        "final model first")
    g.add_argument("--on-nonfinite", choices=("stop", "skip"), default="stop", help="on a NaN/inf loss or gradient")
    g.add_argument("--stop-after", type=positive_int, default=None, help="leave after this step, checkpointed")
    g.add_argument("--stop-signals", default=",".join(DEFAULT_STOP_SIGNALS), type=signal_names,
                   help="on one of these signals (on any process: a scheduler's warning before it ends the job), "
                        "finish the current step, checkpoint and exit with status "
                        f"{EXIT_STOPPED}; '' for none")
    g.add_argument("--no-tensorboard", action="store_true", help="CSV logs only")
    add_data(p, stride=f"frames between sampled frames (default {DEFAULT_STRIDE}; recorded in the model, which eval, "
                       "zeroshot and predict then sample at; not with --tsn)",
             views=" of the evaluations during training (needs --val-list)")
    add_runtime(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="supervised multi-view evaluation", formatter_class=FORMATTER)
    add_model_source(p)
    p.add_argument("--list", required=True, help="test list file (path,label per line)")
    add_view_frames(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="videos per batch")
    p.add_argument("--json-out", default=None, help="write the results here as JSON")
    p.add_argument("--confusion-png", default=None, help="write the confusion matrix image here")
    p.add_argument("--scores-out", default=None,
                   help="write every video's class probabilities (mean over its views), label and path here "
                        "(safetensors; vitaclip.engine.evaluate.read_video_scores reads it)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_data(p)
    add_runtime(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("zeroshot", help="zero-shot accuracy over one or several splits (mean +- std)",
                       formatter_class=FORMATTER,
                       description="HMDB51/UCF101: --classes CLASSES --split test1.txt --split test2.txt "
                                   "--split test3.txt; Kinetics-600 novel classes: --split list1.txt:classes1.txt "
                                   "(three times).")
    p.add_argument("--model", default=None, help="trained model (default: a plain CLIP via --clip/--pretrained)")
    add_heads(p)
    p.add_argument("--clip", default=None,
                   help=f"open_clip model name when no --model is given (default: {DEFAULT_CLIP})")
    p.add_argument("--pretrained", default=None,
                   help=f"CLIP weights when no --model is given: an open_clip pretrained tag (default: "
                        f"{DEFAULT_PRETRAINED}; laion2b_s34b_b88k, ...; downloaded the first time) or a weights file; "
                        f"'' for random weights")
    p.add_argument("--split", action="append", required=True, metavar="LIST[:CLASSES]",
                   help="a test list, optionally with its own class list; repeat for each split")
    p.add_argument("--classes", default=None, help="class list of splits that name none")
    p.add_argument("--templates", default=None, help="file of prompt templates with '{}' (default: built-in)")
    add_view_frames(p)
    p.add_argument("--batch-size", type=positive_int, default=8, help="videos per batch")
    p.add_argument("--json-out", default=None, help="write the results here as JSON")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_data(p)
    add_runtime(p)
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("predict", help="top-k labels of video files", formatter_class=FORMATTER)
    add_model_source(p)
    p.add_argument("videos", nargs="*", metavar="VIDEO", help="video files")
    p.add_argument("--videos-from", metavar="FILE",
                   help="more video files, one path per line ('-': standard input), after any VIDEO: for more "
                        "than a command line holds")
    p.add_argument("--top-k", type=positive_int, default=5, help="labels shown per video")
    add_view_frames(p)
    p.add_argument("--batch-size", type=positive_int, default=4, help="videos per batch")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a video that cannot be read (missing, corrupt, too short) stops the run naming it, "
                        "or gets an error line instead of labels (the exit status is then 1)")
    add_data(p, lists=False)
    add_runtime(p, workers=0)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("bench", help="model (and loader) throughput on this device, clips/s",
                       formatter_class=FORMATTER)
    p.add_argument("--preset", default=None,
                   help=f"architecture preset: {', '.join(PRESETS)} (default: {DEFAULT_PRESET})")
    p.add_argument("--tiny", action="store_true", help="the demo's tiny model instead of a preset (not with --preset)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="clips per timed batch (of the model and of the --list loader)")
    p.add_argument("--frames", type=positive_int, default=8, help="frames per clip")
    p.add_argument("--iters", type=positive_int, default=10, help="timed iterations")
    p.add_argument("--warmup", type=whole_number(0), default=3,
                   help="untimed iterations first (a fast-graphed backend captures its graphs in the second, a "
                        "compiled one compiles in the first: below 2, that is timed)")
    p.add_argument("--train", action="store_true",
                   help="time training steps (forward + backward) too, and the loader's training pipeline "
                        "(random clips, crops, RandAugment) instead of its evaluation one")
    p.add_argument("--list", default=None, help="also time the video loader on this list file")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_data(p, stride=f"frames between the sampled frames of the --list loader's clips (default {DEFAULT_STRIDE})",
             views=None, lists=False)
    add_runtime(p, no_progress="no progress bar while --list's new videos are probed")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("prepare", help="re-encode a video list for fast loading", formatter_class=FORMATTER)
    p.add_argument("src_list", help="list file, `path,label` per line")
    p.add_argument("out_dir", help="folder for the re-encoded videos and the new list")
    p.add_argument("--data-root", default="", help="folder the list's paths are relative to")
    p.add_argument("--short-side", type=int, default=256,
                   help="pixels of each video's shorter side after resizing (never enlarged past the source)")
    p.add_argument("--gop", type=int, default=16,
                   help="keyframe interval in frames: shorter decodes a training clip faster in a larger file "
                        "(one core, 8 frames at stride 16: 15-17 ms at 16, 9-10 ms at 4 for 1.6-1.9x the size, "
                        "6 ms at 1 for 2.5-2.7x; benchmarks/RESULTS.md)")
    p.add_argument("--crf", type=int, default=23,
                   help="x264's constant rate factor, 0-51: lower keeps more detail in larger files")
    p.add_argument("--preset", default="veryfast",
                   help=f"x264's speed preset ({', '.join(X264_PRESETS)}): slower ones encode smaller files in "
                        "more time")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: one per core this process may run on)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                   help="a bad list line or video stops the run naming it, or is left out of the new list (the "
                        "exit status is then 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--timeout", type=float, default=PREPARE_TIMEOUT,
                   help="seconds a video's encoding may take before it is taken for a hung encoder and counts "
                        "as a bad video")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("demo", help="train a tiny model on synthetic clips on the CPU, evaluate, predict",
                       formatter_class=FORMATTER)
    p.add_argument("--output-dir", default="runs/demo", help="data, checkpoints, logs and the trained model")
    p.add_argument("--steps", type=positive_int, default=None, help="training steps (default: 300, 120 with --small)")
    p.add_argument("--small", action="store_true", help="a faster, smaller run")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    default_format = warnings.formatwarning
    warnings.formatwarning = functools.partial(format_warning, args.command, default_format)
    try:
        return args.func(args)
    except BrokenPipeError as err:
        if not reader_gone(sys.stdout):  # another pipe (a worker's): an error like any other
            print(f"vitaclip {args.command}: error: {err}", file=sys.stderr)
            return 2
        # what reads the output stopped (`| head`): end quietly, as a tool ended by SIGPIPE does; the
        # flush of stdout at exit would fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    # (OSError: files the user named that cannot be read or written, a full disk; the message names the path)
    except (ValueError, OSError, FloatingPointError, VideoDecodeError, WeightsUnavailable) as err:
        print(f"vitaclip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: a traceback would read as a crash
        print(f"vitaclip {args.command}: interrupted{interrupted_hint(args)}", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        warnings.formatwarning = default_format


PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def format_warning(command: str, default_format, message, category, filename, lineno, line=None) -> str:
    """vitaclip's own warnings as the command's other messages read ("vitaclip train: warning: ..."), not
    as Python prints them (a source path, a line number, the warn call); others' keep Python's form,
    which says where they come from."""
    if os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep):
        return f"vitaclip {command}: warning: {message}\n"
    return default_format(message, category, filename, lineno, line)


def reader_gone(stream) -> bool:
    """Whether `stream` is a pipe whose reading end is closed (poll reports an error on it)."""
    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor, or no poll on this system
        return False


def interrupted_hint(args) -> str:
    """What an interrupted command keeps and how to go on from it, if it has such."""
    if args.command == "prepare":
        return " (the videos it finished are kept: the same command goes on from them)"
    if args.command != "train":
        return ""
    rank = os.environ.get("RANK", "0")
    if rank != "0":  # under torchrun every rank gets Ctrl-C; rank 0's folder holds the checkpoints
        return f" (rank {rank}: rank 0 says what was kept)"
    if "vitaclip.engine.checkpoint" not in sys.modules:
        # stopped while importing torch and the model: importing them again here can crash the interpreter
        return " (while starting, before the run wrote anything)"
    from .engine.checkpoint import latest_checkpoint

    # stopped before its first checkpoint, a run has nothing to go on from
    kept = ("no checkpoint was written now: --resume auto goes on from the last one"
            if latest_checkpoint(args.output_dir) else
            f"nothing was saved: {args.output_dir} holds no checkpoint yet, so --resume auto starts afresh")
    return f" ({kept}; --stop-signals SIGTERM,SIGUSR1,SIGINT makes Ctrl-C write one and stop)"


if __name__ == "__main__":
    sys.exit(main())
