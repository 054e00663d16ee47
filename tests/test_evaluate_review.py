"""Review of evaluation and zero-shot: what is refused before any video is scored."""
import pytest
import torch

from engine_helpers import CLASSES, tiny_data, tiny_model
from vitaclip.engine.evaluate import EvalConfig, EvalResult, evaluate
from vitaclip.engine.zeroshot import Split, zeroshot

CPU = dict(device="cpu", num_workers=0, progress=False, precision="fp32")


class Fetched:
    """tiny_data(8) that counts the items it hands out."""

    def __init__(self):
        self.data, self.fetched = tiny_data(8), 0
        self.labels = self.data.labels

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.fetched += 1
        return self.data[i]


@pytest.mark.parametrize("classnames,problem", [([], "the class list is empty"),
                                                (["jump", "run", "jump", "swim"], "duplicate class name"),
                                                (["Archery", "run", "archery", "swim"], "same tokens"),
                                                ("classes.txt", "must be a list of strings")])
def test_zeroshot_refuses_a_later_splits_class_list_before_evaluating_any_split(classnames, problem):
    """A later split's class list was refused when its classes were set: after every split before
    it had been evaluated (hours over the three HMDB51/UCF101 test lists)."""
    first = Fetched()
    splits = [Split("one", CLASSES, first), Split("two", classnames, Fetched())]
    with pytest.raises((ValueError, TypeError), match=f"split 'two'.*{problem}"):
        zeroshot(tiny_model(), splits, ["a video of {}."], EvalConfig(**CPU))
    assert first.fetched == 0



def test_a_distributed_samplers_repeated_or_missing_items_are_refused():
    """A DataLoader over a DistributedSampler pads its items to a multiple of the ranks: 5 videos on
    2 ranks gave rank 1 video 0 again, merged with rank 0's as a second view (6 views counted; where
    an item is one view of a video, that view weighed twice). A sampler for 2 replicas in one
    process scored half the videos."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from vitaclip.engine.distributed import DistEnv

    data = tiny_data(5)
    alone = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(ValueError, match="among 2 replicas, but 1 process"):
        evaluate(tiny_model(), alone, EvalConfig(**CPU))
    # rank 1 of 2 (refused before any collective: every rank's sampler says the same)
    padded = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False))
    with pytest.raises(ValueError, match="DistributedSampler repeats 1 of its 5 items"):
        evaluate(tiny_model(), padded, EvalConfig(**CPU), env=DistEnv(1, 2, 1, torch.device("cpu")))


def test_a_distributed_sampler_that_drops_the_last_items_is_refused():
    """drop_last leaves the items that do not fill a last round over the ranks unscored: 5 videos on 2
    ranks, one never seen, and the accuracy is over 4 with nothing said."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from vitaclip.engine.distributed import DistEnv

    data = tiny_data(5)
    dropping = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=1, shuffle=False,
                                                                         drop_last=True))
    with pytest.raises(ValueError, match="DistributedSampler leaves out 1 of its 5 items"):
        evaluate(tiny_model(), dropping, EvalConfig(**CPU), env=DistEnv(1, 2, 1, torch.device("cpu")))


def test_views_of_one_video_with_different_labels_are_refused():
    """Batches whose video ids put views of two videos under one id (ids counted per list, two lists
    joined) would average the two videos' scores under the first one's label."""
    data = tiny_data(4)
    video = torch.stack([data[i][0] for i in range(4)])
    batches = [(video[:2], torch.tensor([0, 1]), [0, 1]), (video[2:], torch.tensor([2, 1]), [0, 1])]
    with pytest.raises(ValueError, match=r"video 0 has views with different labels \(0 and 2\)"):
        evaluate(tiny_model(), batches, EvalConfig(**CPU))


def test_scores_file_takes_video_ids_given_as_a_numpy_array(tmp_path):
    """Batches whose ids came as a NumPy array were scored, then the scores file failed after the
    whole pass: 'Object of type int64 is not JSON serializable'."""
    import numpy as np

    from vitaclip.engine.evaluate import read_video_scores

    data = tiny_data(6)
    batches = [(torch.stack([data[i][0] for i in range(s, s + 3)]), torch.tensor([data[i][1] for i in range(s, s + 3)]),
                np.arange(s, s + 3)) for s in (0, 3)]
    path = tmp_path / "scores.safetensors"
    evaluate(tiny_model(), batches, EvalConfig(scores_path=str(path), **CPU))
    assert read_video_scores(path).video_ids == list(range(6))


def test_a_distributed_sampler_made_for_another_rank_is_refused():
    """A sampler built with a fixed rank (rank=0 on every process) scored rank 0's items on each
    rank and the others' never."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    from vitaclip.engine.distributed import DistEnv

    data = tiny_data(4)
    wrong = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, num_replicas=2, rank=0, shuffle=False))
    with pytest.raises(ValueError, match="made for rank 0, but this process is rank 1"):
        evaluate(tiny_model(), wrong, EvalConfig(**CPU), env=DistEnv(1, 2, 1, torch.device("cpu")))


def test_the_labelled_confusion_matrix_leaves_matplotlib_as_it_was(tmp_path):
    """Writing it switched the process's matplotlib backend to Agg (a notebook's inline plots with
    it) and left a pyplot figure open after a failed save."""
    matplotlib = pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    from PIL import Image

    from vitaclip.engine.evaluate import save_confusion_png

    matplotlib.use("svg")
    result = EvalResult(0.5, 1.0, 0.5, 2, 2, ["a", "b"], confusion=[[1, 0], [1, 0]])
    save_confusion_png(result, tmp_path / "c.png")
    assert matplotlib.get_backend() == "svg" and plt.get_fignums() == []
    with Image.open(tmp_path / "c.png") as image:
        assert image.format == "PNG" and image.size[0] >= 100  # a labelled figure, not the 2-cell heat map


def test_the_plain_confusion_matrix_without_matplotlib(tmp_path, monkeypatch):
    """Without matplotlib, a grey heat map: cell (true, predicted), darker for more."""
    import sys

    from PIL import Image

    from vitaclip.engine.evaluate import save_confusion_png

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    result = EvalResult(0.5, 1.0, 0.5, 2, 2, ["a", "b"], confusion=[[1, 0], [1, 0]])
    save_confusion_png(result, tmp_path / "c.png")
    with Image.open(tmp_path / "c.png") as image:
        assert image.mode == "L" and image.size == (512, 512)
        assert [image.getpixel((x, y)) for x, y in ((0, 0), (300, 0), (0, 300), (300, 300))] == [0, 255, 0, 255]
