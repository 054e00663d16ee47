"""Behaviour of the training and evaluation engine that mutation testing found unpinned: each test
checks it against a small computation of its own."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F

from engine_helpers import one_thread, tiny_data, tiny_model, tiny_train_config, trainable
from vitaclip.engine import train as train_module
from vitaclip.engine.train import make_optimizer, train

assert one_thread  # engine_helpers' autouse fixture: one torch thread per test


def logged_lrs(folder) -> dict:
    with open(folder / "train_log.csv") as f:
        return {int(row["step"]): (float(row["lr"]), row["skipped"]) for row in csv.DictReader(f)}


def test_the_adam_betas_asked_for_reach_the_optimizer(tmp_path):
    """Left out, AdamW's defaults (0.9, 0.999) replaced them: the paper's defaults, so only other
    betas would show."""
    optimizer = make_optimizer(tiny_model(), tiny_train_config(tmp_path, betas=(0.5, 0.75)))
    assert [tuple(g["betas"]) for g in optimizer.param_groups] == [(0.5, 0.75)] * len(optimizer.param_groups)


def test_a_run_with_other_betas_takes_the_steps_of_plain_adamw_with_them(tmp_path):
    betas, lr, eps = (0.3, 0.6), 1e-2, 1.0
    model = tiny_model()
    train(model, tiny_data(), tiny_train_config(tmp_path, steps=3, warmup_steps=0, lr=lr, betas=betas, adam_eps=eps,
                                                weight_decay=0.0))
    reference = tiny_model().train()
    optimizer = torch.optim.AdamW(reference.trainable_parameters(), lr=lr, betas=betas, eps=eps, weight_decay=0.0)
    from vitaclip.engine.loader import ShardedTrainLoader

    batches = iter(ShardedTrainLoader(tiny_data(), 4, 4))
    for step in range(1, 4):
        video, labels, _ = next(batches)
        F.cross_entropy(reference(video), labels).backward()
        for group in optimizer.param_groups:  # cosine from lr to 0 over 3 steps, from the first
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / 3))
        optimizer.step()
        optimizer.zero_grad()
    start = trainable(tiny_model())
    for name, value in trainable(reference).items():
        torch.testing.assert_close(trainable(model)[name] - start[name], value - start[name], rtol=1e-3, atol=1e-7,
                                   msg=name)


def test_a_skipped_step_is_a_step_of_the_schedule_all_the_same(tmp_path):
    """A step dropped for a NaN gradient (on_nonfinite="skip") moves the schedule on: every logged
    step has the rate of its own place in warmup + cosine, not the one of the step before."""
    bad_step, steps, warmup, lr = 3, 6, 2, 1e-2
    model = tiny_model()
    backwards = iter(range(1, 100))  # one backward per step (no accumulation)
    model.prompt_learner.ctx.register_hook(lambda g: g * float("nan") if next(backwards) == bad_step else g)
    train(model, tiny_data(), tiny_train_config(tmp_path, steps=steps, warmup_steps=warmup, lr=lr,
                                                on_nonfinite="skip"))
    logged = logged_lrs(tmp_path)
    assert [s for s, (_, skipped) in logged.items() if skipped == "1"] == [bad_step]
    for step in range(1, steps + 1):
        want = lr * step / warmup if step <= warmup else \
            lr * 0.5 * (1 + math.cos(math.pi * (step - 1 - warmup) / (steps - warmup)))
        assert logged[step][0] == pytest.approx(want, rel=1e-9), step


def test_fp16_clips_the_unscaled_gradients(tmp_path, monkeypatch):
    """The norm that clipping sees (and clips to grad_clip) is the true gradient's, not the fp16 loss
    scaler's multiple of it: the same first step in fp32 and fp16 sees about the same norm."""
    seen = {}
    clip = train_module.clip_gradients

    def recording(precision):
        def clip_gradients(model, max_norm):
            norm = clip(model, max_norm)
            seen.setdefault(precision, norm)
            return norm
        return clip_gradients

    for precision in ("fp32", "fp16"):
        monkeypatch.setattr(train_module, "clip_gradients", recording(precision))
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path / precision, steps=1, warmup_steps=0,
                                                           precision=precision, grad_clip=1e-3))
    assert seen["fp32"] > 1e-3  # clipped at all
    assert seen["fp16"] == pytest.approx(seen["fp32"], rel=0.05)


