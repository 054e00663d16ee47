"""`vitaclip train`'s flags: checked before the model is built, and reaching the right setting."""
import pytest
import torch

from engine_helpers import CLASSES, Built, cli_videos, one_thread, tiny_model  # noqa: F401
from vitaclip import cli
from vitaclip.engine import distributed

pytest.importorskip("av")


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return cli_videos(tmp_path_factory, "review", 4, saved_model=False)


def train_argv(videos, tmp_path, *flags):
    root, list_file = videos
    return [str(a) for a in ("train", "--train-list", list_file, "--data-root", list_file.parent, "--classes",
                             root / "classes.txt", "--output-dir", tmp_path / "r", "--device", "cpu", "--decoder",
                             "pyav", "--num-workers", 0, "--no-progress", *flags)]


@pytest.fixture
def no_model(monkeypatch):
    """Building the model (the default CLIP's download: minutes, or an error offline) raises Built."""
    def built(*args, **kwargs):
        raise Built

    monkeypatch.setattr(cli, "build_training_model", built)


@pytest.mark.parametrize("flags, message", [
    (["--steps", 2, "--warmup-steps", 5], "warmup_steps must be in [0, steps]"),
    (["--lr", 0], "lr must be"),
    (["--lr", 1e-4, "--min-lr", 1e-3], "min_lr must be in [0, lr]"),
    (["--seed", -1], "seed must be"),
    (["--keep-checkpoints", -1], "keep_checkpoints must be"),
    (["--grad-clip", 0], "grad_clip must be"),
    (["--resume-with-changes"], "resume_with_changes applies to a resumed run"),
    (["--resume", "auto", "--overwrite"], "overwrite starts a fresh run"),
])
def test_bad_optimisation_and_run_settings_are_named_before_the_model_is_built(
        flags, message, videos, tmp_path, capsys, no_model):
    """They were checked by train(), after the model was built: offline, the default CLIP's download
    error hid them; online, they came minutes (and the videos' probing) later."""
    code = cli.main(train_argv(videos, tmp_path, *flags))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


@pytest.mark.parametrize("flags", [["--temporal-views", 4], ["--spatial-crops", 3]])
def test_evaluation_views_without_videos_to_evaluate_on_are_refused(flags, videos, tmp_path, capsys, no_model):
    """They shape the evaluations during training only: without --val-list there are none, and they were
    silently ignored (as --eval-every was)."""
    code = cli.main(train_argv(videos, tmp_path, *flags))
    err = capsys.readouterr().err
    assert code == 2 and f"{flags[0]} sets the views of the evaluations during training: give --val-list" in err, err


def test_a_bad_randaugment_spec_is_named_before_the_model_is_built(videos, tmp_path, capsys, no_model):
    code = cli.main(train_argv(videos, tmp_path, "--augment", "rand-m7-n4-bogus"))
    err = capsys.readouterr().err
    assert code == 2 and "unknown RandAugment section 'bogus'" in err, err


@pytest.mark.parametrize("flags, world_size, message", [
    (["--batch-size", 256], 3, "global batch 256 does not divide among 3 processes"),
    (["--batch-size", 2], 4, "global batch 2 does not divide among 4 processes"),
    (["--batch-size", 8, "--micro-batch-size", 3], 2, "global batch 8 cannot be split into micro-batches of 3"),
])
def test_a_global_batch_that_does_not_split_among_the_processes_is_named_as_given(
        flags, world_size, message, videos, tmp_path, capsys, monkeypatch, no_model):
    """The command line divided --batch-size among the processes itself, rounding down, and gave train() that
    as the micro-batch: 256 over 3 processes was refused for micro-batches of 85 the user never gave, 2 over 4
    as a loader batch_size of 0."""
    env = distributed.DistEnv(rank=0, world_size=world_size, local_rank=0, device=torch.device("cpu"))
    monkeypatch.setattr(distributed, "init_distributed", lambda device=None: env)
    code = cli.main(train_argv(videos, tmp_path, *flags))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


@pytest.mark.parametrize("flag", ["--n-ctx", "--global-prompts"])
def test_negative_prompt_counts_are_refused_by_the_parser(flag, capsys):
    """They reached the model's config, checked after the CLIP's weights were loaded (offline: the download
    error hid them; online: minutes later)."""
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["train", "--train-list", "l", "--classes", "c", flag, "-1"])
    assert exit_.value.code == 2 and f"{flag}: '-1' is not a whole number >= 0" in capsys.readouterr().err
    assert getattr(parser.parse_args(["train", "--train-list", "l", "--classes", "c", flag, "0"]),
                   flag[2:].replace("-", "_")) == 0  # none: a valid architecture


@pytest.mark.parametrize("backend, message", [("bogus", "unknown backend 'bogus'"),
                                              ("fast", "backend 'fast' is not available on device cpu")])
def test_a_backend_unknown_or_not_on_the_device_is_named_before_the_model_is_built(
        backend, message, videos, tmp_path, capsys, no_model):
    """--backend fast on the CPU was refused at the first training step, after the model, the loaders and the
    run folder (its logs and lock); an unknown name after the model (offline: hidden by the download error)."""
    code = cli.main(train_argv(videos, tmp_path, "--backend", backend))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "r").exists()


def test_init_from_other_classes_warns_of_the_fresh_context_when_resume_auto_finds_no_checkpoint(
        videos, tmp_path, capsys):
    """The warning was hidden whenever --resume was given, for a checkpoint's context replaces the fresh one;
    but a requeue script's first run (--resume auto, no checkpoint yet) starts from that fresh context."""
    root, _ = videos
    tiny_model().save_pretrained(tmp_path / "model")
    five = tmp_path / "five.txt"
    five.write_text("\n".join(CLASSES + ("waving",)))
    argv = train_argv(videos, tmp_path, "--init", tmp_path / "model", "--resume", "auto", "--steps", 1,
                      "--batch-size", 4, "--augment", "", "--stride", 1, "--precision", "fp32", "--no-tensorboard")
    argv[argv.index(str(root / "classes.txt"))] = str(five)
    with pytest.warns(UserWarning, match="learned for its 4 classes, not these 5: it starts afresh"):
        code = cli.main(argv)
    assert code == 0, capsys.readouterr().err


def test_bf16_on_a_gpu_without_it_is_named_before_the_model_is_built(videos, tmp_path, capsys, monkeypatch, no_model):
    """bf16, the default, on a V100 was refused by train() itself, after the model and the loaders (whose
    probing of every video of a large list takes minutes)."""
    cuda = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    monkeypatch.setattr(distributed, "init_distributed", lambda device=None: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    code = cli.main(train_argv(videos, tmp_path, "--backend", "reference"))
    err = capsys.readouterr().err
    assert code == 2 and "precision bf16 needs a GPU with bfloat16 arithmetic" in err and "V100" in err, err
