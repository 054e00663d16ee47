"""Review of prediction (the API and `vitaclip predict`), zero-shot, `bench` and `demo`: each test
documents a bug found, failing before its fix."""
import pytest
import torch

from engine_helpers import FRAMES, one_thread, tiny_data, tiny_model  # noqa: F401
from vitaclip.engine.predict import predict

CPU = dict(device="cpu", precision="fp32")


def test_predict_takes_video_tensors_of_different_lengths_in_one_batch():
    """Whole videos as tensors have their own frame counts, which the model takes one by one: in one
    batch they crashed in torch.cat ('Sizes of tensors must match except in dimension 0'), though
    batch_size=1 scored them. Each is scored as it is alone, in the order given."""
    model = tiny_model().eval()
    clips = [tiny_data(3)[i][0] for i in range(3)]
    videos = [clips[0], torch.cat([clips[1], clips[1]], dim=1), torch.stack([clips[2], clips[2].flip(-1)])]
    alone = [predict(model, [v], top_k=4, **CPU)[0]["top"] for v in videos]
    together = predict(model, videos, top_k=4, batch_size=3, **CPU)
    assert [r["video"] for r in together] == ["tensor 0", "tensor 1", "tensor 2"]
    for r, expected in zip(together, alone):
        assert [t["label"] for t in r["top"]] == [t["label"] for t in expected]
        assert [t["probability"] for t in r["top"]] == pytest.approx([t["probability"] for t in expected], abs=1e-5)


def test_demo_refuses_a_negative_seed_by_name_before_it_writes_anything(tmp_path, capsys):
    """`vitaclip demo --seed -1` ended with numpy's 'error: expected non-negative integer' (from the
    synthetic clips' generator), naming no setting; train refuses such a seed as 'seed must be >= 0'."""
    from vitaclip.cli import main

    assert main(["demo", "--seed", "-1", "--output-dir", str(tmp_path / "demo"), "--no-progress"]) == 2
    assert "seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_zeroshot_takes_its_splits_from_a_generator():
    """Splits made on the fly (`Split(...) for ...`) were used up by the check of their names, and
    zeroshot() then said 'no splits to aggregate'."""
    from engine_helpers import CLASSES
    from vitaclip.engine.evaluate import EvalConfig
    from vitaclip.engine.zeroshot import Split, zeroshot

    config = EvalConfig(batch_size=4, num_workers=0, progress=False, **CPU)
    data = {"a": tiny_data(4), "b": tiny_data(4, seed=1)}
    listed = zeroshot(tiny_model(), [Split(name, CLASSES, d) for name, d in data.items()], config=config)
    made = zeroshot(tiny_model(), (Split(name, CLASSES, d) for name, d in data.items()), config=config)
    assert list(made.splits) == ["a", "b"] and made.top1_mean == listed.top1_mean


def test_predict_takes_videos_from_an_iterator():
    """`predict(model, Path(folder).glob("*.mp4"))`: a generator failed as "object of type 'generator' has
    no len()"."""
    model = tiny_model().eval()
    clips = [tiny_data(2)[i][0] for i in range(2)]
    assert predict(model, (c for c in clips), **CPU) == predict(model, clips, **CPU)


@pytest.mark.parametrize("setting", [dict(temporal_views=3), dict(spatial_crops=3), dict(frames=8), dict(stride=2)])
def test_predict_refuses_sampling_settings_for_tensors_rather_than_ignore_them(setting):
    """Tensors are clips already sampled and cropped: the settings of how clips are taken from files
    (views, frames, stride) were silently ignored, e.g. temporal_views=3 on a whole video's tensor
    scored it as one long clip, not as the mean of three."""
    clip = tiny_data(1)[0][0]
    with pytest.raises(ValueError, match=f"{next(iter(setting))}.*video files"):
        predict(tiny_model(), [clip], **setting, **CPU)


def test_predict_refuses_frames_the_model_cannot_take_before_it_reads_the_videos(tmp_path, monkeypatch):
    """frames=3 for a model of T0 = 2 was refused by the model at the first batch, after every video of
    the list had been read through for its frame count (minutes for a large folder)."""
    from vitaclip.data import loader

    def probed(*args, **kwargs):
        raise AssertionError("the videos were read before the frames were checked")

    monkeypatch.setattr(loader, "video_infos", probed)
    (tmp_path / "a.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match=f"frames = 3 frames is not a multiple of the model's T0 = {FRAMES}"):
        predict(tiny_model(), [str(tmp_path / "a.mp4")], frames=3, **CPU)


def test_bench_names_a_missing_list_before_it_times_the_model(tmp_path, monkeypatch, capsys):
    """`vitaclip bench --list typo.txt` timed the model first (minutes for ViT-L on a CPU), then said the
    list does not exist."""
    from vitaclip.cli import main
    from vitaclip.engine import bench

    def timed(*args, **kwargs):
        raise AssertionError("the model was timed before the list was looked for")

    monkeypatch.setattr(bench, "bench_model", timed)
    assert main(["bench", "--tiny", "--device", "cpu", "--list", str(tmp_path / "typo.txt")]) == 2
    assert "typo.txt does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "zeroshot"])
def test_eval_and_zeroshot_refuse_frames_the_model_cannot_take_before_they_read_the_videos(command, tmp_path,
                                                                                          monkeypatch, capsys):
    """--frames 3 for a model of T0 = 2 was refused by the model at the first batch, after every video of
    the list had been read through for its frame count (minutes for a large list)."""
    from vitaclip.cli import main
    from vitaclip.data import loader

    def probed(*args, **kwargs):
        raise AssertionError("the videos were read before --frames was checked")

    monkeypatch.setattr(loader, "video_infos", probed)
    tiny_model().save_pretrained(tmp_path / "model")
    (tmp_path / "list.txt").write_text("a.mp4,0\n")
    (tmp_path / "classes.txt").write_text("growing\nshrinking\nmoving right\nmoving left\n")
    split = ["--list", tmp_path / "list.txt"] if command == "eval" else ["--split", tmp_path / "list.txt",
                                                                         "--classes", tmp_path / "classes.txt"]
    code = main([str(a) for a in [command, "--model", tmp_path / "model", *split, "--frames", 3, "--device", "cpu",
                                  "--num-workers", 0, "--no-progress"]])
    assert code == 2 and "--frames = 3 frames is not a multiple of the model's T0 = 2" in capsys.readouterr().err