CPU = dict(device="cpu", num_workers=0, progress=False, precision="fp32")


def test_evaluation_runs_the_model_in_eval_mode_and_leaves_it_as_it_found_it():
    from vitaclip.engine.evaluate import EvalConfig, evaluate

    for training in (False, True):
        model = tiny_model().train(training)
        modes = []
        model.register_forward_hook(lambda module, args, output: modes.append(module.training))
        evaluate(model, tiny_data(6), EvalConfig(batch_size=4, **CPU))
        assert modes and not any(modes)
        assert model.training is training


def test_the_scores_file_rows_are_in_video_id_order_whatever_order_the_videos_came_in(tmp_path):
    from vitaclip.engine.evaluate import EvalConfig, evaluate, read_video_scores

    data = tiny_data(4)
    items = [data[i] for i in range(4)]
    ids = [9, 2, 5, 0]  # as the batches give them
    batches = [(torch.stack([items[0][0], items[1][0]]), torch.tensor([items[0][1], items[1][1]]), ids[:2]),
               (torch.stack([items[2][0], items[3][0]]), torch.tensor([items[2][1], items[3][1]]), ids[2:])]
    model = tiny_model().eval()
    path = tmp_path / "scores.safetensors"
    evaluate(model, batches, EvalConfig(scores_path=str(path), **CPU))
    saved = read_video_scores(path)
    order = sorted(range(4), key=lambda i: ids[i])  # [3, 1, 2, 0]
    assert saved.video_ids == [0, 2, 5, 9]
    assert saved.labels.tolist() == [items[i][1] for i in order]
    with torch.no_grad():
        expected = model(torch.stack([items[i][0] for i in order])).softmax(-1)
    torch.testing.assert_close(saved.probs, expected)


def test_a_run_resumed_with_another_lr_follows_the_new_schedule_to_its_end(tmp_path):
    """After a resume with a changed lr, every later step (and a further resume of it) is on the new
    schedule, not only the first one after the change."""
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=6, stop_after=3))
    with pytest.warns(UserWarning, match="lr: 0.01 -> 0.001"):
        train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=6, lr=1e-3, resume="auto",
                                                           resume_with_changes=True, stop_after=4))
    train(tiny_model(), tiny_data(), tiny_train_config(tmp_path, steps=6, lr=1e-3, resume="auto"))
    logged = logged_lrs(tmp_path)
    warmup, steps = 2, 6
    for step in range(1, steps + 1):
        lr = 1e-2 if step <= 3 else 1e-3
        want = lr * step / warmup if step <= warmup else \
            lr * 0.5 * (1 + math.cos(math.pi * (step - 1 - warmup) / (steps - warmup)))
        assert logged[step][0] == pytest.approx(want, rel=1e-9), step


def test_frozen_weights_a_little_off_are_other_weights():
    """The backbone fingerprint tells weights apart to about a millionth of a statistic, not a percent."""
    from vitaclip.engine import checkpoint as ckpt

    model = tiny_model()
    payload = ckpt.model_payload(model, {"kind": "pretrained", "path": "unused"})
    ckpt.check_backbone_fingerprint(ckpt.backbone_fingerprint(model), payload, "same")  # the same weights pass
    name, stats = next(iter(payload["backbone_fingerprint"].items()))
    frozen = model.state_dict()[name]  # (sharing the model's storage)
    with torch.no_grad():
        frozen.view(-1)[0] += 1e-4 * max(1.0, abs(stats[0]))  # the sum off by a ten-thousandth
    with pytest.raises(ValueError, match="other frozen weights"):
        ckpt.check_backbone_fingerprint(ckpt.backbone_fingerprint(model), payload, "off")


def test_own_state_refuses_a_frozen_tensor_it_should_not_hold():
    """A checkpoint's own state holding a backbone tensor would overwrite the rebuilt backbone's."""
    from vitaclip.engine import checkpoint as ckpt

    model = tiny_model()
    state = ckpt.own_state(model)
    frozen = next(k for k, v in model.state_dict().items() if k not in state and v.is_floating_point())
    before = model.state_dict()[frozen].clone()
    with pytest.raises(ValueError, match=f"unexpected {frozen}"):
        ckpt.load_own_state(model, {**state, frozen: before + 1}, "ckpt")
    torch.testing.assert_close(model.state_dict()[frozen], before, rtol=0, atol=0)
