"""Scoring checked against hand computations: views averaged per video across batches, metrics,
the scores file's rows, zero-shot class features, prediction order and top-k."""
import pytest
import torch
import torch.nn.functional as F

from engine_helpers import CLASSES, one_thread, tiny_data, tiny_model  # noqa: F401
from vitaclip.engine.evaluate import EvalConfig, evaluate, read_video_scores, scores
from vitaclip.engine.predict import predict

CPU = dict(device="cpu", num_workers=0, progress=False, precision="fp32")


def test_zero_shot_class_features_average_each_templates_normalised_feature():
    model = tiny_model().eval()
    names, templates = ["brush_hair", "cartwheel"], ["a video of a person {}.", "a photo of {}."]
    model.set_classes(names, templates=templates)
    with torch.no_grad():
        feats = []
        for name in ("brush hair", "cartwheel"):  # underscores read as spaces
            per_template = F.normalize(model.encode_text([t.format(name) for t in templates]).float(), dim=-1)
            feats.append(F.normalize(per_template.mean(0), dim=-1))
        expected = torch.stack(feats)
        torch.testing.assert_close(model.text_features(), expected)
        video = tiny_data(3)[0][0][None]
        v = F.normalize(model.encode_video(video).float(), dim=-1)
        torch.testing.assert_close(model(video), model.logit_scale.exp() * v @ expected.t())


class Batches:
    """Iterable batches that cut a video's views apart: video 7's three views come in two batches."""

    def __init__(self):
        data = tiny_data(4)
        self.videos = [data[i][0] for i in range(4)]
        self.labels = [data[i][1] for i in range(4)]
        # (item, roll) per view: item 0 has 3 views, 1 one, 2 two
        self.layout = [[(0, 0), (0, 1)], [(0, 2), (1, 0), (2, 0)], [(2, 3)]]

    def view(self, item, roll):
        return self.videos[item].roll(roll, dims=-1)

    def __iter__(self):
        for batch in self.layout:
            yield (torch.stack([self.view(i, r) for i, r in batch]),
                   torch.tensor([self.labels[i] for i, _ in batch]), [i + 7 for i, _ in batch])


def test_a_videos_views_cut_across_batches_average_to_the_mean_of_its_views(tmp_path):
    model = tiny_model().eval()
    data = Batches()
    path = tmp_path / "scores.safetensors"
    result = evaluate(model, data, EvalConfig(scores_path=str(path), **CPU))
    with torch.no_grad():
        views = {}
        for batch in data.layout:
            for i, r in batch:
                views.setdefault(i, []).append(model(data.view(i, r)[None]).softmax(-1)[0])
    expected = torch.stack([torch.stack(views[i]).mean(0) for i in (0, 1, 2)])
    saved = read_video_scores(path)
    assert saved.video_ids == [7, 8, 9] and saved.views.tolist() == [3, 1, 2]
    torch.testing.assert_close(saved.probs, expected)
    labels = torch.tensor([data.labels[i] for i in (0, 1, 2)])
    assert result.top1 == pytest.approx((expected.argmax(-1) == labels).float().mean().item())
    assert result.num_videos == 3 and result.num_views == 6


def test_metrics_by_hand_with_fewer_than_five_classes():
    p = torch.tensor
    sums = {0: (p([0.1, 0.6, 0.3]), 1, 1),  # right
            1: (p([0.5, 0.2, 0.3]), 1, 1),  # wrong: predicted 0
            2: (p([0.2, 0.3, 0.5]), 1, 1),  # wrong: predicted 2
            3: (p([0.7, 0.2, 0.1]), 1, 0)}  # right
    r = scores(sums, ["a", "b", "c"])
    assert r.top1 == pytest.approx(0.5) and r.top5 == 1.0  # three classes: the label is always in the top 3
    assert r.per_class == {"a": 1.0, "b": pytest.approx(1 / 3)}  # "c" has no video
    assert r.mean_class_accuracy == pytest.approx((1 + 1 / 3) / 2)
    assert r.confusion == [[1, 0, 0], [1, 1, 1], [0, 0, 0]]  # [true][predicted]


def test_predict_orders_results_as_given_and_caps_top_k_at_the_class_count():
    model = tiny_model().eval()
    data = tiny_data(5)
    videos = [data[i][0] for i in range(5)]
    videos[2] = torch.stack([videos[2], videos[2].flip(-1)])  # two views
    results = predict(model, videos, top_k=10, batch_size=2, device="cpu", precision="fp32")
    assert [r["video"] for r in results] == [f"tensor {i}" for i in range(5)]
    with torch.no_grad():
        for video, r in zip(videos, results):
            probs = model(video if video.dim() == 5 else video[None]).softmax(-1).mean(0)
            assert [t["label"] for t in r["top"]] == [CLASSES[j] for j in probs.argsort(descending=True)]
            assert [t["probability"] for t in r["top"]] == pytest.approx(probs.sort(descending=True).values.tolist())


