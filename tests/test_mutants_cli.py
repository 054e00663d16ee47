"""Behaviour of the command line (vitaclip/cli.py) and the demo (vitaclip/demo.py) that mutation testing
found unpinned by the other tests."""
from types import SimpleNamespace

import pytest
import torch

from engine_helpers import CLASSES, Built, one_thread, tiny_model  # noqa: F401
from engine_helpers import run_cli as run
from vitaclip import cli, demo

AUTOUSE = (one_thread,)  # imported for pytest to find, named for pyflakes


def parse(*argv):
    return cli.build_parser().parse_args([str(a) for a in argv])


def refused(capsys, *argv) -> str:
    """The parser's error message for `vitaclip *argv`, which it must refuse (exit status 2)."""
    with pytest.raises(SystemExit) as exit_:
        parse(*argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------- argument parsing
def test_a_count_that_is_not_an_integer_is_refused_not_taken_for_the_least_allowed(capsys):
    """whole_number() took text that is no integer for a value below its least, refusing it; taken for the least
    itself, `--frames abc` would be 1 frame and `--n-ctx x` no context."""
    assert "'abc' is not a whole number >= 1" in refused(capsys, "eval", "--model", "m", "--list", "l",
                                                         "--frames", "abc")
    assert "'x' is not a whole number >= 0" in refused(capsys, "train", "--train-list", "l", "--classes", "c",
                                                       "--n-ctx", "x")
    assert cli.whole_number(0)("0") == 0 and cli.positive_int("1") == 1


def test_no_stop_signals_is_written_as_an_empty_list():
    """--stop-signals '' (README: 'for none'), and blank names in a list, are no signals, not unknown ones."""
    assert cli.signal_names("") == () and cli.signal_names("term, ,usr1") == ("SIGTERM", "SIGUSR1")
    assert parse("train", "--train-list", "l", "--classes", "c", "--stop-signals", "").stop_signals == ()


def test_spatial_crops_are_one_or_three(capsys):
    """A clip is scored on its centre crop or on three crops along its long side: 2 is no such protocol."""
    assert "invalid choice: 2" in refused(capsys, "eval", "--model", "m", "--list", "l", "--spatial-crops", "2")
    assert parse("eval", "--model", "m", "--list", "l", "--spatial-crops", "3").spatial_crops == 3


def test_documented_defaults():
    """Defaults the help shows: train keeps the newest 3 checkpoints; predict decodes in its own process and
    shows the top 5 labels; bench times 10 iterations after 3 of warm-up, of 8-frame clips."""
    train = parse("train", "--train-list", "l", "--classes", "c")
    assert (train.keep_checkpoints, train.checkpoint_every, train.eval_batch_size, train.log_every) == (3, 1000, 16, 10)
    predict = parse("predict", "--model", "m", "v.mp4")
    assert (predict.num_workers, predict.top_k, predict.batch_size) == (0, 5, 4)
    bench = parse("bench")
    assert (bench.iters, bench.warmup, bench.frames, bench.batch_size) == (10, 3, 8, 8)


def test_a_split_without_a_list_file_on_disk_is_cut_at_its_first_colon():
    """LIST:CLASSES where neither file exists yet (named missing later): the cut is at the first colon, as
    parse_split's docstring says, so the class file may hold colons, not the list."""
    assert cli.parse_split("a.txt:b:c.txt", None) == ("a.txt", "b:c.txt")


# ---------------------------------------------------------------------------- train
@pytest.fixture
def captured_train(tmp_path, monkeypatch):
    """Runs `vitaclip train` on a list of one (unread) video, the model a tiny one and train() and the
    loaders recording what they were given: returns fn(*flags, evals={}) -> (exit status, stdout, what
    was captured: 'config', 'eval_data', 'backbone', 'loaders' (the loaders' keyword arguments))."""
    import vitaclip.data
    import vitaclip.engine.train as engine_train

    (tmp_path / "list.txt").write_text("v.mp4,0\n")
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    seen = {"loaders": []}

    class Loader:
        def __init__(self, *args, **kwargs):
            seen["loaders"].append(kwargs)
            self.videos = []

    def train(model, train_data, config, eval_data=None, backbone=None):
        seen.update(config=config, eval_data=eval_data, backbone=backbone)
        return SimpleNamespace(step=config.steps, last_checkpoint="ckpt", evals=seen.pop("evals"), stopped_by=None)

    monkeypatch.setattr(vitaclip.data, "VideoLoader", Loader)
    monkeypatch.setattr(engine_train, "train", train)
    monkeypatch.setattr(cli, "build_training_model", lambda args, classes: (tiny_model(), {"kind": "test"}))

    def go(*flags, evals=None):
        seen["loaders"].clear()
        seen["evals"] = evals or {}
        argv = ["train", "--train-list", tmp_path / "list.txt", "--classes", tmp_path / "classes.txt",
                "--output-dir", tmp_path / "r", "--device", "cpu", "--no-progress", "--num-workers", 0, *flags]
        return cli.main([str(a) for a in argv]), seen

    return go


def test_train_passes_its_optimisation_flags_to_the_training_config(captured_train):
    """--weight-decay-on and --on-nonfinite reach TrainConfig (else decay on every tensor, and a NaN loss
    stops the run though skip was asked for)."""
    code, seen = captured_train("--weight-decay-on", "matrices", "--on-nonfinite", "skip")
    assert code == 0
    assert (seen["config"].weight_decay_on, seen["config"].on_nonfinite) == ("matrices", "skip")
    code, seen = captured_train()
    assert (seen["config"].weight_decay_on, seen["config"].on_nonfinite) == ("all", "stop")


def test_the_training_loader_gets_the_seed(captured_train):
    """The training loader draws its order and augmentation from --seed (else from 0, whatever was asked)."""
    code, seen = captured_train("--seed", 7, "--batch-size", 4, "--eval-batch-size", 5)
    assert code == 0 and seen["loaders"][0]["seed"] == 7 and seen["loaders"][0]["batch_size"] == 4
    assert len(seen["loaders"]) == 1 and seen["eval_data"] is None


def test_train_reports_the_last_evaluation(captured_train, capsys, tmp_path):
    """With evaluations during training, the line printed at the end gives the top-1 of the last one; the
    --val-list loader batches --eval-batch-size videos, not the training micro-batch."""
    evals = {2: SimpleNamespace(top1=0.25), 4: SimpleNamespace(top1=0.75)}
    code, seen = captured_train("--steps", 4, "--val-list", tmp_path / "list.txt", "--eval-every", 2,
                                "--batch-size", 4, "--eval-batch-size", 5, evals=evals)
    assert code == 0 and [kw["batch_size"] for kw in seen["loaders"]] == [4, 5]
    assert capsys.readouterr().out.strip() == "step 4/4; checkpoint ckpt; top-1 75.00 at step 4"


def test_a_clip_of_random_weights_is_not_recorded_as_a_backbone_to_rebuild(monkeypatch):
    """--pretrained '' (random weights) cannot be rebuilt from a name: no backbone record, so checkpoints hold
    the whole model; a pretrained CLIP is recorded by its name and tag."""
    from vitaclip.engine import checkpoint

    monkeypatch.setattr(checkpoint, "build_backbone", lambda backbone, classes, backend, **kw: "model")
    base = ["train", "--train-list", "l", "--classes", "c"]
    assert cli.build_training_model(parse(*base, "--pretrained", ""), list(CLASSES)) == ("model", None)
    assert cli.build_training_model(parse(*base), list(CLASSES)) == (
        "model", {"kind": "clip", "name": "ViT-B-16-quickgelu", "pretrained": "openai"})


# ---------------------------------------------------------------------------- eval / predict / bench / demo
def test_a_class_names_error_without_a_class_list_is_passed_on_as_it_is(monkeypatch):
    """Without --classes there is no file or flag to name: the loader's own ClassNamesError, not a crash
    on len(None)."""
    from vitaclip.engine import checkpoint
    from vitaclip.errors import ClassNamesError

    def load_model(*args, **kwargs):
        raise ClassNamesError("give the class names")

    monkeypatch.setattr(checkpoint, "load_model", load_model)
    with pytest.raises(ClassNamesError, match="^give the class names$"):
        cli.load_eval_model(parse("eval", "--model", "m", "--list", "l"), None)


@pytest.fixture
def captured_predict(monkeypatch):
    """`vitaclip predict` with a tiny model and predictions() recording its config and answering each video
    with `results(video)`: returns fn(results, *argv) -> (exit status, stdout, stderr, config)."""
    import vitaclip.engine.predict as engine_predict

    seen = {}

    def go(results, capsys, *argv):
        def predictions(model, videos, config):
            seen["config"] = config
            return (results(v) for v in videos)

        monkeypatch.setattr(engine_predict, "predictions", predictions)
        monkeypatch.setattr(cli, "load_eval_model", lambda args, classes: tiny_model())
        return (*run(capsys, "predict", "--model", "m", "--no-progress", *argv), seen["config"])

    return go


def test_predict_passes_its_views_to_the_prediction(captured_predict, capsys):
    """--temporal-views and --spatial-crops reach PredictConfig: else each video is scored on one view."""
    code, _, _, config = captured_predict(lambda v: {"video": v, "top": []}, capsys, "a.mp4",
                                          "--temporal-views", 3, "--spatial-crops", 3, "--top-k", 2)
    assert code == 0 and (config.temporal_views, config.spatial_crops, config.top_k) == (3, 3, 2)


def test_predict_exits_1_when_any_one_video_could_not_be_read(captured_predict, capsys):
    """A script can tell that a video failed in skip mode: status 1 for a single failure too."""
    def results(video):
        return {"video": video, "error": "cannot read video"} if video == "b.mp4" else {"video": video, "top": []}

    code, out, err, _ = captured_predict(results, capsys, "a.mp4", "b.mp4", "--on-error", "skip")
    assert code == 1 and "1 of 2 videos could not be read" in err and "  error: cannot read video" in out


def test_bench_passes_iterations_and_warmup_in_their_places(monkeypatch, capsys):
    """--iters are the timed iterations, --warmup the untimed ones before."""
    from vitaclip.engine import bench

    asked = []

    def bench_model(*args, **kwargs):
        asked.append((args, kwargs))
        return {"model": "tiny"}

    monkeypatch.setattr(bench, "bench_model", bench_model)
    code, out, _ = run(capsys, "bench", "--tiny", "--iters", 7, "--warmup", 2, "--frames", 4, "--batch-size", 3,
                       "--device", "cpu", "--precision", "fp32")
    assert code == 0 and out == "model: tiny\n"
    (args, kwargs), = asked
    assert args == ("ViT-B/16", 3, 4, 7, 2, "fp32", "cpu", "auto") and kwargs == dict(train=False, tiny=True)


def test_demo_passes_its_steps_and_progress(monkeypatch, capsys, tmp_path):
    """`vitaclip demo --steps N --no-progress` trains N steps without bars; without --steps, the config's."""
    asked = []

    def run_demo(base, **overrides):
        asked.append((base, overrides))
        return dict(predicted="growing", true="growing", per_class={"growing": 1.0}, accuracy=1.0, chance=0.25,
                    steps=overrides.get("steps", base.steps), seconds=1.0, output_dir=overrides["output_dir"])

    monkeypatch.setattr(demo, "run_demo", run_demo)
    assert run(capsys, "demo", "--small", "--steps", 3, "--no-progress", "--seed", 2, "--output-dir", tmp_path)[0] == 0
    assert run(capsys, "demo", "--output-dir", tmp_path)[0] == 0
    (small, given), (full, defaults) = asked
    assert small.steps == 120 and given == dict(output_dir=str(tmp_path), seed=2, progress=False, steps=3)
    assert full.steps == 300 and defaults == dict(output_dir=str(tmp_path), seed=0, progress=True)


# ---------------------------------------------------------------------------- errors and interrupts
@pytest.mark.parametrize("error, message", [(FloatingPointError("loss is nan at step 3"), "loss is nan at step 3"),
                                            ("weights", "no network to download openai")])
def test_a_nonfinite_loss_or_unavailable_weights_end_with_a_line_and_status_2(error, message, monkeypatch, capsys):
    """Errors the user can act on: one line, status 2, no traceback."""
    from vitaclip.errors import WeightsUnavailable

    def fails(args):
        raise WeightsUnavailable(message) if error == "weights" else error

    monkeypatch.setattr(cli, "cmd_eval", fails)
    assert run(capsys, "eval", "--model", "m", "--list", "l") == (2, "", f"vitaclip eval: error: {message}\n")


def test_ctrl_c_on_any_rank_but_0_points_to_rank_0(monkeypatch, tmp_path):
    """Under torchrun every rank gets Ctrl-C: each but rank 0 says rank 0 tells what was kept."""
    monkeypatch.setenv("RANK", "3")
    args = SimpleNamespace(command="train", output_dir=str(tmp_path))
    assert cli.interrupted_hint(args) == " (rank 3: rank 0 says what was kept)"


# ---------------------------------------------------------------------------- demo
def test_the_demo_refuses_a_folder_holding_only_another_runs_final_model(tmp_path):
    """A training run's folder whose checkpoints were pruned still holds its final model, which the demo
    would delete."""
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match=r"holds a training run that is not a demo's \(model\)"):
        demo.check_not_another_run(tmp_path)
    demo.check_not_another_run(tmp_path / "fresh")  # nothing there


