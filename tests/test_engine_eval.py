"""Evaluation (views averaged per video, metrics, outputs), zero-shot splits, prediction."""
import json
import statistics

import pytest
import torch

from engine_helpers import CLASSES, FRAMES, SIZE, one_thread, tiny_data, tiny_model  # noqa: F401
from vitaclip import VitaCLIP
from vitaclip.demo import demo_model_config
from vitaclip.engine.evaluate import EvalConfig, EvalResult, evaluate, merge, read_video_scores, scores
from vitaclip.engine.predict import predict
from vitaclip.engine.zeroshot import Split, aggregate, zeroshot

CPU = dict(device="cpu", num_workers=0, progress=False, precision="fp32")


class MultiView:
    """Items with V views [V, 3, T, H, W]: the clip and shifted copies of it."""

    def __init__(self, data, views=3):
        self.data, self.views = data, views

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        video, label, vid = self.data[i]
        return torch.stack([video.roll(v, dims=-1) for v in range(self.views)]), label, f"video{vid}"


def test_views_are_averaged_per_video():
    model = tiny_model().eval()
    data = MultiView(tiny_data(10))
    result = evaluate(model, data, EvalConfig(batch_size=3, **CPU))
    with torch.no_grad():
        probs = torch.stack([model(data[i][0]).softmax(-1).mean(0) for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    assert result.num_videos == 10 and result.num_views == 30
    assert result.top1 == pytest.approx((probs.argmax(-1) == labels).float().mean().item())
    confusion = torch.zeros(4, 4, dtype=torch.long)
    for y, p in zip(labels, probs.argmax(-1)):
        confusion[y, p] += 1
    assert result.confusion == confusion.tolist()
    assert result.top5 == 1.0  # 4 classes: the top 4 always hold the label


def test_scores_file_holds_each_videos_mean_probabilities(tmp_path):
    model = tiny_model().eval()
    data = MultiView(tiny_data(10))
    path = tmp_path / "out" / "scores.safetensors"
    result = evaluate(model, data, EvalConfig(batch_size=4, scores_path=str(path), **CPU))
    saved = read_video_scores(path)
    ids = sorted(f"video{i}" for i in range(10))
    assert saved.video_ids == ids and saved.paths == [None] * 10 and saved.classnames == list(CLASSES)
    with torch.no_grad():
        expected = torch.stack([model(data[int(i[5:])][0]).softmax(-1).mean(0) for i in ids])
    torch.testing.assert_close(saved.probs, expected)
    assert saved.labels.tolist() == [data[int(i[5:])][1] for i in ids] and saved.views.tolist() == [3] * 10
    assert (saved.probs.argmax(-1) == saved.labels).float().mean().item() == pytest.approx(result.top1)
    from safetensors.torch import save_file

    save_file({"probs": saved.probs}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a vitaclip scores file: it lacks"):
        read_video_scores(tmp_path / "other.safetensors")


class NotToBeRead:
    def __iter__(self):
        raise AssertionError("evaluated before its outputs were checked")


def test_outputs_that_cannot_be_written_are_refused_before_evaluating(tmp_path):
    (tmp_path / "a_file").write_text("")
    for output, problem in ((tmp_path, "is a folder: give a file name"),
                            (tmp_path / "a_file" / "out.json", "its folder cannot be made")):
        with pytest.raises(ValueError, match=problem):
            evaluate(tiny_model(), NotToBeRead(), EvalConfig(batch_size=4, scores_path=str(output), **CPU))
        with pytest.raises(ValueError, match=problem):
            zeroshot(tiny_model(), [Split("a", CLASSES, NotToBeRead())], ["a video of {}."],
                     EvalConfig(batch_size=4, json_path=str(output), **CPU))
    # one file for two outputs: the scores were written over the JSON, without a word
    with pytest.raises(ValueError, match="evaluation outputs must be different files"):
        evaluate(tiny_model(), NotToBeRead(), EvalConfig(batch_size=4, json_path=str(tmp_path / "out"),
                                                         scores_path=str(tmp_path / "." / "out"), **CPU))


def test_zeroshot_refuses_per_split_outputs_that_one_file_cannot_hold(tmp_path):
    splits = [Split("a", CLASSES, tiny_data(6)), Split("b", CLASSES, tiny_data(10))]
    for output in ("scores_path", "confusion_png"):
        with pytest.raises(ValueError, match="writes the aggregate as JSON only"):
            zeroshot(tiny_model(), splits, ["a video of {}."], EvalConfig(batch_size=4, **CPU),
                     **{output: str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()


def test_scores_on_known_probabilities():
    names = ["a", "b", "c"]
    p = torch.tensor
    sums = {"x": (p([0.6, 0.3, 0.1]) * 2, 2, 0),  # right
            "y": (p([0.2, 0.7, 0.1]), 1, 0),  # wrong, label second
            "z": (p([0.1, 0.2, 0.7]), 1, 2)}  # right
    r = scores(sums, names)
    assert r.top1 == pytest.approx(2 / 3) and r.num_videos == 3 and r.num_views == 4
    assert r.per_class == {"a": 0.5, "c": 1.0}
    assert r.mean_class_accuracy == pytest.approx(0.75)
    assert r.confusion == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert r.top5 == 1.0
    # two ranks' partial sums merge into the same result
    halves = [{"x": (p([0.6, 0.3, 0.1]), 1, 0)}, {"x": (p([0.6, 0.3, 0.1]), 1, 0), "y": sums["y"], "z": sums["z"]}]
    assert scores(merge(halves), names) == r


def test_top5_counts_a_label_ranked_fifth_and_not_sixth():
    probs = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1, 0.0])
    names = list("abcdef")
    assert scores({"x": (probs, 1, 4)}, names).top5 == 1.0
    assert scores({"x": (probs, 1, 5)}, names).top5 == 0.0


def test_views_with_different_labels_and_empty_data_are_errors():
    p = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="different labels"):
        merge([{"v": (p, 1, 0)}, {"v": (p, 1, 1)}])
    with pytest.raises(ValueError, match="empty"):
        scores({}, ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        scores({"v": (p, 1, 5)}, ["a", "b"])


def batches_of(data, size=4):
    """`data`'s items as a list of batches (video [B, 3, T, H, W], labels [B], ids)."""
    items = [data[i] for i in range(len(data))]
    return [(torch.stack([v for v, _, _ in chunk]), torch.tensor([y for _, y, _ in chunk]), [i for _, _, i in chunk])
            for chunk in (items[s:s + size] for s in range(0, len(items), size))]


@pytest.mark.parametrize("damage,problem", [(lambda v, y, i: (v, y[:2], i), "4 videos has 2 labels and 4 video ids"),
                                            (lambda v, y, i: (v, y, i[:2]), "4 videos has 4 labels and 2 video ids"),
                                            (lambda v, y, i: (v, y.float(), i), "1-D tensor of class indices")])
def test_a_batch_needs_a_label_and_an_id_per_video(damage, problem):
    """A batch with fewer labels or ids than videos was scored over the shorter (zip), its other
    videos left out without a word; float labels failed as torch's 'tensors used as indices'."""
    batches = batches_of(tiny_data(8))
    assert evaluate(tiny_model(), batches, EvalConfig(**CPU)).num_videos == 8
    batches[0] = damage(*batches[0])
    with pytest.raises(ValueError, match=problem):
        evaluate(tiny_model(), batches, EvalConfig(**CPU))


def test_data_labelled_for_other_classes_is_refused_before_evaluating():
    """Labels a dataset declares (a labels sequence) outside the classes were found after the whole
    pass, and in zeroshot() after the splits before it had been evaluated."""
    class Relabelled:
        def __init__(self, shift=0):
            self.data, self.shift, self.fetched = tiny_data(8), shift, 0
            self.labels = [y + shift for y in self.data.labels]

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            self.fetched += 1
            video, label, vid = self.data[i]
            return video, label + self.shift, vid

    data = Relabelled(shift=4)
    with pytest.raises(ValueError, match="evaluation data: 8 label.s. outside the 4 classes"):
        evaluate(tiny_model(), data, EvalConfig(**CPU))
    splits = [Split("one", CLASSES, Relabelled()), Split("two", CLASSES[:2], Relabelled())]
    with pytest.raises(ValueError, match="split 'two': .* label.s. outside the 2 classes"):
        zeroshot(tiny_model(), splits, config=EvalConfig(**CPU))
    assert data.fetched == 0 and splits[0].data.fetched == 0
    # a model without classes is told so, not that every label is outside its 0 classes
    with pytest.raises(ValueError, match="no classes set"):
        evaluate(VitaCLIP(demo_model_config(FRAMES, SIZE)), Relabelled(), EvalConfig(**CPU))


def test_json_and_confusion_image(tmp_path):
    from PIL import Image

    result = evaluate(tiny_model(), tiny_data(8), EvalConfig(batch_size=4, json_path=str(tmp_path / "r.json"),
                                                              confusion_png=str(tmp_path / "c.png"), **CPU))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["top1"] == result.top1 and saved["classnames"] == list(CLASSES)
    with Image.open(tmp_path / "c.png") as image:
        assert image.format == "PNG" and min(image.size) >= 4


def test_zeroshot_splits_mean_and_std():
    results = {n: EvalResult(t1, t5, t1, 1, 1, ["a"]) for n, t1, t5 in
               (("s1", 0.5, 0.9), ("s2", 0.7, 1.0), ("s3", 0.6, 0.8))}
    results["s2"].num_skipped = 4  # (on_error="skip")
    agg = aggregate(results, ["{}."])
    assert agg.top1_mean == pytest.approx(0.6) and agg.top1_std == pytest.approx(statistics.pstdev([0.5, 0.7, 0.6]))
    assert agg.top5_mean == pytest.approx(0.9) and agg.top5_std == pytest.approx(statistics.pstdev([0.9, 1.0, 0.8]))
    assert "mean: top-1 60.00 +- 8.16" in agg.summary()
    assert "s2: top-1 70.00  top-5 100.00  (1 videos, 1 classes, 4 videos skipped)" in agg.summary()
    assert "s1: top-1 50.00  top-5 90.00  (1 videos, 1 classes)" in agg.summary()


def test_zeroshot_scores_each_split_with_its_own_classes():
    model = tiny_model()
    data = tiny_data(12)
    # split 2 names the classes in another order: relabel its videos accordingly
    order = [2, 0, 3, 1]

    class Relabelled:
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            video, label, vid = data[i]
            return video, order.index(label), vid

    templates = ["a clip of {}.", "something {}."]
    splits = [Split("one", CLASSES, data), Split("two", [CLASSES[i] for i in order], Relabelled())]
    result = zeroshot(model, splits, templates, EvalConfig(batch_size=5, **CPU))
    assert list(result.splits) == ["one", "two"]
    # the same classes in another order: the same predictions, so the same accuracy
    assert result.splits["one"].top1 == pytest.approx(result.splits["two"].top1)
    reference = tiny_model()
    reference.set_classes(CLASSES, templates=templates)
    assert result.splits["one"].top1 == evaluate(reference, data, EvalConfig(batch_size=5, **CPU)).top1
    assert result.top1_std == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="unique"):
        zeroshot(model, [splits[0], splits[0]], templates, EvalConfig(**CPU))


@pytest.mark.parametrize("setting,problem", [(dict(batch_size=0), "batch_size must be >= 1"),
                                             (dict(batch_size=2.5), "batch_size must be an integer"),
                                             (dict(num_workers=-1), "num_workers must be >= 0"),
                                             (dict(precision="FP32"), "precision must be one of")])
def test_evaluation_settings_are_refused_by_name_before_any_work(setting, problem):
    """They failed in the data loader ('range() arg 3 must not be zero', 'float object cannot be
    interpreted as an integer', torch's num_workers message), or at the first batch, after zeroshot()
    had given the model its first split's classes."""
    model = tiny_model()
    with pytest.raises(ValueError, match=problem):
        evaluate(model, tiny_data(8), EvalConfig(**{**CPU, **setting}))
    with pytest.raises(ValueError, match=problem):
        zeroshot(model, [Split("one", CLASSES[::-1], tiny_data(8))], config=EvalConfig(**{**CPU, **setting}))
    assert model.classnames == list(CLASSES) and model.zero_shot_templates is None


@pytest.mark.parametrize("setting,problem", [(dict(top_k=2.5), "top_k must be an integer"),
                                             (dict(batch_size="4"), "batch_size must be an integer")])
def test_prediction_settings_are_refused_by_name(setting, problem):
    """They failed as torch's 'topk(): argument 'k' must be int, not float' and Python's '<' not
    supported between 'str' and 'int'."""
    with pytest.raises(ValueError, match=problem):
        predict(tiny_model(), [tiny_data(1)[0][0]], device="cpu", precision="fp32", **setting)


def test_prediction_refuses_an_unknown_precision_before_looking_at_the_videos(tmp_path):
    """It was refused at the first batch: after every video file had been read through (the
    list's frame counts), a missing one named instead."""
    with pytest.raises(ValueError, match="precision must be one of"):
        predict(tiny_model(), [str(tmp_path / "missing.mp4")], device="cpu", precision="FP32")


def test_predict_takes_one_video_tensor_as_one_video():
    """A [3, T, H, W] tensor alone was taken for a sequence of its rows, and refused as 'video 0 must be
    [3, T, H, W] or [V, 3, T, H, W], got (T, H, W)'; a path alone was already one video."""
    clip = tiny_data(1)[0][0]
    cpu = dict(device="cpu", precision="fp32")
    assert predict(tiny_model(), clip, **cpu) == predict(tiny_model(), [clip], **cpu)


def test_predict_output_format():
    model = tiny_model().train()
    clips = [tiny_data(3)[i][0] for i in range(3)]
    out = predict(model, clips, top_k=2, device="cpu", precision="fp32")
    assert model.training  # as it was: predicting mid-training leaves the model training
    model.eval()
    assert [o["video"] for o in out] == ["tensor 0", "tensor 1", "tensor 2"]
    for o in out:
        assert len(o["top"]) == 2 and {t["label"] for t in o["top"]} <= set(CLASSES)
        assert o["top"][0]["probability"] >= o["top"][1]["probability"]
    full = predict(model, clips[:1], top_k=10, device="cpu", precision="fp32")[0]["top"]
    assert len(full) == 4 and sum(t["probability"] for t in full) == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        expected = model(clips[0][None]).softmax(-1)[0].max().item()
    assert full[0]["probability"] == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="no videos"):
        predict(model, [])
    # a [V, 3, T, H, W] tensor is one video's views: each label with its view-averaged probability
    views = torch.stack([clips[0], clips[0].roll(3, dims=-1)])
    top = predict(model, [views], top_k=4, device="cpu", precision="fp32")[0]["top"]
    with torch.no_grad():
        mean_probs = model(views).softmax(-1).mean(0)
    for t in top:
        assert t["probability"] == pytest.approx(mean_probs[model.classnames.index(t["label"])].item(), abs=1e-5)
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)
    batch = torch.stack(clips)  # one [B, 3, T, H, W] tensor: B videos
    assert [o["top"] for o in predict(model, batch, top_k=2, device="cpu", precision="fp32")] == [o["top"] for o in out]
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        predict(model, clips, batch_size=0)
    with pytest.raises(FileNotFoundError, match="video.mp4"):  # one path, not its characters
        predict(model, "/nonexistent/video.mp4", device="cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        predict(model, ["/nonexistent/video.mp4"], device="cpu")


def test_ranks_exchange_the_per_video_sums_as_one_tensor(monkeypatch):
    """What evaluate() gathers from every rank holds one tensor, however many videos: a dict of a
    tensor per video pickles (and unpickles, on every rank) each on its own."""
    import vitaclip.engine.evaluate as evaluation

    gathered = []
    real = evaluation.all_gather_objects

    def spy(env, obj):
        gathered.append(obj)
        return real(env, obj)

    monkeypatch.setattr(evaluation, "all_gather_objects", spy)
    model = tiny_model().eval()
    data = MultiView(tiny_data(10))
    result = evaluate(model, data, EvalConfig(batch_size=3, **CPU))
    sent = [obj for obj in gathered if isinstance(obj, tuple)]
    assert len(sent) == 1
    ids, totals, counts, labels = sent[0]
    assert isinstance(totals, torch.Tensor) and totals.shape == (10, len(CLASSES))
    assert not any(isinstance(x, torch.Tensor) for x in (*ids, *counts, *labels))
    assert sorted(ids) == sorted(f"video{i}" for i in range(10)) and counts == [3] * 10
    assert result.num_videos == 10 and result.num_views == 30


def test_pack_and_unpack_keep_the_sums():
    from vitaclip.engine.evaluate import pack, unpack

    sums = {"a": (torch.tensor([0.5, 1.5]), 2, 1), 7: (torch.tensor([0.2, 0.8]), 1, 0)}
    back = unpack(pack(sums))
    assert list(back) == ["a", 7]
    for key, (total, count, label) in sums.items():
        torch.testing.assert_close(back[key][0], total)
        assert back[key][1:] == (count, label)
    assert unpack(pack({})) == {}
    assert merge([unpack(pack(sums)), unpack(pack({"a": (torch.tensor([1.0, 1.0]), 1, 1)}))])["a"][1] == 3


def test_predict_hands_out_each_video_as_soon_as_its_views_are_scored(monkeypatch):
    """predictions() yields a video's result, in the order given, once the batch holding its views is
    scored, and keeps no video's probabilities after: over a long list, results can be written as
    they come and memory holds the batch in flight only. predict() is its list."""
    import vitaclip.engine.predict as predict_module

    model = tiny_model().eval()
    clips = [tiny_data(5)[i][0] for i in range(5)]
    videos = [clips[0], torch.stack([clips[1], clips[1].roll(2, dims=-1)]), *clips[2:]]  # video 1: 2 views
    forwards, held = [], []
    model.register_forward_hook(lambda *_: forwards.append(1))
    real_accumulate = predict_module.accumulate
    monkeypatch.setattr(predict_module, "accumulate",
                        lambda sums, *a: held.append(len(sums)) or real_accumulate(sums, *a))
    kw = dict(batch_size=2, top_k=2, device="cpu", precision="fp32")
    listed = predict(model, videos, **kw)
    assert held == [0, 0, 0]  # each batch's videos handed out (and their sums let go) before the next
    forwards.clear()
    streamed, forwards_at = [], []
    for result in predict_module.predictions(model, videos, **kw):
        streamed.append(result)
        forwards_at.append(len(forwards))
    assert forwards_at == [1, 1, 2, 2, 3]
    assert streamed == listed and [r["video"] for r in streamed] == [f"tensor {i}" for i in range(5)]