def test_videos_with_non_finite_probabilities_are_refused_not_counted():
    """topk ranks NaN first: a NaN row predicted class 0, right for a video of class 0 (top-1 was 0.5 here)."""
    nan = float("nan")
    sums = {"x": (torch.tensor([nan, nan, nan]), 1, 0), "y": (torch.tensor([0.1, 0.2, 0.7]), 1, 0)}
    with pytest.raises(ValueError, match="1 of 2 videos have non-finite class probabilities \\(e.g. video 'x'\\)"):
        scores(sums, ["a", "b", "c"])


class ViewItems:
    """One view per item; video v's views are items v, v + 3, v + 6, v + 9: items alternate between two
    ranks (i % 2), so every video has views on both."""

    def __init__(self):
        data = tiny_data(3)
        self.items = [(data[i % 3][0].roll(i // 3, dims=-1), data[i % 3][1], f"v{i % 3}") for i in range(12)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def views_on_two_ranks_worker(rank: int, world_size: int, port: int, out: str) -> None:
    import os

    from ranks import rank_of_two

    with rank_of_two(rank, world_size, port):
        result = evaluate(tiny_model().eval(), ViewItems(), EvalConfig(batch_size=2, **CPU),
                          scores_path=os.path.join(out, "scores.safetensors"))
        torch.save(result.to_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_a_videos_views_on_two_ranks_are_averaged_as_one_process_does(tmp_path):
    from ranks import run_ranks

    run_ranks(views_on_two_ranks_worker, str(tmp_path))
    data, model = ViewItems(), tiny_model().eval()
    with torch.no_grad():
        expected = torch.stack([torch.stack([model(data[i][0][None]).softmax(-1)[0] for i in range(v, 12, 3)]).mean(0)
                                for v in range(3)])
    saved = read_video_scores(tmp_path / "scores.safetensors")
    assert saved.video_ids == ["v0", "v1", "v2"] and saved.views.tolist() == [4, 4, 4]
    torch.testing.assert_close(saved.probs, expected)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    labels = torch.tensor([data[v][1] for v in range(3)])
    assert r0 == r1 and r0["num_videos"] == 3 and r0["num_views"] == 12
    assert r0["top1"] == pytest.approx((expected.argmax(-1) == labels).float().mean().item())


def test_zero_shot_classes_that_clips_tokenizer_cannot_tell_apart_are_refused():
    """CLIP's tokenizer lowercases and collapses white space: 'Archery' and 'archery' got the same text
    feature, so their scores tied on every video and one of the two classes was never predicted."""
    model = tiny_model()
    with pytest.raises(ValueError, match="'archery' and 'Archery' .* same tokens"):
        model.set_classes(["archery", "bowling", "Archery"], templates=["a video of {}."])
    with pytest.raises(ValueError, match="'tai chi' and 'tai  chi' .* same tokens"):
        model.zero_shot_text_features(["tai chi", "tai  chi"], ["{}", "a video of {}."])
    model.set_classes(["archery", "bowling"], templates=["a video of {}."])  # (kept as they were)
    assert model.classnames == ["archery", "bowling"]


def test_learned_classes_that_only_a_class_specific_context_tells_apart_are_refused_with_a_shared_one():
    """With one context for all classes, 'Archery' and 'archery' had the same prompt, and tied on every video."""
    import dataclasses

    from vitaclip import VitaCLIP

    shared = dataclasses.replace(tiny_model().config, csc=False)
    with pytest.raises(ValueError, match="'archery' and 'Archery' .* same tokens"):
        VitaCLIP(shared, ["archery", "bowling", "Archery"])
    with pytest.raises(ValueError, match="same tokens"):
        VitaCLIP(dataclasses.replace(tiny_model().config, n_ctx=0), ["tai chi", "tai  chi"])
    assert VitaCLIP(tiny_model().config, ["archery", "Archery"]).classnames == ["archery", "Archery"]  # its own


def test_predict_refuses_non_finite_probabilities_rather_than_rank_them():
    """A NaN row's top labels were the first classes, each with probability NaN (and the JSON output had
    NaN in it, which strict parsers refuse)."""
    model = tiny_model().eval()
    with torch.no_grad():
        model.logit_scale.fill_(float("inf"))
    with pytest.raises(ValueError, match="1 of 1 videos have non-finite class probabilities \\(e.g. video 'tensor 0'\\)"):
        predict(model, tiny_data(2)[0][0], device="cpu", precision="fp32")