def test_a_demo_of_one_step_runs(tmp_path):
    """Checkpoints every steps // 2 steps, at least every step: one step is a run, not a refused setting."""
    config = demo.DemoConfig(output_dir=str(tmp_path), steps=1, batch_size=4, train_size=8, test_size=4,
                             video_files=False, progress=False)
    assert demo.run_demo(config)["steps"] == 1


def test_the_demo_evaluates_on_clips_other_than_its_training_clips(monkeypatch, tmp_path):
    """The held-out clips are drawn from the next seed: the same seed would test on the training clips."""
    seeds = []

    class Recorded(demo.SyntheticActions):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seeds.append(self.seed)

    def train(*args, **kwargs):
        raise Built

    monkeypatch.setattr(demo, "SyntheticActions", Recorded)
    monkeypatch.setattr(demo, "train", train)
    with pytest.raises(Built):
        demo.run_demo(demo.DemoConfig(output_dir=str(tmp_path), seed=5, train_size=4, test_size=4,
                                      video_files=False, progress=False))
    assert seeds == [5, 6]


def test_the_demos_training_clips_are_not_flipped(monkeypatch, tmp_path):
    """A horizontal flip turns a square moving right into one moving left: the demo's loader never flips."""
    pytest.importorskip("av")
    import vitaclip.data

    made = []
    monkeypatch.setattr(vitaclip.data, "VideoLoader", lambda *args, **kwargs: made.append(kwargs))
    config = demo.DemoConfig(output_dir=str(tmp_path), progress=False)
    demo.video_data(config, demo.SyntheticActions(2), demo.SyntheticActions(2, seed=1), tmp_path)
    train, test = made
    assert train["train"] and train["flip"] is False and train["augment"] is None and not test["train"]


def test_a_crossing_square_reaches_the_frames_edge_and_every_frame_shows_the_square():
    """The motion spans the whole clip: a square moving right ends at the right edge (moving left: the left
    edge); and no frame loses its square (a box starting above the frame is clipped to it, not wrapped)."""
    clips = demo.SyntheticActions(64, num_frames=4, image_size=32)
    for i in range(len(clips)):
        video = clips.clean(i)
        label = clips.labels[i]
        for t in range(video.shape[1]):
            assert torch.unique(video[:, t].reshape(3, -1), dim=1).shape[1] == 2, (i, t)
        if label in (2, 3):
            edge = video[:, -1, :, -1 if label == 2 else 0]  # the last frame's column at the edge it moves to
            assert not torch.equal(edge.min(dim=1).values, edge.max(dim=1).values), i  # square and background
