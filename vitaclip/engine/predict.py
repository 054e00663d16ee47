"""Top-k labels of single videos: files (decoded by vitaclip.data) or normalised tensors."""
from __future__ import annotations

import dataclasses
import itertools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..model import VitaCLIP
from .distributed import pick_device
from .evaluate import accumulate, refuse_non_finite
from .precision import autocast, check_precision
from .settings import check_count


PATHS_SHOWN = 5  # in an error: a long list's every missing file would bury the message


def _some(paths: List[str]) -> str:
    """The first PATHS_SHOWN paths, and how many more there are."""
    more = f" and {len(paths) - PATHS_SHOWN} more" if len(paths) > PATHS_SHOWN else ""
    return f"{paths[:PATHS_SHOWN]}{more}"


@dataclass
class PredictConfig:
    top_k: int = 5
    frames: Optional[int] = None  # frames per view; None: as many as the model's training clips had (else its T0)
    stride: Optional[int] = None  # frames between sampled frames; None: the model's training stride (else 16)
    temporal_views: int = 1
    spatial_crops: int = 1
    batch_size: int = 4  # videos per forward
    precision: str = "bf16"
    device: Optional[str] = None
    decoder: str = "auto"  # vitaclip.data backend: auto | dali-gpu | dali-cpu | pyav
    data_root: str = ""  # folder that relative video paths are in
    num_workers: int = 0  # PyAV decoding processes
    on_error: str = "raise"  # "skip": a video that cannot be read gets an "error" instead of labels
    progress: bool = False  # progress bars (stderr) of the files' reading and of the scoring


def _batches_from_files(paths: Sequence[str], model: VitaCLIP, config: PredictConfig, device, errors: Dict):
    """The files' batches (video ids = positions in `paths`); with on_error="skip", `errors` gets
    {position: why} of the videos left out, each before a batch of later videos is yielded."""
    from ..data import VideoDecodeError, sampling
    from ..data.loader import NoUsableVideos, VideoLoader
    from ..data.loader import log as loader_log

    num_frames = (sampling.trained_frames(model.training_data, model.config.num_frames) if config.frames is None
                  else config.frames)
    stride = sampling.trained_stride(model.training_data) if config.stride is None else config.stride
    check_count("frames", num_frames)
    model.config.check_frames(num_frames, "frames")  # else refused by the model after every video is read
    paths = [os.path.abspath(os.path.join(config.data_root, p)) for p in paths]
    for p in paths:  # a list line could not carry these: the positions would shift
        if p != p.strip() or "\n" in p or "\r" in p:
            raise ValueError(f"video path {p!r} begins or ends with white space or holds a line break: rename it")
    if config.on_error == "raise":
        folders = [p for p in paths if os.path.isdir(p)]
        if folders:
            raise ValueError(f"folder(s), not video files: {_some(folders)}")
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} video file(s) not found: {_some(missing)}")
    with tempfile.TemporaryDirectory(prefix="vitaclip-predict-") as tmp:
        list_file = os.path.join(tmp, "videos.txt")
        Path(list_file).write_text("".join(f"{p},0\n" for p in paths))

        def about_others(record) -> bool:  # the loader's warnings name our temporary list: `errors` names the videos
            return list_file not in record.getMessage()

        def note(skipped: Dict[int, str]) -> None:
            """The videos left out since the last note (the loader's `skipped_videos` grows in order)."""
            for video_id, message in itertools.islice(skipped.items(), len(errors), None):
                # "LIST:LINE (PATH): why" or "LIST:LINE: why": the list is ours
                line = f"{list_file}:{video_id + 1}"
                why = message.removeprefix(f"{line} ({paths[video_id]})").removeprefix(line).removeprefix(": ")
                errors[video_id] = why if paths[video_id] in why else f"{paths[video_id]}: {why}"

        loader_log.addFilter(about_others)
        try:
            loader = VideoLoader(list_file, train=False, batch_size=config.batch_size, num_frames=num_frames,
                                 stride=stride, size=model.config.image_size, temporal_views=config.temporal_views,
                                 spatial_crops=config.spatial_crops, backend=config.decoder, device=device,
                                 num_workers=config.num_workers, shard_id=0, num_shards=1, on_error=config.on_error,
                                 progress=config.progress)
            for batch in loader:
                note(loader.skipped_videos)  # a batch's results are handed out with the errors before them
                yield batch
            note(loader.skipped_videos)
        except NoUsableVideos as none:
            note(none.skipped_videos)
        except VideoDecodeError as error:  # name the video by its position, not our temporary list's line
            raise VideoDecodeError(str(error).replace(f"{list_file}:", "video ")) from None
        finally:
            loader_log.removeFilter(about_others)


