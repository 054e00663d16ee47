"""The command line walked through as a researcher would (README's train, resume, eval, predict): what
that walk found, each pinned down."""
import pytest

from engine_helpers import CLASSES, Built, cli_videos, one_thread
from engine_helpers import run_cli as run
from vitaclip import cli

pytest.importorskip("av")
AUTOUSE = (one_thread,)  # the tiny model on one thread: imported for pytest to find, named for pyflakes


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return cli_videos(tmp_path_factory, "walk", 4)


def test_train_refuses_a_stride_beside_tsn_that_its_evaluations_would_use_and_the_model_not_record(
        videos, tmp_path, capsys, monkeypatch):
    """`train --tsn --stride 1 --val-list ...` evaluated during training at stride 1, but a TSN run's model
    records no stride, so `vitaclip eval` / `predict` of it score at stride 16: on the demo's clips the run
    reported top-1 46.88 and `eval` of its final model, with the same list and views, 59.38. Without
    --val-list the stride was silently ignored."""
    root, list_file = videos

    def built(*args, **kwargs):
        raise Built

    monkeypatch.setattr(cli, "build_training_model", built)
    base = ["train", "--train-list", list_file, "--data-root", list_file.parent, "--classes", root / "classes.txt",
            "--init", root / "model", "--output-dir", tmp_path / "r", "--device", "cpu", "--decoder", "pyav",
            "--num-workers", 0, "--no-progress", "--batch-size", 4, "--tsn"]
    for extra in (["--val-list", list_file, "--stride", 1], ["--stride", 4]):
        code, _, err = run(capsys, *base, *extra)
        assert code == 2, err
        assert "--stride" in err and "--tsn" in err and "eval" in err
    with pytest.raises(Built):  # --tsn alone is fine: its evaluations and eval's sample at the default stride
        cli.main([str(a) for a in base + ["--val-list", list_file]])


def test_demo_refuses_a_folder_holding_another_runs_checkpoints_or_model(videos, tmp_path, capsys):
    """`vitaclip demo --output-dir runs/k400` (a training run's folder) deleted that run's checkpoints, final model
    and TensorBoard logs and replaced its CSV logs without a word: a demo always starts afresh. A folder of an
    earlier demo is still taken (test_cli's test_demo_runs_again_in_the_same_folder)."""
    from vitaclip.engine.checkpoint import list_checkpoints

    root, list_file = videos
    run_dir = tmp_path / "run"
    cli.main([str(a) for a in ("train", "--train-list", list_file, "--data-root", list_file.parent, "--classes",
                               root / "classes.txt", "--init", root / "model", "--output-dir", run_dir, "--device",
                               "cpu", "--decoder", "pyav", "--num-workers", 0, "--no-progress", "--batch-size", 4,
                               "--steps", 1, "--augment", "", "--stride", 1, "--precision", "fp32")])
    checkpoints = list_checkpoints(run_dir)
    log = (run_dir / "train_log.csv").read_text()
    assert checkpoints and (run_dir / "model" / "config.json").is_file()
    capsys.readouterr()
    code, out, err = run(capsys, "demo", "--small", "--steps", 1, "--output-dir", run_dir, "--no-progress")
    assert code == 2, out + err
    assert str(run_dir) in err and "--output-dir" in err
    assert list_checkpoints(run_dir) == checkpoints and (run_dir / "model" / "config.json").is_file()
    assert (run_dir / "train_log.csv").read_text() == log and not (run_dir / "data").exists()


def test_a_file_of_a_saved_model_folder_given_for_the_model_names_the_folder(videos, tmp_path, capsys):
    """`--model run/model/model.safetensors` (the weights file in the folder save_pretrained writes) was taken
    for the authors' checkpoint: 'no CLIP has a vision width of 64 ... pass --heads', and with --heads,
    --text-heads and --classes it scored without the model's training stride (predict gave 0.9726 where eval
    of the folder gave 0.9858); config.json was 'cannot read checkpoint'."""
    root, list_file = videos
    model = root / "model"
    video = list_file.parent / "clip_00000.mp4"
    for name in ("model.safetensors", "config.json"):
        for argv in (["predict", "--model", model / name, video],
                     ["eval", "--model", model / name, "--list", list_file, "--data-root", list_file.parent],
                     ["zeroshot", "--model", model / name, "--split", list_file, "--classes", root / "classes.txt",
                      "--data-root", list_file.parent]):
            code, _, err = run(capsys, *argv, "--heads", 2, "--text-heads", 2, "--device", "cpu",
                               "--num-workers", 0, "--no-progress")
            assert code == 2, err
            assert f"--model {model}" in err, err
    code, _, err = run(capsys, "train", "--train-list", list_file, "--data-root", list_file.parent, "--classes",
                       root / "classes.txt", "--init", model / "model.safetensors", "--heads", 2, "--text-heads", 2,
                       "--batch-size", 4, "--steps", 1, "--output-dir", tmp_path / "r", "--device", "cpu",
                       "--num-workers", 0, "--no-progress")
    assert code == 2 and f"--init {model}" in err, err


def option_help(command: str, dest: str) -> str:
    """The help text of `vitaclip COMMAND`'s option `dest`, its white space collapsed."""
    import argparse

    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return " ".join(next(a for a in commands[command]._actions if a.dest == dest).help.split())


