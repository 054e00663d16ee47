"""Checks of the reference model against SPEC that mutation testing found missing: each fails on
a plausible reimplementation bug that the rest of the suite let through.

- logits = exp(logit_scale) * cos(video, text) for any logit_scale, not only its initial value
  (CLIP's training code clamps the scale at 100; SPEC and the authors' code do not);
- the time embedding of fewer frames than T0 (global prompts alone) is resized by nearest
  neighbour, not cut to its first rows, and the whole model agrees with SPEC at such counts;
- the logits of a float64 model equal SPEC's computation end to end: the literal per-frame
  reading (tests/spec_oracle.py), mean over T, cosine with the text features, exp(logit_scale).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, random_video, randomize_, tiny_config
from spec_oracle import frame_features
from vitaclip import VitaCLIP
from vitaclip.backends import resolve_backend


def reference_frames(model, video):
    return model.visual(video, resolve_backend("reference", video.device).block_forward)


@pytest.mark.parametrize("scale", [math.log(500.0), math.log(100.0) + 0.5, -1.0])
def test_logits_use_exp_of_any_logit_scale_unclamped(scale):
    """SPEC: logits = exp(logit_scale) * cos. Past ln(100) (where CLIP's training clamps it) and
    below 0 alike; the scale's gradient is then the weighted logit sum itself."""
    config = tiny_config(layers=1, text_layers=1)
    model = randomize_(VitaCLIP(config, CLASSES, backend="reference")).double()
    video = random_video(config, dtype=torch.float64)
    with torch.no_grad():
        model.logit_scale.fill_(scale)
        cos = F.normalize(model.encode_video(video), dim=-1) @ F.normalize(model.encode_text(), dim=-1).t()
    logits = model(video)
    torch.testing.assert_close(logits, math.exp(scale) * cos, rtol=1e-10, atol=1e-10)
    weights = torch.linspace(-1, 1, logits.numel(), dtype=torch.float64).view_as(logits)
    grad, = torch.autograd.grad((logits * weights).sum(), [model.logit_scale])
    torch.testing.assert_close(grad, (logits * weights).sum().detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t0, t, rows", [(8, 4, [0, 2, 4, 6]), (8, 3, [0, 2, 5]), (5, 2, [0, 2]),
                                         (4, 6, [0, 0, 1, 2, 2, 3])])
def test_time_embedding_of_fewer_frames_is_nearest_neighbour_not_a_prefix(t0, t, rows):
    """SPEC step 2: F.interpolate(..., mode="nearest") to T, which picks rows floor(i * T0 / T),
    for fewer frames than T0 as for more."""
    model = VitaCLIP(tiny_config(use_summary=False, use_local=False, num_frames=t0), CLASSES)
    te = model.visual.time_embed
    assert rows == [math.floor(i * t0 / t) for i in range(t)]
    assert torch.equal(model.visual.time_embedding(t), te[rows])


@pytest.mark.parametrize("t0, t", [(8, 4), (3, 5), (3, 1)])
def test_global_prompts_alone_match_spec_at_any_frame_count(t0, t):
    """Without summary and local prompts any T is taken (SPEC): the reference still computes SPEC's
    features, time embedding resized, at frame counts that are no multiple of T0."""
    model = randomize_(VitaCLIP(tiny_config(use_summary=False, use_local=False, num_frames=t0, layers=1),
                                CLASSES, backend="reference")).double()
    video = random_video(model.config, frames=t).double()
    with torch.no_grad():
        torch.testing.assert_close(reference_frames(model, video), frame_features(model.visual, video),
                                   rtol=1e-9, atol=1e-9)


def test_logits_are_spec_end_to_end_in_float64():
    """Video feature = mean over T of SPEC's frame features; logits = exp(logit_scale) * cosine with
    the learned prompts' text features, read from the float64 oracle rather than the model."""
    config = tiny_config(layers=1, text_layers=1)
    model = randomize_(VitaCLIP(config, CLASSES, backend="reference")).double()
    video = random_video(config, frames=2 * config.num_frames, dtype=torch.float64)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(250.0))
        video_features = F.normalize(frame_features(model.visual, video).mean(dim=1), dim=-1)
        text = F.normalize(model.encode_text(), dim=-1)
        torch.testing.assert_close(model(video), 250.0 * video_features @ text.t(), rtol=1e-9, atol=1e-9)
