"""Loading the authors' checkpoints: what a second review of weight loading found."""
import pytest
import torch

from conftest import CLASSES, random_video, randomize_, tiny_config
from test_weights import official_checkpoint
from vitaclip import VitaCLIP
from vitaclip.engine.checkpoint import load_model

REORDERED = [CLASSES[1], CLASSES[0], *CLASSES[2:]]


@pytest.fixture
def csc_checkpoint(tmp_path):
    """A trained checkpoint in the authors' layout with a class-specific context for CLASSES."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES)).eval()
    torch.save(official_checkpoint(model), tmp_path / "ckpt.pth")
    return model, tmp_path / "ckpt.pth"


def test_the_authors_class_specific_context_is_refused_for_classes_in_another_order(csc_checkpoint):
    """Their file keeps each class's prompt tokens (token_suffix): the same number of class names in
    another order scored every class with another class's learned context, silently."""
    _, path = csc_checkpoint
    with pytest.raises(ValueError, match=r"class 0 is 'ride bike' here and 'jumping jacks' there \(as CLIP's "
                                         r"tokenizer reads it back; 2 of 4 differ\)"):
        VitaCLIP.from_official_checkpoint(path, REORDERED, heads=2, text_heads=2)
    with pytest.raises(ValueError, match=r"class 0 is 'ride bike' here"):
        load_model(path, REORDERED, heads=2, text_heads=2)


def test_init_from_the_authors_context_for_other_classes_of_the_same_number_starts_it_afresh(csc_checkpoint):
    """README: --init from a model whose class-specific context was learned for other classes (another
    data set, or its classes in another order) starts that context afresh; for the authors' file it was
    kept whenever the number of classes agreed."""
    model, path = csc_checkpoint
    with pytest.warns(UserWarning, match="learned for other classes.*starts afresh"):
        other = load_model(path, REORDERED, for_training=True, heads=2, text_heads=2)
    assert other.classnames == [name.replace("_", " ") for name in REORDERED]
    assert not torch.equal(other.prompt_learner.ctx, model.prompt_learner.ctx)
    assert torch.equal(other.visual.global_prompts, model.visual.global_prompts)  # the rest is kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_the_authors_checkpoint_loads_for_its_own_classes_however_spelt(tmp_path, dtype):
    """Underscores or capitals (CLIP's tokenizer lowercases) name the same classes; a checkpoint cast
    to fp16 or bf16 is still told its own; a shared context takes any classes."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES)).eval()
    ckpt = official_checkpoint(model)
    # cast in part (the prompt buffers kept in float32): the tokens' rounding does not tell other classes
    ckpt["model"] = {k: v if "token_suffix" in k else v.to(dtype) for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "ckpt.pth")
    spelt = ["Jumping_Jacks", "ride bike", "situps", "swim"]
    loaded = VitaCLIP.from_official_checkpoint(tmp_path / "ckpt.pth", spelt, heads=2, text_heads=2).eval()
    assert torch.equal(loaded.prompt_learner.ctx, model.prompt_learner.ctx.to(dtype).float())
    shared = randomize_(VitaCLIP(tiny_config(csc=False), CLASSES)).eval()
    torch.save(official_checkpoint(shared), tmp_path / "shared.pth")
    loaded = VitaCLIP.from_official_checkpoint(tmp_path / "shared.pth", REORDERED, heads=2, text_heads=2).eval()
    shared.set_classes(REORDERED)
    video = random_video(shared.config)
    assert torch.equal(loaded(video), shared(video))