def test_predict_shows_progress_bars_of_reading_and_scoring_its_videos_unless_no_progress(videos, capsys):
    """`vitaclip predict` reads every video through (their frame counts) before the first result, with no bar,
    so a long list looked hung, and --no-progress did nothing. It now shows the reading (probe) and the scoring
    (predict) on stderr as eval does, and prints the same results."""
    import json

    root, list_file = videos
    clips = [list_file.parent / f"clip_{i:05d}.mp4" for i in range(3)]
    base = ["predict", "--model", root / "model", *clips, "--device", "cpu", "--decoder", "pyav", "--stride", 1]
    for output in ([], ["--json"]):
        code, quiet, err = run(capsys, *base, *output, "--no-progress")
        assert code == 0 and err == "", err
        code, out, err = run(capsys, *base, *output)
        assert code == 0 and out == quiet, err  # the bars are on stderr only
        assert "probe: 100%" in err and "predict: 100%" in err and "3/3" in err, err
    assert [r["video"] for r in json.loads(out)] == [str(c) for c in clips]


def test_bench_shows_a_bar_while_its_list_is_probed_unless_told_not_to(videos, tmp_path, capsys):
    """`vitaclip bench --no-progress` did nothing: the --list loader probed new videos without a bar."""
    _, list_file = videos
    for n, quiet in enumerate(([], ["--no-progress"])):
        fresh = tmp_path / f"list{n}.txt"  # no sidecar yet: its videos are probed
        fresh.write_text(list_file.read_text())
        code, out, err = run(capsys, "bench", "--tiny", "--frames", 2, "--batch-size", 2, "--iters", 1, "--warmup", 0,
                             "--list", fresh, "--data-root", list_file.parent, "--device", "cpu", "--decoder", "pyav",
                             "--num-workers", 0, *quiet)
        assert code == 0 and ("probe: 100%" in err) == (not quiet), err


def test_predict_names_the_frames_flag_for_a_frame_count_the_model_does_not_take(videos, capsys):
    """`predict --frames 3` for a model of T0 = 2 said 'frames = 3 frames is not a multiple ...' (the Python
    API's parameter) where eval says '--frames = 3 ...'."""
    root, list_file = videos
    clip = list_file.parent / "clip_00000.mp4"
    for argv in (["predict", clip], ["eval", "--list", list_file, "--data-root", list_file.parent]):
        code, _, err = run(capsys, *argv, "--model", root / "model", "--frames", 3, "--device", "cpu",
                           "--decoder", "pyav", "--no-progress")
        assert code == 2 and "error: --frames = 3 frames is not a multiple of the model's T0 = 2" in err, err


def test_each_commands_help_says_what_its_sampling_options_do_there():
    """predict's, eval's and zeroshot's --temporal-views/--spatial-crops help spoke of training's evaluations,
    and bench's --stride of eval, zeroshot and predict."""
    for command in ("eval", "zeroshot", "predict"):
        for dest in ("temporal_views", "spatial_crops"):
            assert "train" not in option_help(command, dest), (command, dest)
        assert "the stride the model was trained with" in option_help(command, "stride")
    for dest in ("temporal_views", "spatial_crops"):
        assert "evaluations during training" in option_help("train", dest)
    for command in ("train", "bench"):
        assert "the model was trained with" not in option_help(command, "stride")
    assert "--list" in option_help("bench", "stride") and "eval" not in option_help("bench", "stride")


def test_bench_refuses_a_preset_beside_tiny(capsys):
    """`bench --tiny --preset ViT-L/14` timed the tiny model and reported it, the preset silently ignored."""
    code, out, err = run(capsys, "bench", "--tiny", "--preset", "ViT-L/14", "--device", "cpu")
    assert code == 2 and out == "" and "--tiny" in err and "--preset" in err, err
    assert "ViT-B/16" in option_help("bench", "preset") and "--preset" in option_help("bench", "tiny")


def test_a_class_list_of_another_length_is_named_with_its_flag(videos, tmp_path, capsys):
    """eval and predict with a --classes file of 3 names for a model of 4 said 'the class-specific context was
    trained for 4 classes, got 3 class names', naming neither the file nor the flag."""
    root, list_file = videos
    short = tmp_path / "three.txt"
    short.write_text("\n".join(CLASSES[:3]) + "\n")
    for argv in (["predict", list_file.parent / "clip_00000.mp4"],
                 ["eval", "--list", list_file, "--data-root", list_file.parent]):
        code, _, err = run(capsys, *argv, "--model", root / "model", "--classes", short, "--device", "cpu",
                           "--decoder", "pyav", "--no-progress")
        assert code == 2 and f"--classes {short}" in err and "trained for 4 classes, got 3" in err, err


def test_train_flips_its_clips_unless_told_not_to(videos, tmp_path, capsys, monkeypatch):
    """SPEC's recipe flips training clips, the authors' public loader never did: --no-flip matches it."""
    import vitaclip.engine.train as engine_train

    root, list_file = videos
    flips = []

    def recorded(model, train_data, config, **kwargs):
        flips.append(train_data.flip)
        raise Built

    monkeypatch.setattr(engine_train, "train", recorded)
    base = ["train", "--train-list", list_file, "--data-root", list_file.parent, "--classes", root / "classes.txt",
            "--init", root / "model", "--device", "cpu", "--decoder", "pyav", "--num-workers", 0, "--no-progress",
            "--batch-size", 4]
    for n, extra in enumerate(([], ["--no-flip"])):
        with pytest.raises(Built):
            cli.main([str(a) for a in base + ["--output-dir", tmp_path / f"r{n}", *extra]])
    assert flips == [True, False]


def test_a_model_loading_error_not_about_the_classes_does_not_blame_them(videos, capsys):
    """Every ValueError of loading a model given --classes was put down to the class list ('--model M with the 4
    class names of --classes F: ...'), also one that the model's architecture refused."""
    root, list_file = videos
    code, _, err = run(capsys, "predict", list_file.parent / "clip_00000.mp4", "--model", root / "model", "--classes",
                       root / "classes.txt", "--heads", 4, "--device", "cpu", "--no-progress")
    assert code == 2 and "architecture cannot change" in err and "--classes" not in err, err
