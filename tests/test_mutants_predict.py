"""Behaviour of prediction (vitaclip.engine.predict) and zero-shot evaluation (vitaclip.engine.zeroshot)
that mutation testing found unpinned by the other tests: each test checks it against a small
computation or a stated fact of its own."""
import dataclasses
import json

import pytest
import torch

from engine_helpers import CLASSES, FRAMES, one_thread, tiny_data, tiny_model
from vitaclip import VitaCLIP
from vitaclip.engine.distributed import DistEnv
from vitaclip.engine.evaluate import EvalConfig, EvalResult
from vitaclip.engine.predict import PATHS_SHOWN, predict
from vitaclip.engine.zeroshot import Split, aggregate, zeroshot

assert one_thread  # engine_helpers' autouse fixture: one torch thread per test

CPU = dict(device="cpu", precision="fp32")
EVAL_CPU = dict(device="cpu", num_workers=0, progress=False, precision="fp32")


# ---------------------------------------------------------------- predict()

def test_missing_videos_up_to_the_number_shown_are_all_named_without_a_count(tmp_path):
    """An error names the first PATHS_SHOWN missing files and counts the rest: exactly PATHS_SHOWN
    of them are all named and nothing is counted (no ' and 0 more'); one more is counted as 1."""
    missing = [str(tmp_path / f"gone_{i}.mp4") for i in range(PATHS_SHOWN + 1)]
    with pytest.raises(FileNotFoundError) as shown:
        predict(tiny_model(), missing[:PATHS_SHOWN], **CPU)
    message = str(shown.value)
    assert all(path in message for path in missing[:PATHS_SHOWN]) and message.endswith("]")
    with pytest.raises(FileNotFoundError) as counted:
        predict(tiny_model(), missing, **CPU)
    assert str(counted.value).endswith(" and 1 more") and missing[-1] not in str(counted.value)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_video_path_holding_a_line_break_is_refused_as_such(tmp_path, on_error):
    """The videos go to the loader as a list of a path per line: a path holding a '\\n' would be two
    lines there, shifting every later video's position. It is refused by name, in either mode, not
    reported as a missing file."""
    with pytest.raises(ValueError, match="line break"):
        predict(tiny_model(), [str(tmp_path / "one\ntwo.mp4")], on_error=on_error, **CPU)


def test_a_last_video_that_fails_only_when_decoded_gets_its_error_in_skip_mode(tmp_path):
    """A file that probes fine but fails at decoding (its frame size changes at frame 10 of 20) is
    left out by the loader while it reads the batches, not beforehand: as the last video, in a batch
    of its own that yields nothing, it still gets its {"error"} entry, after the readable one's labels."""
    pytest.importorskip("av")
    from test_data_decode import write_size_changing_video
    from vitaclip.demo import write_videos

    good = write_videos(tiny_data(1), tmp_path / "clips").parent / "clip_00000.mp4"
    write_size_changing_video(str(tmp_path / "resized.h264"))
    # 2 frames 15 apart span the size change wherever the (one, centred) view starts
    results = predict(tiny_model(), [good, tmp_path / "resized.h264"], on_error="skip", batch_size=1,
                      frames=FRAMES, stride=15, **CPU)
    assert [r["video"] for r in results] == [str(good), str(tmp_path / "resized.h264")]
    assert len(results[0]["top"]) == len(CLASSES) and "error" not in results[0]
    assert "frame size changes" in results[1]["error"] and "top" not in results[1]


def test_predicting_files_leaves_the_loaders_log_filters_as_they_were(tmp_path):
    """predict() hides the loader's warnings that name its temporary list with a filter on the loader's
    logger, for its own run only: left in place, every call would add one more filter for good."""
    from vitaclip.data.loader import log

    before = list(log.filters)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for _ in range(2):
        result = predict(tiny_model(), [str(tmp_path / "empty.mp4")], on_error="skip", **CPU)
        assert "error" in result[0]
    assert log.filters == before


def test_top_k_of_zero_is_refused_by_name():
    """top_k is a count of labels, at least 1: 0 would answer every video with an empty list."""
    with pytest.raises(ValueError, match="top_k must be >= 1, got 0"):
        predict(tiny_model(), tiny_data(1)[0][0], top_k=0, **CPU)


def test_video_files_and_tensors_together_are_refused(tmp_path):
    """One call scores either decoded files or clips already taken: a mix is refused as such."""
    with pytest.raises(ValueError, match="either video files or tensors, not both"):
        predict(tiny_model(), [tiny_data(1)[0][0], str(tmp_path / "a.mp4")], **CPU)


