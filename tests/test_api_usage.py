"""The model used from Python as a researcher uses any torch model: modes, devices, copies."""
import pytest
import torch

from conftest import CLASSES, random_video, randomize_, tiny_config
from vitaclip import VitaCLIP


@pytest.mark.parametrize("templates", [None, ["a video of {}."]])
def test_text_features_cached_under_inference_mode_serve_autograd(templates):
    """Class features cached in an inference_mode evaluation are normal tensors: a training forward
    after it (zero-shot classes) and the features used in a graph of the user's own work."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES))
    video = random_video(model.config)
    with torch.inference_mode():
        if templates is not None:
            model.set_classes(["run", "walk", "swim"], templates=templates)
        expected = model(video)
        features = model.text_features()
    assert not features.is_inference()
    model(video).sum().backward()  # saves the class features for the video features' gradient
    assert all(p.grad is not None for p in model.visual.parameters() if p.requires_grad)
    weights = torch.ones(features.shape[1], requires_grad=True)
    (features @ weights).sum().backward()
    with torch.no_grad():
        assert torch.equal(model(video), expected)


@pytest.mark.parametrize("templates", [None, ["a video of {}."]])
def test_forward_on_the_meta_device_gives_shapes(templates):
    """A model moved to the meta device (shape and FLOP counts without memory) runs: the
    autocast switches it uses exist on no meta device."""
    model = VitaCLIP(tiny_config(), CLASSES)
    if templates is not None:
        model.set_classes(["run", "walk"], templates=templates)
    model.to("meta")
    video = random_video(model.config).to("meta")
    logits = model(video)
    assert logits.is_meta and logits.shape == (2, len(model.classnames))
    with torch.no_grad():
        assert model(video).shape == logits.shape
    logits.sum().backward()
    assert model.logit_scale.grad.is_meta
