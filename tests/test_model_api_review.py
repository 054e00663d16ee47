"""Review of VitaCLIP used as a plain nn.Module in a researcher's own code: gradients, caches,
casts and copies."""
import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, random_video, randomize_, tiny_config
from vitaclip import VitaCLIP


def test_a_text_tower_unfrozen_by_its_user_gets_gradients_with_zero_shot_classes():
    """Fine-tuning CLIP's text tower against hand-written prompts (model.requires_grad_(True), zero-shot
    classes): the class features came from the no-gradient cache, so the loss reached no text weight and
    the tower silently never trained. Its gradients are now those of the features computed with them."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES))
    names, templates = ["run", "jump", "swim"], ["a video of {}.", "a clip of {}."]
    model.set_classes(names, templates=templates)
    model.requires_grad_(True)
    video, labels = random_video(model.config), torch.tensor([0, 2])
    F.cross_entropy(model(video), labels).backward()
    projection = model.textual.text_projection
    assert projection.grad is not None and projection.grad.abs().sum() > 0

    # the gradient is that of the scaled cosines with the averaged template features
    with torch.no_grad():
        video_features = F.normalize(model.encode_video(video), dim=-1)
    per_template = [F.normalize(model.encode_text([t.format(n) for t in templates]), dim=-1) for n in names]
    text = F.normalize(torch.stack([feats.mean(0) for feats in per_template]), dim=-1)
    want, = torch.autograd.grad(F.cross_entropy(model.logit_scale.exp() * video_features @ text.t(), labels),
                                projection)
    torch.testing.assert_close(projection.grad, want)
    # evaluated without gradients, the same features as with
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(), text.detach())


def test_cached_class_features_follow_the_prompt_learners_own_class_switches():
    """model.prompt_learner.set_classes twice between evaluations: the cache knew the class tokens by
    id(), which the second switch's new tokens could take over from the first's freed ones, and the
    first classes' features scored the last ones, silently."""
    model = randomize_(VitaCLIP(tiny_config(csc=False), CLASSES)).eval()
    with torch.no_grad():
        for _ in range(5):
            model.text_features()
            model.prompt_learner.set_classes(["a", "b", "c"])
            model.prompt_learner.set_classes(["run", "jump", "swim", "walk"])
            torch.testing.assert_close(model.text_features(), F.normalize(model.encode_text(), dim=-1))
            model.prompt_learner.set_classes(CLASSES)


def test_encode_text_without_texts_refuses_classes_scored_zero_shot():
    """It gave the learned prompts' features of the classes learned before (other names, another count) while
    model.classnames and the logits were the zero-shot classes'."""
    model = randomize_(VitaCLIP(tiny_config(csc=False), CLASSES)).eval()
    model.set_classes(["run", "jump"], templates=["a video of {}."])
    with pytest.raises(ValueError, match="zero-shot with templates.*text_features\\(\\) gives their features"):
        model.encode_text()
    assert model.encode_text(["a video of run."]).shape[0] == 1  # hand-written texts are still encoded
    model.set_classes(CLASSES)
    assert model.encode_text().shape[0] == len(CLASSES)
