"""Review of lists and sampling: rules restated from SPEC.md and checked on many shapes.

The oracles here are written from SPEC's words (and the authors' loader's rules as the
module docstrings state them), not from the package's code.
"""
import numpy as np
import pytest

from vitaclip.data import sampling
from vitaclip.data.lists import read_video_list


def spec_eval_views(video_frames, num_frames, stride, num_views):
    """SPEC: the video padded with its last frame to span a clip; view i of n starts at
    round(slack * i / (n - 1)), a single view at slack // 2; frames `stride` apart."""
    span = (num_frames - 1) * stride + 1
    padded = list(range(video_frames)) + [video_frames - 1] * max(0, span - video_frames)
    slack = len(padded) - span
    starts = [slack // 2] if num_views == 1 else [round(slack * i / (num_views - 1)) for i in range(num_views)]
    return [[padded[s + k * stride] for k in range(num_frames)] for s in starts]


def spec_short_train_clip(video_frames, num_frames, stride):
    """A video no longer than a clip: frames 0, stride, ..., each past the end repeating the last
    one taken that was inside."""
    taken = []
    for k in range(num_frames):
        taken.append(k * stride if k * stride < video_frames else taken[-1])
    return taken


def shapes(count, seed=0):
    r = np.random.default_rng(seed)
    for _ in range(count):
        yield int(r.integers(1, 400)), int(r.integers(1, 17)), int(r.integers(1, 21)), int(r.integers(1, 7))


def test_eval_views_follow_the_spec_on_many_shapes():
    for n, t, stride, views in shapes(3000):
        got = sampling.eval_frame_indices(n, t, stride, views)
        assert got.tolist() == spec_eval_views(n, t, stride, views), (n, t, stride, views)


def test_train_clips_stay_inside_and_follow_the_stride_rules_on_many_shapes():
    for i, (n, t, stride, _) in enumerate(shapes(3000, seed=1)):
        rng = np.random.default_rng(i)
        idx = sampling.train_frame_indices(n, t, stride, rng)
        assert idx.shape == (t,) and idx.min() >= 0 and idx.max() < n, (n, t, stride)
        if (t - 1) * stride + 1 >= n:
            assert idx.tolist() == spec_short_train_clip(n, t, stride), (n, t, stride)
        else:
            assert np.all(np.diff(idx) == stride) and idx[0] < n - (t - 1) * stride
        tsn = sampling.tsn_frame_indices(n, t, np.random.default_rng(i))
        seg = (n - 1) / t
        assert tsn.shape == (t,) and all(round(seg * k) <= v <= round(seg * (k + 1)) for k, v in enumerate(tsn))
        assert tsn.min() >= 0 and tsn.max() < n


def test_one_frame_clips():
    """T = 1: a clip spans one frame, so any start of the video is a train start, and the single
    evaluation view takes the middle frame (slack // 2)."""
    starts = {int(sampling.train_frame_indices(5, 1, 16, np.random.default_rng(s))[0]) for s in range(200)}
    assert starts == {0, 1, 2, 3, 4}
    assert sampling.eval_frame_indices(9, 1, 16, 1).tolist() == [[4]]
    assert sampling.eval_frame_indices(9, 1, 16, 3).tolist() == [[0], [4], [8]]
    assert sampling.train_frame_indices(1, 1, 16, np.random.default_rng()).tolist() == [0]


def test_very_long_videos_keep_indices_inside():
    n = 10**9
    idx = sampling.train_frame_indices(n, 8, 16, np.random.default_rng(3))
    assert idx.max() < n and np.all(np.diff(idx) == 16)
    views = sampling.eval_frame_indices(n, 8, 16, 4)
    assert views[0, 0] == 0 and views[-1, -1] == n - 1


@pytest.mark.parametrize("line", ["a.mp4 3", "a.mp4\t3", "dir,x/a.mp4 3", "a.mp4,1 2", "# a comment, 3 lines"])
def test_lines_not_in_the_authors_comma_format_are_refused_by_line(tmp_path, line):
    """The authors' loader splits each line at its comma (`path,label`): a space-separated line
    (mmaction's format), a comment, a label that is not one integer is named by its line, never
    read as another path or label."""
    f = tmp_path / "l.csv"
    f.write_text(f"ok.mp4,0\n{line}\n")
    with pytest.raises(ValueError, match=r"l\.csv:2: "):
        read_video_list(str(f), num_classes=3)


def test_duplicate_lines_and_absolute_paths(tmp_path):
    """A video listed twice is two entries (as in the authors' loader), each with its own line; an
    absolute path is taken as it is, not under the data root (os.path.join)."""
    f = tmp_path / "l.csv"
    f.write_text("a.mp4,1\n/abs/b.mp4,0\na.mp4,1\n")
    entries = read_video_list(str(f), "/data", num_classes=2)
    assert [(e.path, e.label, e.line) for e in entries] == [
        ("/data/a.mp4", 1, 1), ("/abs/b.mp4", 0, 2), ("/data/a.mp4", 1, 3)]
