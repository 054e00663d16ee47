"""The command line on real video files (PyAV): train, resume, eval, zero-shot, predict, demo, errors."""
import argparse
import json
import os
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine_helpers import CLASSES, FRAMES, SIZE, cli_videos, one_thread, tiny_model  # noqa: F401
from engine_helpers import run_cli as run
from vitaclip import cli
from vitaclip.cli import build_parser, build_training_model, main
from vitaclip.engine import distributed
from vitaclip.engine.checkpoint import latest_checkpoint, load_checkpoint
from vitaclip.engine.evaluate import read_video_scores

pytest.importorskip("av")

COMMANDS = ("train", "eval", "zeroshot", "predict", "bench", "prepare", "demo")
CPU = ["--device", "cpu", "--decoder", "pyav", "--num-workers", "0", "--stride", "1", "--no-progress"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """12 synthetic clips as mp4 files + list, a class file and a saved tiny model."""
    return cli_videos(tmp_path_factory, "cli", 12)


@pytest.mark.parametrize("command, hint", [("prepare", "the same command goes on from them"),
                                           ("train", "--resume auto"), ("eval", None)])
def test_ctrl_c_ends_a_command_with_a_line_not_a_traceback(command, hint, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{command}", interrupted)
    arguments = {"prepare": ["list.txt", "out"], "train": ["--train-list", "list.txt", "--classes", "c.txt"],
                 "eval": ["--model", "m", "--list", "list.txt"]}[command]
    code, out, err = run(capsys, command, *arguments)
    assert code == 130 and out == "" and err.startswith(f"vitaclip {command}: interrupted")
    assert (hint in err) if hint else err == f"vitaclip {command}: interrupted\n"


def test_ctrl_c_while_torch_is_imported_ends_with_a_line_not_a_crash():
    """Ctrl-C in the seconds a command imports torch: the interrupted import leaves torch half
    loaded, and importing it again for train's checkpoint hint crashed the interpreter."""
    import subprocess
    import sys

    script = """
import sys
from vitaclip import cli

class CtrlCInTorch:  # the keyboard interrupt arrives while torch's own modules are imported, once
    def find_spec(self, name, path=None, target=None):
        if name == "torch.nn":
            sys.meta_path.remove(self)
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlCInTorch())
sys.exit(cli.main(["train", "--train-list", "list.txt", "--classes", "c.txt"]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (
        130, "vitaclip train: interrupted (while starting, before the run wrote anything)\n")


def test_the_packages_warnings_read_as_the_commands_messages_and_others_say_where_they_come_from():
    """vitaclip's warnings printed as Python prints them (a source path, a line number and the warn call)
    among the command's own "vitaclip train: ..." lines; Python's form is kept for other packages'."""
    import argparse as elsewhere
    import subprocess
    import sys

    from vitaclip.engine import settings as ours

    script = f"""
import sys, warnings
from vitaclip import cli

def warn(args):
    warnings.warn_explicit("kept the earlier logs", UserWarning, {ours.__file__!r}, 7)
    warnings.warn_explicit("a deprecation", UserWarning, {elsewhere.__file__!r}, 9)
    return 0

cli.cmd_eval = warn
default = warnings.formatwarning
code = cli.main(["eval", "--model", "m", "--list", "l"])
assert warnings.formatwarning is default, "the command's format outlived it"
sys.exit(code)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[:2] == ["vitaclip eval: warning: kept the earlier logs",  # (then line 9)
                                            f"{elsewhere.__file__}:9: UserWarning: a deprecation"]


def test_the_command_line_answers_before_torch_is_imported():
    """`vitaclip --help` and a mistyped option took 6.6 s here, importing torch and the model
    (minutes from a cluster's cold network file system): the parser needs neither; the package's
    names and sub-packages are still there when used."""
    import subprocess
    import sys

    script = """
import sys
from vitaclip import cli
for argv in (["--help"], ["train", "--help"], ["prepare", "--help"], ["eval", "--model", "m", "--nope"]):
    try:
        cli.main(argv)
    except SystemExit:
        pass
assert "torch" not in sys.modules, "the parser imported torch"
import vitaclip
assert vitaclip.VitaCLIP.__name__ == "VitaCLIP" and vitaclip.data.VideoLoader.__name__ == "VideoLoader"
assert set(vitaclip.__all__) <= set(dir(vitaclip))
try:
    vitaclip.no_such_name
except AttributeError as error:
    print(error)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: vitaclip train" in done.stdout and "usage: vitaclip prepare" in done.stdout
    assert "the following arguments are required: --list" in done.stderr
    assert done.stdout.endswith("module 'vitaclip' has no attribute 'no_such_name'\n")


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"vitaclip {version('vitaclip')}\n"


@pytest.mark.parametrize("reader_gone", [True, False])
def test_output_piped_to_a_reader_that_stops_ends_quietly(tmp_path, reader_gone):
    """`vitaclip predict ... | head`: status 141 as a tool ended by SIGPIPE, nothing on stderr; a broken
    pipe that is not stdout's (a worker's) is an error as any other."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(f"""
import os, sys
from vitaclip import cli
if {reader_gone}:
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.dup2(write_end, sys.stdout.fileno())

def flood(args):
    while True:
        print("x" * 1000)
    raise AssertionError("unreachable")

def broken_worker_pipe(args):
    raise BrokenPipeError(32, "Broken pipe")

cli.cmd_predict = flood if {reader_gone} else broken_worker_pipe
sys.exit(cli.main(["predict", "--model", "m", "v.mp4"]))
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    if reader_gone:
        assert (done.returncode, done.stderr) == (141, "")
    else:
        assert done.returncode == 2 and done.stderr == "vitaclip predict: error: [Errno 32] Broken pipe\n"


def test_ctrl_c_in_training_says_whether_there_is_a_checkpoint_to_go_on_from(monkeypatch, capsys, tmp_path):
    from vitaclip.engine.checkpoint import checkpoint_path

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    command = ["train", "--train-list", "list.txt", "--classes", "c.txt", "--output-dir", tmp_path]
    code, _, err = run(capsys, *command)
    assert code == 130 and f"nothing was saved: {tmp_path} holds no checkpoint yet" in err and "goes on" not in err
    checkpoint_path(tmp_path, 5).write_bytes(b"")
    code, _, err = run(capsys, *command)
    assert code == 130 and "--resume auto goes on from the last one" in err and "nothing was saved" not in err
    # under torchrun every rank gets Ctrl-C: rank 0's folder is the one with the checkpoints
    monkeypatch.setenv("RANK", "1")
    code, _, err = run(capsys, *command)
    assert code == 130 and err == "vitaclip train: interrupted (rank 1: rank 0 says what was kept)\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: vitaclip " + command in out
    if command == "train":
        assert "default: 0.0004" in out and "default: 30000" in out and "default: 256" in out


def test_every_option_of_every_command_says_what_it_is():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    unexplained = [(name, action.dest) for name, parser in commands.items() for action in parser._actions
                   if not action.help]
    assert unexplained == []
    # zeroshot's plain CLIP loads as train's backbone does: a file too, not only a tag
    pretrained = next(a for a in commands["zeroshot"]._actions if a.dest == "pretrained")
    assert "tag" in pretrained.help and "file" in pretrained.help


class Built(Exception):
    """Raised in place of building the backbone, carrying what it was asked for."""


def test_clip_flags_default_to_openai_vit_b16_and_are_refused_beside_the_model_they_would_not_pick(
        videos, tmp_path, capsys, monkeypatch):
    """--clip/--pretrained were taken and ignored beside --init (train) or --model (zeroshot): a run
    on other weights than those asked for."""
    from vitaclip.engine import checkpoint
    from vitaclip.model import VitaCLIP

    root, list_file = videos

    def built(*args, **kwargs):
        raise Built(args)

    monkeypatch.setattr(checkpoint, "build_backbone", built)
    monkeypatch.setattr(VitaCLIP, "plain_clip", built)
    train = ["train", "--train-list", list_file, "--data-root", list_file.parent, "--classes", root / "classes.txt",
             "--output-dir", tmp_path / "r", *CPU]
    zeroshot = ["zeroshot", "--split", list_file, "--classes", root / "classes.txt", "--data-root", list_file.parent,
                *CPU]
    with pytest.raises(Built) as asked:
        run(capsys, *train)
    assert asked.value.args[0][0] == {"kind": "clip", "name": "ViT-B-16-quickgelu", "pretrained": "openai"}
    with pytest.raises(Built) as asked:
        run(capsys, *zeroshot)
    assert asked.value.args[0] == ("ViT-B-16-quickgelu", "openai")
    with pytest.raises(Built) as asked:
        run(capsys, *zeroshot, "--clip", "ViT-B-32-quickgelu", "--pretrained", "")
    assert asked.value.args[0] == ("ViT-B-32-quickgelu", None)  # '': random weights
    for command, flags in ((train, ["--init", root / "model", "--clip", "ViT-L-14-quickgelu"]),
                           (train, ["--init", root / "model", "--pretrained", ""]),
                           (zeroshot, ["--model", root / "model", "--clip", "ViT-L-14-quickgelu", "--pretrained",
                                       "openai"])):
        code, _, err = run(capsys, *command, *flags)
        given = [flag for flag in ("--clip", "--pretrained") if flag in flags]
        verb = "pick" if len(given) > 1 else "picks"
        assert code == 2 and f"{' and '.join(given)} {verb} the CLIP to start from" in err, err
        assert ("--init" if "--init" in flags else "--model") + " gives the model" in err


@pytest.mark.parametrize("missing", ["--train-list", "--val-list"])
def test_train_names_a_missing_list_before_it_builds_the_model(missing, videos, tmp_path, capsys, monkeypatch):
    """The model came first: offline, the default CLIP's download error hid the mistyped list; online,
    minutes went by first."""
    from vitaclip.engine import checkpoint

    root, list_file = videos

    def built(*args, **kwargs):
        raise Built(args)

    monkeypatch.setattr(checkpoint, "build_backbone", built)
    lists = {"--train-list": list_file, "--val-list": list_file, missing: tmp_path / "typo.txt"}
    code, _, err = run(capsys, "train", *(a for pair in lists.items() for a in pair), "--data-root",
                       list_file.parent, "--classes", root / "classes.txt", "--output-dir", tmp_path / "r", *CPU)
    assert code == 2 and err == f"vitaclip train: error: list file {tmp_path / 'typo.txt'} does not exist\n"


def test_train_resume_eval_predict_zeroshot(videos, tmp_path, capsys):
    root, list_file = videos
    clips = list_file.parent
    common = ["--train-list", list_file, "--data-root", clips, "--classes", root / "classes.txt",
              "--init", root / "model", "--output-dir", tmp_path / "run", "--batch-size", 4, "--augment", "",
              "--checkpoint-every", 1, "--log-every", 1, "--precision", "fp32", "--no-tensorboard", *CPU]
    code, out, err = run(capsys, "train", *common, "--steps", 3, "--stop-after", 2)
    assert code == 0, err
    assert "step 2/3" in out
    code, out, err = run(capsys, "train", *common, "--steps", 3, "--resume", "auto", "--val-list", list_file)
    assert code == 0, err
    assert "step 3/3" in out and re.search(r"top-1 \d+\.\d\d at step 3$", out.strip())
    payload = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert payload["step"] == 3 and payload["backbone"]["kind"] == "pretrained"
    assert payload["loader"] == [{"epoch": 1, "batch_in_epoch": 0, "seed": 0}]  # 12 clips = 3 batches of 4
    # the resumed run (stopped mid-epoch) logged the losses of an uninterrupted one
    full = [a if a != tmp_path / "run" else tmp_path / "full" for a in common]
    assert run(capsys, "train", *full, "--steps", 3)[0] == 0
    losses = [(tmp_path / d / "train_log.csv").read_text().splitlines() for d in ("run", "full")]
    assert [r.split(",")[:2] for r in losses[0]] == [r.split(",")[:2] for r in losses[1]]
    assert len(losses[0]) == 4

    model = tmp_path / "run" / "model"
    code, out, err = run(capsys, "eval", "--model", model, "--list", list_file, "--data-root", clips,
                         "--temporal-views", 2, "--json", "--json-out", tmp_path / "e.json",
                         "--confusion-png", tmp_path / "c.png", "--scores-out", tmp_path / "s.safetensors", *CPU)
    assert code == 0, err
    result = json.loads(out)
    assert result["num_videos"] == 12 and result["num_views"] == 24 and 0 <= result["top1"] <= 1
    assert json.loads((tmp_path / "e.json").read_text()) == result and (tmp_path / "c.png").is_file()
    scores = read_video_scores(tmp_path / "s.safetensors")
    listed = [line.rsplit(",", 1) for line in Path(list_file).read_text().splitlines()]
    assert scores.paths == [str(clips / path) for path, _ in listed] and scores.video_ids == list(range(12))
    assert scores.labels.tolist() == [int(label) for _, label in listed] and scores.views.tolist() == [2] * 12
    assert (scores.probs.argmax(-1) == scores.labels).float().mean().item() == pytest.approx(result["top1"])

    code, out, err = run(capsys, "predict", "--model", tmp_path / "run", clips / "clip_00000.mp4",
                         clips / "clip_00001.mp4", "--top-k", 3, "--json", *CPU)
    assert code == 0, err
    preds = json.loads(out)
    assert [p["video"] for p in preds] == [str(clips / "clip_00000.mp4"), str(clips / "clip_00001.mp4")]
    for p in preds:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
        assert all(t["label"] in CLASSES for t in p["top"])
    code, out, err = run(capsys, "predict", "--model", model, clips / "clip_00000.mp4", "--top-k", 2, *CPU)
    assert code == 0 and out.startswith(str(clips / "clip_00000.mp4")) and len(out.strip().splitlines()) == 3
    code, out, err = run(capsys, "predict", "--model", tmp_path / "run", "clip_00000.mp4", "clip_00001.mp4",
                         "--top-k", 3, "--json", "--data-root", clips, *CPU, "--num-workers", 1)
    assert code == 0, err
    assert [p["top"] for p in json.loads(out)] == [p["top"] for p in preds]  # relative to the data root, in a worker

    code, out, err = run(capsys, "zeroshot", "--model", model, "--classes", root / "classes.txt",
                         "--split", list_file, "--split", f"{list_file}:{root / 'classes.txt'}",
                         "--data-root", clips, "--json", *CPU)
    assert code == 0, err
    zs = json.loads(out)
    assert list(zs["splits"]) == [str(list_file), f"{list_file}:{root / 'classes.txt'}"]
    assert zs["top1_std"] == pytest.approx(0.0, abs=1e-9)  # the same videos and classes twice
    assert zs["top1_mean"] == zs["splits"][str(list_file)]["top1"]


def test_zeroshot_scores_the_authors_checkpoint_without_its_class_names(videos, tmp_path, capsys):
    root, list_file = videos
    state = {f"module.{k}": v for k, v in tiny_model().state_dict().items()}
    torch.save({"model": state}, tmp_path / "authors.pth")
    command = ["zeroshot", "--model", tmp_path / "authors.pth", "--classes", root / "classes.txt",
               "--split", list_file, "--data-root", list_file.parent, "--json", *CPU]
    code, out, err = run(capsys, *command)
    assert code == 2 and "no CLIP has a vision width of 64" in err and "(--heads on the command line)" in err
    code, out, err = run(capsys, *command, "--heads", 2, "--text-heads", 2)  # the tiny model's
    assert code == 0, err
    assert json.loads(out)["splits"][str(list_file)]["num_videos"] == 12
    code, out, err = run(capsys, *command[:1], *command[3:], "--heads", 2)  # a plain CLIP: its own heads
    assert code == 2 and "--heads/--text-heads complete a --model file" in err


def test_scoring_commands_sample_clips_as_the_model_was_trained_unless_told(videos, tmp_path, capsys, monkeypatch):
    """The stride and the frame count of the model's training clips (a model trained from Python on clips of
    k x T0 frames: its T0 frames were all eval took)."""
    from vitaclip.data import VideoLoader

    root, list_file = videos
    model = tiny_model()
    model.training_data = {"stride": 2, "frames": 2 * FRAMES}
    model.save_pretrained(tmp_path / "model")
    sampled = []
    real_init = VideoLoader.__init__

    def spy(self, *args, **kwargs):
        sampled.append((kwargs["stride"], kwargs["num_frames"]))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(VideoLoader, "__init__", spy)
    scoring = [["eval", "--model", tmp_path / "model", "--list", list_file],
               ["zeroshot", "--model", tmp_path / "model", "--split", list_file, "--classes", root / "classes.txt"],
               ["predict", "--model", tmp_path / "model", list_file.parent / "clip_00000.mp4"]]
    cpu = [a for a in CPU if a not in ("--stride", "1")]
    for command in scoring:
        for given, used in (([], (2, 2 * FRAMES)), (["--stride", 5, "--frames", 3 * FRAMES], (5, 3 * FRAMES))):
            sampled.clear()
            code, _, err = run(capsys, *command, "--data-root", list_file.parent, *given, *cpu)
            assert code == 0 and sampled == [used], (command, err)
    sampled.clear()
    assert run(capsys, "zeroshot", "--model", root / "model", "--split", list_file, "--classes", root / "classes.txt",
               "--data-root", list_file.parent, *cpu)[0] == 0
    assert sampled == [(16, FRAMES)]  # a model without the record


def test_predict_skips_unreadable_videos_when_asked(videos, tmp_path, capsys, caplog):
    root, list_file = videos
    good = list_file.parent / "clip_00000.mp4"
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    files = [tmp_path / "corrupt.mp4", good, tmp_path / "missing.mp4"]
    code, out, err = run(capsys, "predict", "--model", root / "model", *files, "--json", *CPU)
    assert code == 2 and "missing.mp4" in err
    code, out, err = run(capsys, "predict", "--model", root / "model", good, files[0], *CPU)
    assert code == 2 and f"video 2: {files[0]}: cannot read video" in err and "videos.txt" not in err
    code, out, err = run(capsys, "predict", "--model", root / "model", *files, "--json", "--on-error", "skip", *CPU)
    assert code == 1 and "2 of 3 videos could not be read" in err
    assert "videos.txt" not in caplog.text  # its temporary list, named by the loader's warnings
    corrupt, read, missing = json.loads(out)
    assert "corrupt.mp4" in corrupt["error"] and "missing.mp4" in missing["error"] and "top" not in missing
    code, alone, _ = run(capsys, "predict", "--model", root / "model", good, "--json", *CPU)
    assert read == json.loads(alone)[0]
    code, out, err = run(capsys, "predict", "--model", root / "model", files[0], files[2], "--json", "--on-error",
                         "skip", *CPU)  # none readable
    assert code == 1 and "2 of 2 videos" in err and all("error" in p for p in json.loads(out))
    (tmp_path / "a (b): c.mp4").write_bytes(b"")
    code, out, err = run(capsys, "predict", "--model", root / "model", tmp_path / "a (b): c.mp4", good, "--json",
                         "--on-error", "skip", *CPU)
    assert json.loads(out)[0]["error"] == f"{tmp_path / 'a (b): c.mp4'}: empty file"
    code, out, err = run(capsys, "predict", "--model", root / "model", f"{good} ", *CPU)
    assert code == 2 and "white space" in err
    code, out, err = run(capsys, "predict", "--model", root / "model", tmp_path, *CPU)
    assert code == 2 and f"folder(s), not video files: ['{tmp_path}']" in err
    code, out, err = run(capsys, "predict", "--model", root / "model", tmp_path, good, "--json", "--on-error", "skip",
                         *CPU)
    assert code == 1 and json.loads(out)[0]["error"] == f"{tmp_path}: a folder, not a video"


def test_predict_takes_videos_from_a_file_or_standard_input(videos, capsys, monkeypatch, tmp_path):
    """More videos than a command line holds: --videos-from reads a path per line (blank lines aside),
    after the VIDEO arguments; '-' reads standard input. Neither, or a missing file, is named."""
    import io
    import sys

    root, list_file = videos
    files = [str(list_file.parent / f"clip_{i:05d}.mp4") for i in range(3)]
    code, whole, _ = run(capsys, "predict", "--model", root / "model", *files, "--json", *CPU)
    assert code == 0
    (tmp_path / "paths.txt").write_text(f"{files[1]}\n\n{files[2]}\r\n")
    code, out, _ = run(capsys, "predict", "--model", root / "model", files[0], "--videos-from", tmp_path / "paths.txt",
                       "--json", *CPU)
    assert code == 0 and out == whole
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(files) + "\n"))
    code, out, _ = run(capsys, "predict", "--model", root / "model", "--videos-from", "-", "--json", *CPU)
    assert code == 0 and out == whole
    code, _, err = run(capsys, "predict", "--model", root / "model", *CPU)
    assert code == 2 and "no videos to predict: give VIDEO files or --videos-from FILE" in err
    code, _, err = run(capsys, "predict", "--model", root / "model", "--videos-from", tmp_path / "none.txt", *CPU)
    assert code == 2 and f"video path file {tmp_path / 'none.txt'} does not exist" in err


def test_predict_refuses_a_labelled_list_and_names_a_few_of_many_missing_videos(videos, capsys, tmp_path):
    """--videos-from given a `path,label` list says what it is, not that each line is a missing video;
    of many missing videos the first few are named, with a count."""
    import shutil

    root, list_file = videos
    code, _, err = run(capsys, "predict", "--model", root / "model", "--videos-from", list_file, *CPU)
    assert code == 2 and "(the first: 'clip_00000.mp4," in err and "a labelled list" in err
    assert "vitaclip eval --list" in err and "not found" not in err
    shutil.copy(list_file.parent / "clip_00000.mp4", tmp_path / "clip,1")  # a video whose name reads so
    (tmp_path / "paths.txt").write_text(f"{tmp_path / 'clip,1'}\n")
    assert run(capsys, "predict", "--model", root / "model", "--videos-from", tmp_path / "paths.txt", *CPU)[0] == 0
    missing = [tmp_path / f"missing_{i}.mp4" for i in range(7)]
    code, _, err = run(capsys, "predict", "--model", root / "model", *missing, *CPU)
    assert code == 2 and "7 video file(s) not found" in err and str(missing[4]) in err and "and 2 more" in err
    assert str(missing[5]) not in err


def test_predict_refuses_to_run_under_torchrun(videos, capsys, monkeypatch):
    """Each process torchrun starts would score every video and print it, lines of all interleaved."""
    root, list_file = videos
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = run(capsys, "predict", "--model", root / "model", list_file.parent / "clip_00000.mp4", *CPU)
    assert code == 2 and out == "" and "predict runs in one process: run it without torchrun" in err


def test_predict_prints_each_video_as_soon_as_it_is_scored(videos, capsys, monkeypatch):
    """Over a long list, what was printed stays when the run stops at a later video (Ctrl-C, a crash):
    each video's result is printed once its views are scored; --json prints the list item by item,
    the same JSON when the run ends."""
    import vitaclip.engine.predict as predict_module
    from vitaclip.data import VideoDecodeError

    root, list_file = videos
    files = [list_file.parent / f"clip_{i:05d}.mp4" for i in range(3)]
    code, whole, _ = run(capsys, "predict", "--model", root / "model", *files, "--json", "--batch-size", 1, *CPU)
    assert code == 0 and [r["video"] for r in json.loads(whole)] == [str(f) for f in files]
    real_accumulate, scored, stop = predict_module.accumulate, [], [KeyboardInterrupt()]

    def stopped_at_the_third(*args):
        if len(scored) == 2:
            raise stop[0]
        scored.append(real_accumulate(*args))

    monkeypatch.setattr(predict_module, "accumulate", stopped_at_the_third)
    code, out, err = run(capsys, "predict", "--model", root / "model", *files, "--batch-size", 1, *CPU)
    assert code == 130 and out.startswith(f"{files[0]}\n  ") and f"\n{files[1]}\n  " in out
    assert str(files[2]) not in out
    scored.clear()
    code, out, err = run(capsys, "predict", "--model", root / "model", *files, "--json", "--batch-size", 1, *CPU)
    assert code == 130 and str(files[1]) in out and err.startswith("vitaclip predict: interrupted")
    # each item was printed whole, its comma with it: the lines printed are those of the whole run's list
    assert out.endswith("},\n") and whole.startswith(out)
    scored.clear()
    stop[0] = VideoDecodeError("video 3: cannot read video")  # (one that a probe read but cannot be decoded)
    code, out, err = run(capsys, "predict", "--model", root / "model", *files, "--json", "--batch-size", 1, *CPU)
    assert code == 2 and out.endswith("},\n") and whole.startswith(out) and err.startswith("vitaclip predict: error: video 3")


def test_a_split_whose_paths_hold_a_colon_is_cut_where_its_list_file_ends(tmp_path):
    from vitaclip.cli import parse_split

    folder = tmp_path / "run:1"
    folder.mkdir()
    (folder / "test.txt").write_text("a.mp4,0\n")
    (folder / "classes.txt").write_text("a\n")
    lst, classes = str(folder / "test.txt"), str(folder / "classes.txt")
    assert parse_split(lst, "default.txt") == (lst, "default.txt")
    assert parse_split(f"{lst}:{classes}", None) == (lst, classes)
    assert parse_split("missing.txt:classes.txt", None) == ("missing.txt", "classes.txt")  # named missing later
    with pytest.raises(ValueError, match="names no class list"):
        parse_split(lst, None)


def test_zeroshot_warns_of_classes_that_no_test_video_has(videos, tmp_path, capsys):
    root, list_file = videos
    command = ["zeroshot", "--model", root / "model", "--split", list_file, "--data-root", list_file.parent, *CPU]
    code, _, err = run(capsys, *command, "--classes", root / "classes.txt")
    assert code == 0 and "warning" not in err
    (tmp_path / "more.txt").write_text("\n".join([*CLASSES, "skydiving"]) + "\n")
    code, _, err = run(capsys, *command, "--classes", tmp_path / "more.txt")
    assert code == 0 and "1 of the 5 classes have no video" in err and "skydiving" in err


def test_a_bad_template_file_is_named_by_file_and_line(videos, tmp_path, capsys):
    root, list_file = videos
    command = ["zeroshot", "--model", root / "model", "--classes", root / "classes.txt", "--split", list_file,
               "--data-root", list_file.parent, *CPU]
    templates = tmp_path / "templates.txt"
    templates.write_text("a video of {}.\n\na clip of {} at {place}.\n")
    code, _, err = run(capsys, *command, "--templates", templates)
    assert code == 2 and f"{templates}:3: template 'a clip of {{}} at {{place}}.'" in err
    templates.write_text("\n  \n")
    code, _, err = run(capsys, *command, "--templates", templates)
    assert code == 2 and f"template file {templates} holds no templates" in err
    code, _, err = run(capsys, *command, "--templates", tmp_path / "none.txt")
    assert code == 2 and "template file" in err and "none.txt does not exist" in err
    templates.write_text("a video of {}.\nsomeone doing {}.\n")
    code, out, err = run(capsys, *command, "--templates", templates, "--json")
    assert code == 0, err
    assert json.loads(out)["templates"] == ["a video of {}.", "someone doing {}."]


def test_eval_and_zeroshot_print_on_the_main_process_only(videos, capsys, monkeypatch):
    from vitaclip.engine import distributed

    root, list_file = videos
    second = distributed.DistEnv(rank=1, world_size=1, local_rank=1, device=torch.device("cpu"))
    monkeypatch.setattr(distributed, "init_distributed", lambda device=None: second)  # a second rank, alone
    data = ["--data-root", list_file.parent, *CPU]
    assert run(capsys, "eval", "--model", root / "model", "--list", list_file, *data)[:2] == (0, "")
    assert run(capsys, "zeroshot", "--model", root / "model", "--classes", root / "classes.txt", "--split",
               list_file, *data)[:2] == (0, "")


def test_folders_given_for_files_are_named_as_folders_in_one_line(videos, tmp_path, capsys):
    root, list_file = videos
    data = ["--data-root", list_file.parent, *CPU]
    for argv, problem in ((["eval", "--model", root / "model", "--list", tmp_path, *data], "is a folder, not a list"),
                          (["zeroshot", "--model", root / "model", "--classes", root / "classes.txt", "--split",
                            list_file, "--templates", tmp_path, *data], "is a folder, not a list"),
                          (["eval", "--model", root / "model", "--list", list_file, "--json-out",
                            root / "classes.txt" / "x.json", *data], "its folder cannot be made")):
        code, _, err = run(capsys, *argv)
        assert code == 2 and problem in err and "Traceback" not in err, argv


def test_bench_reports_model_and_loader_throughput(videos, capsys):
    _, list_file = videos
    code, out, err = run(capsys, "bench", "--tiny", "--frames", FRAMES, "--batch-size", 2, "--iters", 2,
                         "--warmup", 1, "--train", "--list", list_file, "--data-root", list_file.parent,
                         "--json", *CPU)
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "tiny" and report["loader"] == "pyav" and report["loader_pipeline"] == "train"
    for key in ("inference_clips_per_s", "train_clips_per_s", "loader_clips_per_s"):
        assert report[key] > 0
    code, out, err = run(capsys, "bench", "--tiny", "--frames", FRAMES, "--batch-size", 16, "--iters", 2,
                         "--warmup", 1, "--train", "--list", list_file, "--data-root", list_file.parent, *CPU)
    assert code != 0 and f"{list_file}: a training epoch takes whole batches of 16 videos" in err  # it looped forever


def test_errors_are_clear_before_training(videos, tmp_path, capsys):
    root, list_file = videos
    base = ["train", "--data-root", list_file.parent, "--init", root / "model", "--output-dir", tmp_path / "r",
            "--steps", 1, "--batch-size", 4, "--no-tensorboard", *CPU]
    code, _, err = run(capsys, *base, "--train-list", tmp_path / "missing.txt", "--classes", root / "classes.txt")
    assert code == 2 and "missing.txt does not exist" in err
    code, _, err = run(capsys, *base, "--train-list", list_file, "--classes", tmp_path / "nope.txt")
    assert code == 2 and "nope.txt does not exist" in err
    bad = tmp_path / "bad.txt"
    bad.write_text(list_file.read_text() + "clip_00000.mp4,9\n")
    code, _, err = run(capsys, *base, "--train-list", bad, "--classes", root / "classes.txt")
    assert code == 2 and "label 9 out of range" in err and "bad.txt:13" in err and "class list has 4 names" in err
    gone = tmp_path / "gone.txt"
    gone.write_text("no_such_clip.mp4,0\n")
    code, _, err = run(capsys, *base, "--train-list", gone, "--classes", root / "classes.txt")
    assert code == 2 and "gone.txt:1" in err and "no_such_clip.mp4): file not found" in err
    assert not (tmp_path / "r").exists()


def test_init_from_a_model_of_other_classes_trains_a_fresh_context_for_them(videos, tmp_path, capsys):
    root, list_file = videos
    five = tmp_path / "five.txt"
    five.write_text("\n".join(CLASSES + ("waving",)))
    command = ["train", "--data-root", list_file.parent, "--init", root / "model", "--output-dir", tmp_path / "r",
               "--steps", 2, "--batch-size", 4, "--no-tensorboard", *CPU, "--train-list", list_file, "--classes", five]
    with pytest.warns(UserWarning, match="learned for its 4 classes, not these 5: it starts afresh"):
        code, _, err = run(capsys, *command, "--stop-after", 1)
    assert code == 0, err
    assert load_checkpoint(latest_checkpoint(tmp_path / "r"))["model"]["prompt_learner.ctx"].shape[0] == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # resumed: the checkpoint's context replaces the fresh one, no news
        code, out, err = run(capsys, *command, "--resume", "auto")
    assert code == 0 and "step 2/2" in out, err


def test_training_warns_of_classes_without_a_training_video(videos, tmp_path, capsys):
    root, list_file = videos
    lines = list_file.read_text().splitlines()
    partial = tmp_path / "partial.txt"
    partial.write_text("\n".join(line for line in lines if not line.endswith(",3")) + "\n")
    code, _, err = run(capsys, "train", "--data-root", list_file.parent, "--init", root / "model", "--output-dir",
                       tmp_path / "r", "--steps", 1, "--batch-size", 4, "--no-tensorboard", *CPU,
                       "--train-list", partial, "--classes", root / "classes.txt")
    assert code == 0 and "1 of the 4 classes have no video" in err and "'moving left'" in err


def test_resume_auto_says_when_it_finds_no_checkpoint_and_starts_afresh(videos, tmp_path, capsys, monkeypatch):
    import logging

    root, list_file = videos
    monkeypatch.setattr(logging.root, "handlers", [])  # as outside pytest, whose handlers would take the note
    code, _, err = run(capsys, "train", "--train-list", list_file, "--data-root", list_file.parent, "--classes",
                       root / "classes.txt", "--init", root / "model", "--output-dir", tmp_path / "r", "--steps", 1,
                       "--batch-size", 4, "--augment", "", "--no-tensorboard", *CPU, "--resume", "auto")
    assert code == 0 and f"--resume auto) found no checkpoint in {tmp_path / 'r'}: a fresh run starts" in err


def test_a_fresh_run_in_a_used_output_dir_needs_overwrite(videos, tmp_path, capsys):
    root, list_file = videos
    argv = ["train", "--train-list", list_file, "--data-root", list_file.parent, "--classes", root / "classes.txt",
            "--init", root / "model", "--output-dir", tmp_path / "r", "--steps", 1, "--batch-size", 4,
            "--augment", "", "--precision", "fp32", "--no-tensorboard", *CPU]
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--resume auto" in err and "--overwrite" in err
    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err


def test_bad_videos_stop_the_run_or_are_skipped_and_counted(videos, tmp_path, capsys):
    root, list_file = videos
    bad = tmp_path / "bad.txt"
    bad.write_text(list_file.read_text() + "no_such_clip.mp4,0\n")
    base = ["eval", "--model", root / "model", "--list", bad, "--data-root", list_file.parent, "--json", *CPU]
    code, _, err = run(capsys, *base)
    assert code == 2 and "bad.txt:13" in err and "file not found" in err
    code, out, err = run(capsys, *base, "--on-error", "skip")
    assert code == 0, err
    assert json.loads(out)["num_videos"] == 12 and "skipped 1 bad list lines or videos" in err
    assert json.loads(out)["num_skipped"] == 1  # a record kept with the accuracies, not only a message
    code, out, err = run(capsys, *[a for a in base if a != "--json"], "--on-error", "skip")
    assert code == 0 and out.rstrip().endswith("(12 videos, 12 views, 1 skipped)")
    code, _, err = run(capsys, *base, "--min-frames", 1000)
    assert code == 2 and "bad.txt:1" in err and "fewer than 1000" in err


def test_init_takes_the_architecture_flags_and_refuses_contradicting_a_trained_model(videos, tmp_path):
    root, _ = videos
    backbone = {k: v for k, v in tiny_model().state_dict().items()  # the authors' converted CLIP
                if not any(s in k for s in ("summary", "local", "global", "time_embed", "cls_proj",
                                            "prompt_learner", "logit_scale"))}
    torch.save(backbone, tmp_path / "backbone.pth")
    flags = ["--frames", 3, "--n-ctx", 2, "--shared-ctx", "--ctx-position", "front", "--global-prompts", 5,
             "--no-summary", "--no-global", "--train-cls-proj"]

    def build(init, *argv):
        args = build_parser().parse_args(["train", "--train-list", "list.txt", "--classes", "classes.txt",
                                          "--init", str(init), *map(str, argv)])
        return build_training_model(args, list(CLASSES))[0].config

    config = build(tmp_path / "backbone.pth", *flags, "--heads", 2, "--text-heads", 2)  # widths no CLIP has
    assert (config.num_frames, config.n_ctx, config.csc, config.ctx_position, config.num_global_prompts,
            config.use_summary, config.use_local, config.use_global, config.train_cls_proj) == (
        3, 2, False, "front", 5, False, True, False, True)
    assert build(root / "model", "--frames", FRAMES).num_frames == FRAMES  # agrees with the saved model
    with pytest.raises(ValueError, match=r"'num_frames': \(3, 2\).*'csc': \(False, True\)"):
        build(root / "model", *flags)


def test_init_from_a_trained_model_may_train_its_cls_proj_too(videos):
    """--train-cls-proj chooses which weights the run trains, not the architecture: it was refused for a saved model
    or checkpoint as contradicting it (and taken for the authors' file)."""
    root, _ = videos
    args = build_parser().parse_args(["train", "--train-list", "list.txt", "--classes", "classes.txt",
                                      "--init", str(root / "model"), "--train-cls-proj"])
    model = build_training_model(args, list(CLASSES))[0]
    cls_proj = [p for name, p in model.named_parameters() if ".cls_proj." in name]
    assert model.config.train_cls_proj and cls_proj and all(p.requires_grad for p in cls_proj)


def test_a_resume_with_another_stride_is_refused_unless_asked_to_go_on_with_it(videos, tmp_path, capsys):
    root, list_file = videos
    cpu = [a for a in CPU if a not in ("--stride", "1")]
    common = ["train", "--train-list", list_file, "--data-root", list_file.parent, "--classes", root / "classes.txt",
              "--init", root / "model", "--output-dir", tmp_path / "run", "--batch-size", 4, "--augment", "",
              "--steps", 2, "--precision", "fp32", "--no-tensorboard", *cpu]
    assert run(capsys, *common, "--stride", 1, "--stop-after", 1)[0] == 0
    code, _, err = run(capsys, *common, "--stride", 2, "--resume", "auto")
    assert code == 2 and "training data stride: 1 -> 2" in err and "--resume-with-changes" in err
    with pytest.warns(UserWarning, match="with changed settings, from its step 1 on: training data stride: 1 -> 2"):
        code, _, err = run(capsys, *common, "--stride", 2, "--resume", "auto", "--resume-with-changes")
    assert code == 0, err
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["train_data"]["stride"] == 2


def test_evaluations_during_training_without_videos_to_evaluate_on_are_refused(videos, tmp_path, capsys):
    """--eval-every without --val-list evaluated nothing, silently."""
    root, list_file = videos
    code, _, err = run(capsys, "train", "--train-list", list_file, "--data-root", list_file.parent, "--classes",
                       root / "classes.txt", "--init", root / "model", "--output-dir", tmp_path / "run", "--steps", 2,
                       "--eval-every", 1, *CPU)
    assert code == 2 and "--eval-every needs the videos to evaluate on: give --val-list" in err
    assert not (tmp_path / "run").exists()


def test_loader_batch_must_fit_the_global_batch(videos, tmp_path):
    from vitaclip.data import VideoLoader
    from vitaclip.engine.train import train
    from engine_helpers import tiny_train_config

    root, list_file = videos
    loader = VideoLoader(str(list_file), str(list_file.parent), train=True, batch_size=2, num_frames=FRAMES,
                         stride=1, size=SIZE, augment=None, backend="pyav", device="cpu", num_workers=0,
                         shard_id=0, num_shards=1)
    with pytest.raises(ValueError, match="batches of 2 clips"):
        train(tiny_model(), loader, tiny_train_config(tmp_path / "a", steps=2, batch_size=4))
    result = train(tiny_model(), loader, tiny_train_config(tmp_path / "b", steps=2, batch_size=4, micro_batch_size=2))
    assert result.finished  # 2 micro-batches of 2 accumulated per step


def test_demo_learns(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--small", "--output-dir", tmp_path, "--no-progress")
    assert code == 0, err
    summary = json.loads((tmp_path / "demo.json").read_text())
    assert "accuracy" in out and summary["steps"] == 120
    assert summary["accuracy"] >= 0.6  # chance is 0.25
    assert (tmp_path / "data" / "train" / "list.txt").is_file()  # trained from real video files
    for kind in ("growing", "shrinking"):
        assert summary["per_class"][kind] >= 0.9, summary


def test_demo_runs_again_in_the_same_folder(tmp_path):
    """A demo is a fresh run each time: the earlier run's checkpoints are replaced, not refused."""
    from vitaclip.demo import DemoConfig, run_demo

    config = DemoConfig(output_dir=str(tmp_path), steps=2, batch_size=4, train_size=8, test_size=4,
                        video_files=False, progress=False)
    for _ in range(2):
        assert run_demo(config)["steps"] == 2


def test_train_stopped_by_a_signal_exits_75_checkpointed_and_resumes(videos, tmp_path, capsys, monkeypatch):
    import signal

    from vitaclip.data import loader as loader_module
    root, list_file = videos
    common = ["--train-list", list_file, "--data-root", list_file.parent, "--classes", root / "classes.txt",
              "--init", root / "model", "--output-dir", tmp_path / "run", "--batch-size", 4, "--augment", "",
              "--checkpoint-every", 10, "--precision", "fp32", "--no-tensorboard", *CPU, "--steps", 3]
    decoded, decode = [], loader_module.decode_with_pyav

    def decode_then_signal(*args, **kw):  # the 6th clip is in step 2
        decoded.append(args[0])
        if len(decoded) == 6:
            os.kill(os.getpid(), signal.SIGUSR1)
        return decode(*args, **kw)

    monkeypatch.setattr(loader_module, "decode_with_pyav", decode_then_signal)
    previous = signal.signal(signal.SIGUSR1, lambda *_: None)  # were the handler missing, the test goes on
    try:
        code, out, err = run(capsys, "train", *common, "--stop-signals", "usr1")
        # on its way out, checkpointed: a repeat of the stop (e.g. during the decoding pool's teardown) is ignored
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert code == 75, err
    assert "stopped by SIGUSR1 after step 2" in out and "step 2/3" in out
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == 2
    code, out, err = run(capsys, "train", *common, "--resume", "auto")
    assert code == 0 and "step 3/3" in out, err
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", "--stop-signals", "TERM,NOPE"])
    assert exit_.value.code == 2 and "unknown signal 'NOPE'" in capsys.readouterr().err


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_jobs_stop_signal_sent_twice_to_every_process_stops_training_with_decoding_workers(videos, tmp_path, stop):
    """As SLURM and torchrun signal a job: SIGTERM to every process of the run, the decoding
    workers included, twice within milliseconds. The workers keep decoding for the rank's last
    step, which ends checkpointed. Ctrl-C in a terminal, SIGINT to the foreground process group,
    does the same when named a stop signal (README)."""
    import signal
    import subprocess
    import sys
    import time

    root, list_file = videos
    command = [sys.executable, "-m", "vitaclip", "train", "--train-list", list_file, "--data-root", list_file.parent,
               "--classes", root / "classes.txt", "--init", root / "model", "--output-dir", tmp_path,
               "--batch-size", 4, "--augment", "", "--checkpoint-every", 1000, "--precision", "fp32",
               "--no-tensorboard", *CPU, "--num-workers", 2, "--steps", 1000, "--log-every", 1,
               *(["--stop-signals", "SIGTERM,SIGUSR1,SIGINT"] if stop == "SIGINT" else [])]
    run = subprocess.Popen([str(a) for a in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # its own process group, to be signalled as a whole
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "train_log.csv").is_file() and len((tmp_path / "train_log.csv").read_text()
                                                                   .splitlines()) > 2):
            assert run.poll() is None and time.monotonic() < deadline, run.communicate()
            time.sleep(0.05)
        os.killpg(run.pid, signal.Signals[stop])
        os.killpg(run.pid, signal.Signals[stop])
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 75, err
    step = int(re.search(rf"stopped by {stop} after step (\d+),", out).group(1))
    assert 2 <= step < 1000 and load_checkpoint(latest_checkpoint(tmp_path))["step"] == step


def test_flag_and_device_mistakes_are_named(videos, tmp_path, capsys):
    root, list_file = videos
    base = ["eval", "--model", root / "model", "--list", list_file, "--data-root", list_file.parent, *CPU]
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in base + ["--temporal-views", 0]])
    assert exit_.value.code == 2 and "--temporal-views: '0' is not a whole number >= 1" in capsys.readouterr().err
    code, _, err = run(capsys, *base, "--device", "cpus")
    assert code == 2 and "device 'cpus' is not one: cpu, cuda or cuda:N" in err


