"""The eval and zeroshot commands under torchrun (two gloo ranks on the CPU)."""
import json
import os

import pytest
import torch

from ranks import rank_of_two, run_ranks
from vitaclip import cli


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