def _batches_from_tensors(videos: Sequence[torch.Tensor], config: PredictConfig):
    """batch_size videos per batch; a batch's videos of other clip shapes than the one before (whole
    videos of their own lengths, which the model takes one by one) each start a forward of their own."""
    for start in range(0, len(videos), config.batch_size):
        chunk = videos[start:start + config.batch_size]
        runs = []  # [clip shape, views, ids] of consecutive videos of one clip shape
        for i, v in enumerate(chunk, start=start):
            views = v if v.dim() == 5 else v.unsqueeze(0)
            if views.dim() != 5:
                raise ValueError(f"video {i} must be [3, T, H, W] or [V, 3, T, H, W], got {tuple(v.shape)}")
            if not runs or runs[-1][0] != views.shape[1:]:
                runs.append([views.shape[1:], [], []])
            runs[-1][1].append(views)
            runs[-1][2].extend([i] * views.shape[0])
        for _, clips, ids in runs:
            yield torch.cat(clips), torch.zeros(len(ids), dtype=torch.long), ids


def predict(model: VitaCLIP, videos: Sequence[Union[str, os.PathLike, torch.Tensor]],
            config: Optional[PredictConfig] = None, **overrides) -> List[Dict]:
    """[{"video": name, "top": [{"label", "probability"}, ...]}] per video (a path or a [3, T, H, W]
    tensor alone is one), probabilities being the softmax averaged over the views. Files are decoded
    with the test protocol (evenly spaced temporal views, short side resized to the input size,
    centre or 3 crops); with on_error="skip", a file that cannot be read gets {"video": name,
    "error": why} instead."""
    return list(predictions(model, videos, config, **overrides))


@torch.no_grad()
def predictions(model: VitaCLIP, videos: Sequence[Union[str, os.PathLike, torch.Tensor]],
                config: Optional[PredictConfig] = None, **overrides) -> Iterator[Dict]:
    """`predict`'s results one by one, in the order of `videos`, each as soon as its video's views are
    scored: a long list's results can be written as they come (a crash loses only the batch in
    flight), and only the probabilities of the batch in flight are held."""
    config = dataclasses.replace(config or PredictConfig(), **overrides)
    # one video, as a path or a [3, T, H, W] tensor (whose rows were taken for videos, each refused as
    # "video 0 must be [3, T, H, W], got (T, H, W)")
    if isinstance(videos, (str, os.PathLike)) or isinstance(videos, torch.Tensor) and videos.dim() == 4:
        videos = [videos]
    videos = list(videos)  # an iterator too (Path(folder).glob("*.mp4"))
    if len(videos) == 0:
        raise ValueError("no videos given")
    check_count("top_k", config.top_k, 1)
    check_count("batch_size", config.batch_size, 1)
    check_precision(config.precision)  # not at the first batch, after every video file was read through
    device = pick_device(config.device)
    are_tensors = [isinstance(v, torch.Tensor) for v in videos]
    errors: Dict[int, str] = {}
    if any(are_tensors) and not all(are_tensors):
        raise ValueError("give either video files or tensors, not both")
    if all(are_tensors):  # clips already taken: these would be ignored
        sampling = {"temporal_views": config.temporal_views != 1, "spatial_crops": config.spatial_crops != 1,
                    "frames": config.frames is not None, "stride": config.stride is not None}
        given = [name for name, set_ in sampling.items() if set_]
        if given:
            raise ValueError(f"{', '.join(given)}: how clips are taken from video files, but tensors are clips "
                             "already (a [V, 3, T, H, W] tensor is a video's V views)")
    from tqdm.auto import tqdm

    was_training = model.training
    bar = None
    model.eval().to(device)
    try:
        if all(are_tensors):
            names = [f"tensor {i}" for i in range(len(videos))]
            batches = _batches_from_tensors(list(videos), config)
        else:
            names = [str(v) for v in videos]
            batches = _batches_from_files(names, model, config, device, errors)
        classnames = model.classnames
        k = min(config.top_k, len(classnames))
        sums: Dict = {}

        def result(i: int) -> Dict:
            if i in errors:  # left out in skip mode
                return {"video": names[i], "error": errors[i]}
            total, count, _ = sums.pop(i)
            mean = total / count
            refuse_non_finite(mean[None], [names[i]])
            probs, idx = mean.topk(k)
            return {"video": names[i], "top": [{"label": classnames[j], "probability": float(p)}
                                               for p, j in zip(probs.tolist(), idx.tolist())]}

        def results() -> Iterator[Dict]:
            done = 0  # the videos before this one are handed out
            for video, labels, ids in batches:
                with autocast(device, config.precision):
                    logits = model(video.to(device))
                ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
                accumulate(sums, logits.float().softmax(-1).cpu(), labels.cpu(), ids)
                # a batch holds every view of its videos, and videos come in order (the loader's
                # evaluation order, one shard): every video up to its last is done, or was left out
                last = max(ids)
                while done <= last:
                    yield result(done)
                    done += 1
            for i in range(done, len(names)):  # (left out, after the last batch)
                yield result(i)

        for r in results():
            if bar is None:  # made after the files' reading, whose bar it would otherwise sit above
                bar = tqdm(total=len(names), desc="predict", unit="video", disable=not config.progress,
                           dynamic_ncols=True)
            yield r
            bar.update(1)
    finally:
        if bar is not None:  # before an error's message, and before the caller's next output
            bar.close()
        model.train(was_training)  # as evaluate(): predicting mid-training leaves the model training