def test_a_negative_bench_warmup_is_refused_naming_it(capsys):
    """A negative warm-up ran none, as 0 does, while the report's reader took the figure as warmed up."""
    from vitaclip.engine.bench import bench_model

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["bench", "--tiny", "--warmup", "-1"])
    assert exit_.value.code == 2 and "--warmup: '-1' is not a whole number >= 0" in capsys.readouterr().err
    assert build_parser().parse_args(["bench", "--tiny", "--warmup", "0"]).warmup == 0
    with pytest.raises(ValueError, match="warmup must be >= 0, got -1"):
        bench_model(tiny=True, warmup=-1, device="cpu")


def test_decoding_workers_default_to_the_process_share_of_the_cores(monkeypatch, vp9_dataset):
    """A fixed 4 starved a 16-core, one-GPU machine's loader and oversubscribed small ones; the
    CLI's --num-workers and VideoLoader's num_workers default to the same share."""
    from vitaclip.cli import build_parser
    from vitaclip.data import VideoLoader
    from vitaclip.choices import default_num_workers as default_workers

    root, _ = vp9_dataset
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert build_parser().parse_args(["eval", "--model", "m", "--list", "l"]).num_workers == 2
    assert VideoLoader(str(root / "list.csv"), str(root), train=False, batch_size=1, backend="pyav",
                       device="cpu").num_workers == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 15
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)  # a job's cpuset
    assert default_workers() == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert default_workers() == 1


