"""Weight loading: what mutation testing of vitaclip/weights.py found the other tests let through."""
import math

import pytest
import torch

from conftest import CLASSES, random_video, randomize_, tiny_config
from test_weights import clip_tokenize, official_checkpoint, register_tiny_clip
from vitaclip import VitaCLIP
from vitaclip.weights import load_state_exactly


def tiny_clip_file(folder, name, changes=None, logit_scale=None):
    """A tiny open_clip CLIP registered as `name`, its perturbed weights saved to a file."""
    import open_clip

    register_tiny_clip(folder, name, changes)
    torch.manual_seed(3)
    clip = open_clip.create_model(name)
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        if logit_scale is not None:
            clip.logit_scale.fill_(logit_scale)
    path = folder / "weights.pt"
    torch.save(clip.state_dict(), path)
    return clip.eval(), path


def test_from_clip_starts_its_own_logit_scale_and_plain_clip_keeps_clips(tmp_path):
    """SPEC: logit_scale starts at ln(1/0.07) (CLIP's trained scale, ln(100) for OpenAI's, is not taken
    over by a Vita-CLIP to train); only plain_clip, CLIP itself, scores with CLIP's own."""
    name = f"vitaclip-mutw-{tmp_path.name}"
    _, path = tiny_clip_file(tmp_path, name, logit_scale=math.log(100))
    model = VitaCLIP.from_clip(name, str(path), CLASSES)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    plain = VitaCLIP.plain_clip(name, str(path))
    assert plain.logit_scale.item() == pytest.approx(math.log(100))


def test_from_clip_reads_the_text_towers_heads_apart_from_the_vision_towers(tmp_path):
    """ViT-B/16 has 12 vision heads and 8 text heads: the text tower's count must come from the text
    tower (the tiny CLIP here: 2 vision heads of 64, 4 text heads of 32)."""
    name = f"vitaclip-mutw-{tmp_path.name}"
    clip, path = tiny_clip_file(tmp_path, name, {"text_cfg": {"heads": 4}})
    assert clip.transformer.resblocks[0].attn.num_heads == 4
    model = VitaCLIP.from_clip(name, str(path), None, use_summary=False, use_local=False, use_global=False).eval()
    assert (model.config.heads, model.config.text_heads) == (2, 4)
    texts = ["a video of a person swimming.", "dog"]
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(texts), clip.encode_text(clip_tokenize(texts)),
                                   rtol=1e-4, atol=1e-5)


def test_a_half_precision_authors_checkpoint_loads_into_a_float32_model(tmp_path):
    """A checkpoint saved in float16 (mixed-precision training, a file cast to save space) loads into
    the model's own float32 parameters: the logits are those of the float16-rounded weights in float32."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES)).eval()
    ckpt = official_checkpoint(model)
    ckpt["model"] = {k: v.half() for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "half.pth")
    loaded = VitaCLIP.from_official_checkpoint(tmp_path / "half.pth", CLASSES, heads=2, text_heads=2).eval()
    wrong = {k: v.dtype for k, v in loaded.state_dict().items() if v.is_floating_point() and v.dtype != torch.float32}
    assert not wrong
    reference = VitaCLIP(tiny_config(), CLASSES).eval()
    with torch.no_grad():
        for p, q in zip(model.state_dict().values(), reference.state_dict().values()):
            q.copy_(p.half().float())
    video = random_video(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(video), reference(video), rtol=1e-5, atol=1e-5)
    assert {k for k, p in loaded.named_parameters() if p.requires_grad} == \
        {k for k, p in reference.named_parameters() if p.requires_grad}


def test_loading_a_state_copies_it_into_the_models_own_tensors():
    """load_state_exactly copies as load_state_dict does: the model neither takes the state's dtype
    nor shares its memory (training the model must not change the caller's state dict)."""
    source = randomize_(VitaCLIP(tiny_config(), CLASSES))
    state = {k: v.clone().double() if k == "logit_scale" else v.clone() for k, v in source.state_dict().items()}
    model = VitaCLIP(tiny_config(), CLASSES)
    load_state_exactly(model, state)
    assert model.logit_scale.dtype == torch.float32
    weight = model.visual.blocks[0].attn.q_proj.weight
    assert weight.data_ptr() != state["visual.blocks.0.attn.q_proj.weight"].data_ptr()
    with torch.no_grad():
        weight.add_(1.0)
    assert torch.equal(state["visual.blocks.0.attn.q_proj.weight"], source.visual.blocks[0].attn.q_proj.weight)
