"""Review of evaluation and zero-shot: what is refused before any video is scored."""
import pytest

from engine_helpers import CLASSES, tiny_data, tiny_model
from vitaclip.engine.evaluate import EvalConfig
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