def dist_env(r, world_size=2):
    return distributed.DistEnv(rank=r, world_size=world_size, local_rank=r, device=torch.device("cpu"))


def test_skip_mode_counts_the_videos_skipped_on_every_rank_once(monkeypatch, capsys):
    """Each rank skips the bad videos of its shard: the count is of all ranks', a video skipped on two once,
    printed by the main process alone."""
    others = {"list.csv:7: gone.webm: file not found", "list.csv:9: bad.webm: cannot read video"}
    mine = ["list.csv:9: bad.webm: cannot read video", "list.csv:2: empty.webm: empty file"]
    monkeypatch.setattr(distributed, "all_gather_objects", lambda env, obj: [set(obj), others])
    args = SimpleNamespace(on_error="skip", command="eval")
    cli.report_skipped(args, dist_env(0), SimpleNamespace(skipped=mine), None)
    assert "vitaclip eval: skipped 3 bad list lines or videos" in capsys.readouterr().err
    cli.report_skipped(args, dist_env(1), SimpleNamespace(skipped=mine), None)
    assert capsys.readouterr().err == ""


class RecordingLoader:
    made = []

    def __init__(self, *args, **kwargs):
        self.made.append((args, kwargs))
        self.videos = []


@pytest.mark.parametrize("command", ["train", "eval", "zeroshot"])
def test_the_data_flags_reach_the_loader(tmp_path, monkeypatch, command):
    """--worker-timeout (README: default 600), --min-frames, --on-error and progress (main process only)
    are given to the VideoLoader."""
    import vitaclip.data

    (tmp_path / "list.csv").write_text("v.webm,0\n")
    monkeypatch.setattr(vitaclip.data, "VideoLoader", RecordingLoader)
    required = {"train": ["--train-list", "x", "--classes", "c"], "eval": ["--model", "m", "--list", "x"],
                "zeroshot": ["--split", "x"]}[command]
    for flags, env, want in (
            ([], dist_env(0, 1), dict(worker_timeout=600.0, min_frames=1, on_error="raise", progress=True)),
            (["--worker-timeout", "7.5", "--min-frames", "4", "--on-error", "skip"], dist_env(0, 1),
             dict(worker_timeout=7.5, min_frames=4, on_error="skip", progress=True)),
            ([], dist_env(1), dict(progress=False)), (["--no-progress"], dist_env(0, 1), dict(progress=False))):
        args = cli.build_parser().parse_args([command, *required, "--stride", "2", *flags])
        RecordingLoader.made.clear()
        cli.video_loader(args, env, str(tmp_path / "list.csv"), ["a"], False, 8, 224)
        (_, kwargs), = RecordingLoader.made
        assert {k: kwargs[k] for k in want} == want, flags