def test_a_views_setting_for_tensors_is_refused_whatever_its_value():
    """Tensors are clips already: any temporal_views but the default 1 is refused, 0 included (not
    only values above 1), rather than ignored."""
    with pytest.raises(ValueError, match="temporal_views.*video files"):
        predict(tiny_model(), tiny_data(1)[0][0], temporal_views=0, **CPU)


# ---------------------------------------------------------------- zero-shot

def test_aggregating_no_splits_is_refused_by_name():
    """The mean of no splits is refused as such (not statistics' 'fmean requires at least one data point')."""
    with pytest.raises(ValueError, match="no splits to aggregate"):
        aggregate({})


def test_top5_mean_and_std_are_of_the_top5_accuracies():
    """Each of the four aggregates comes from its own accuracies: over splits whose top-1 and top-5
    spread differently (population std: half the gap between two splits), the top-5 std is the
    top-5 accuracies' (0.2), not the top-1 ones' (0.1)."""
    results = {"s1": EvalResult(0.2, 0.5, 0.2, 1, 1, ["x"]), "s2": EvalResult(0.4, 0.9, 0.4, 1, 1, ["x"])}
    agg = aggregate(results)
    assert (agg.top1_mean, agg.top1_std) == (pytest.approx(0.3), pytest.approx(0.1))
    assert (agg.top5_mean, agg.top5_std) == (pytest.approx(0.7), pytest.approx(0.2))


def test_the_summary_counts_a_single_skipped_video_and_lists_splits_in_the_order_given():
    """A split with one skipped video says so, as one with several does; the splits are listed in the
    order they were given (as their lists were named), not sorted."""
    results = {"b": EvalResult(0.5, 1.0, 0.5, 2, 2, ["x", "y"], num_skipped=1),
               "a": EvalResult(1.0, 1.0, 1.0, 2, 2, ["x", "y"])}
    lines = aggregate(results).summary().splitlines()
    assert lines[0].startswith("b: ") and lines[1].startswith("a: ")
    assert "1 videos skipped" in lines[0] and "skipped" not in lines[1]


def test_a_class_name_too_long_for_the_models_context_is_refused_before_any_split_is_scored():
    """The class names are checked against the model's own context length (not CLIP's usual 77): a
    name that fits 77 tokens but not a shorter context was refused only when its split's classes were
    set, after the splits before it had been evaluated."""
    model = tiny_model()
    short = VitaCLIP(dataclasses.replace(model.config, context_length=12), list(CLASSES))
    fetched = []

    class Counted:
        def __len__(self):
            return 4

        def __getitem__(self, i):
            fetched.append(i)
            return tiny_data(4)[i]

    long_name = " ".join(["very"] * 10) + " long"  # 11 words: > 12 tokens with a template and its ends
    splits = [Split("one", CLASSES, Counted()), Split("two", [*CLASSES[:3], long_name], Counted())]
    with pytest.raises(ValueError, match="split 'two'"):
        zeroshot(short, splits, ["a video of {}."], EvalConfig(**EVAL_CPU))
    assert fetched == []


def test_templates_given_as_a_generator_score_every_split():
    """Templates made on the fly are read once: every split is scored with all of them (the same as a
    list of them gives), and the result lists them."""
    templates = ["a clip of {}.", "something {}."]
    splits = [Split("one", CLASSES, tiny_data(4)), Split("two", CLASSES[::-1], tiny_data(4, seed=1))]
    listed = zeroshot(tiny_model(), splits, templates, EvalConfig(batch_size=4, **EVAL_CPU))
    made = zeroshot(tiny_model(), splits, (t for t in templates), EvalConfig(batch_size=4, **EVAL_CPU))
    assert made.templates == tuple(templates)
    assert [r.top1 for r in made.splits.values()] == [r.top1 for r in listed.splits.values()]


def test_only_the_main_process_writes_the_json(tmp_path):
    """Every rank computes the aggregate, but rank 0 alone writes the file (ranks writing one path at
    once would race); rank 0 writes what zeroshot() returns."""
    splits = [Split("one", CLASSES, tiny_data(4))]
    config = EvalConfig(batch_size=4, json_path=str(tmp_path / "zs.json"), **EVAL_CPU)
    second = DistEnv(rank=1, world_size=1, local_rank=1, device=torch.device("cpu"))  # a second rank, alone
    zeroshot(tiny_model(), splits, ["a video of {}."], config, env=second)
    assert not (tmp_path / "zs.json").exists()
    first = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    result = zeroshot(tiny_model(), splits, ["a video of {}."], config, env=first)
    assert json.loads((tmp_path / "zs.json").read_text())["top1_mean"] == result.top1_mean
