"""The eval and zeroshot commands under torchrun (two gloo ranks on the CPU)."""
import contextlib
import io
import json
import os

import pytest
import torch

from engine_helpers import CLASSES, tiny_data, tiny_model
from ranks import rank_of_two, run_ranks
from vitaclip import cli
from vitaclip.engine.evaluate import EvalConfig, evaluate


def write_tiny_split(folder) -> None:
    """Two synthetic videos, their list and the demo's class list in `folder`."""
    pytest.importorskip("av")
    from pathlib import Path

    from vitaclip.demo import CLASSES, SyntheticActions, write_videos

    write_videos(SyntheticActions(2, num_frames=2, seed=3), Path(folder))
    Path(folder, "classes.txt").write_text("\n".join(CLASSES) + "\n")


def zeroshot_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    with rank_of_two(rank, world_size, port):
        torch.manual_seed(rank)  # ranks' random number streams differ, as separate processes' do
        code = cli.main(["zeroshot", "--clip", "ViT-S-32", "--pretrained", "", "--data-root", folder,
                         "--split", os.path.join(folder, "list.txt"), "--classes", os.path.join(folder, "classes.txt"),
                         "--frames", "1", "--device", "cpu", "--precision", "fp32", "--num-workers", "0",
                         "--no-progress", "--json-out", os.path.join(folder, "zeroshot.json")])
        with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
            json.dump(code, f)


def test_zeroshot_of_a_plain_clip_with_random_weights_runs_under_torchrun(tmp_path):
    """Each rank builds the plain CLIP itself: with random weights ('') they drew other weights, and the
    check that ranks hold the same model refused the run."""
    write_tiny_split(tmp_path)
    run_ranks(zeroshot_worker, str(tmp_path))
    assert [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)] == [0, 0]
    assert json.loads((tmp_path / "zeroshot.json").read_text())["splits"][os.path.join(str(tmp_path), "list.txt")][
        "num_videos"] == 2


class Viewed:
    """tiny_data() as a loader of `temporal_views` views a video says it gives (VideoLoader's attribute)."""

    def __init__(self, temporal_views: int):
        self.data, self.temporal_views = tiny_data(4), temporal_views

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        return self.data[index]


def settings_worker(rank: int, world_size: int, port: int, out: str) -> None:
    with rank_of_two(rank, world_size, port):
        config = EvalConfig(batch_size=2, device="cpu", num_workers=0, progress=False, precision="fp32")
        outcomes = {}
        for name, case in {"views": lambda: evaluate(tiny_model(), Viewed(1 + rank), config),
                           "precision": lambda: evaluate(tiny_model(), Viewed(1), config,
                                                         precision="bf16" if rank else "fp32")}.items():
            try:
                outcomes[name] = case().num_videos
            except ValueError as error:
                outcomes[name] = str(error)
        torch.save(outcomes, os.path.join(out, f"rank{rank}.pt"))


def test_ranks_scoring_other_views_or_at_another_precision_are_refused_on_every_rank(tmp_path):
    """--temporal-views, --spatial-crops and --precision given otherwise on one rank: its videos' scores were
    merged with the others' into a result no single run gives, without a word."""
    run_ranks(settings_worker, str(tmp_path))
    for rank in (0, 1):
        outcomes = torch.load(tmp_path / f"rank{rank}.pt")
        assert outcomes["views"] == ("the evaluation settings differ between ranks: temporal_views 1 vs 2 (rank 0 vs "
                                     "rank 1); every rank must load the same")
        assert outcomes["precision"] == ("the evaluation settings differ between ranks: precision 'fp32' vs 'bf16' "
                                         "(rank 0 vs rank 1); every rank must load the same")


def load_failure_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    """eval and zeroshot where rank 1's class or list file is missing (a node without its copy); each rank's
    exit status and message."""
    with rank_of_two(rank, world_size, port):
        classes, listed = (os.path.join(folder, name if rank == 0 else "absent.txt") for name in ("classes.txt",
                                                                                                  "list.txt"))
        present = {"--model": os.path.join(folder, "model"), "--classes": os.path.join(folder, "classes.txt"),
                   "--list": os.path.join(folder, "list.txt")}
        outcomes = {}
        cases = {"eval": ["eval", "--classes", classes, "--list", present["--list"]],
                 "zeroshot": ["zeroshot", "--classes", classes, "--split", present["--list"]],
                 "eval list": ["eval", "--classes", present["--classes"], "--list", listed],
                 "zeroshot list": ["zeroshot", "--classes", present["--classes"], "--split", listed]}
        for name, command in cases.items():
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                code = cli.main(command + ["--model", present["--model"], "--device", "cpu", "--num-workers", "0",
                                           "--no-progress"])
            outcomes[name] = (code, stderr.getvalue())
        torch.save(outcomes, os.path.join(folder, f"rank{rank}.pt"))


def test_a_rank_that_cannot_load_its_files_is_named_on_every_rank(tmp_path):
    """Rank 1 failed to load and exited; rank 0, at its next collective, saw a lost connection (gloo's
    traceback; with NCCL it waited out the collective timeout)."""
    tiny_model().save_pretrained(tmp_path / "model")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "list.txt").write_text("a.mp4,0\n")
    run_ranks(load_failure_worker, str(tmp_path))
    ours, theirs = (torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1))
    for case in ("eval", "zeroshot", "eval list", "zeroshot list"):
        command = case.split()[0]
        assert theirs[case][0] == 2 and "absent.txt" in theirs[case][1]
        code, message = ours[case]
        assert code == 2 and message.startswith(f"vitaclip {command}: error: loading the model") and \
            "failed on rank 1: " in message and "absent.txt" in message
