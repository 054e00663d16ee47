import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CLASSES, check_user_compile, random_video, randomize_, tiny_config
from spec_oracle import frame_features
from vitaclip import VitaCLIP, VitaCLIPConfig
from vitaclip.backends import resolve_backend
from vitaclip.vision import PatchEmbed


def frames(model, video):
    return model.visual(video, resolve_backend("reference", video.device).block_forward)


@pytest.mark.parametrize("prompts", [
    dict(),
    dict(use_summary=False),
    dict(use_local=False),
    dict(use_global=False),
    dict(use_summary=False, use_local=False),
    dict(use_summary=False, use_local=False, use_global=False),
    dict(num_global_prompts=1, num_frames=1),
    dict(act="gelu"),
])
def test_reference_matches_literal_spec_in_float64(prompts):
    model = randomize_(VitaCLIP(tiny_config(**prompts), CLASSES, backend="reference")).double()
    video = random_video(model.config).double()
    assert torch.allclose(frames(model, video), frame_features(model.visual, video), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("groups", [1, 2])
def test_reference_gradients_match_literal_spec_in_float64(groups):
    """The fast backends are tested against the reference's gradients and share its prompt code
    (`VitaBlock.prompts`): the reference's own gradients are held to the spec's here."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend="reference")).double()
    video = random_video(model.config, frames=groups * model.config.num_frames).double()
    named = [(name, p) for name, p in model.visual.named_parameters() if p.requires_grad]
    weights = torch.randn_like(frame_features(model.visual, video))
    got = torch.autograd.grad((frames(model, video) * weights).sum(), [p for _, p in named])
    want = torch.autograd.grad((frame_features(model.visual, video) * weights).sum(), [p for _, p in named])
    for (name, _), g, w in zip(named, got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9, msg=name)


def test_the_model_compiled_whole_by_its_user_gives_its_results():
    model = randomize_(VitaCLIP(tiny_config(), CLASSES, backend="reference"))
    check_user_compile(model, random_video(model.config))


def test_a_learned_context_loaded_into_a_model_without_classes_names_the_fix():
    trained = VitaCLIP(tiny_config(), CLASSES)
    bare = VitaCLIP(tiny_config())
    with pytest.raises(RuntimeError, match=r"learned text context .* no classes to hold it: .*set_classes"):
        bare.load_state_dict(trained.state_dict())
    assert bare.load_state_dict(trained.state_dict(), strict=False).unexpected_keys == ["prompt_learner.ctx"]
    bare.set_classes(CLASSES)
    bare.load_state_dict(trained.state_dict())
    assert torch.equal(bare.prompt_learner.ctx, trained.prompt_learner.ctx)


def test_prompts_are_initialised_as_the_public_code():
    config = tiny_config(layers=4, num_global_prompts=8)
    visual = VitaCLIP(config, CLASSES).visual
    bound = math.sqrt(6 / (3 * config.patch_size ** 2 + config.width))  # uniform(-a, a), SPEC
    for prompts in [visual.global_prompts, *(block.local_prompts for block in visual.blocks)]:
        assert 0.9 * bound < prompts.abs().max() <= bound
    assert 0.015 < visual.time_embed.std().item() < 0.025  # normal(0.02)
    xavier = math.sqrt(6 / (2 * config.width))
    for block in visual.blocks:
        attn = block.summary_attn_layer
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
            assert not proj.bias.any() and 0.9 * xavier < proj.weight.abs().max() <= xavier


@pytest.mark.parametrize("k", [2, 3])
def test_more_frames_at_test_time_act_in_groups_of_t0(k):
    model = randomize_(VitaCLIP(tiny_config(), CLASSES)).double()
    t0 = model.config.num_frames
    video = random_video(model.config, frames=k * t0).double()
    out = frames(model, video)
    assert torch.allclose(out, frame_features(model.visual, video), rtol=1e-9, atol=1e-9)
    # frames of one group do not reach another group's frame features...
    changed = video.clone()
    changed[:, :, t0:] += torch.randn_like(changed[:, :, t0:])
    out2 = frames(model, changed)
    assert torch.equal(out[:, :t0], out2[:, :t0])
    assert not torch.allclose(out[:, t0:], out2[:, t0:])
    # ...but frames of the same group do reach each other
    changed = video.clone()
    changed[:, :, 1] += 1.0
    assert not torch.allclose(frames(model, changed)[:, 0], out[:, 0])


def test_time_embedding_is_resized_by_nearest_neighbour():
    model = VitaCLIP(tiny_config(use_summary=False, use_local=False), CLASSES)
    te = model.visual.time_embed
    assert torch.equal(model.visual.time_embedding(7), te[[0, 0, 0, 1, 1, 2, 2]])
    assert model.visual.time_embedding(3) is te


@pytest.mark.parametrize("patch", [7, 8])
def test_patch_embedding_is_the_convolution(patch):
    embed = PatchEmbed(patch, 24).double()
    video = torch.randn(2, 3, 3, 4 * patch, 5 * patch, dtype=torch.float64)  # [B, 3, T, H, W]
    frames = video.transpose(1, 2)  # a strided view, as the model passes it
    want = torch.nn.functional.conv2d(frames.reshape(6, 3, 4 * patch, 5 * patch), embed.proj.weight,
                                      embed.proj.bias, stride=patch).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(frames), want, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # cast once, in the patch copy
        low = embed.float()(frames.float())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), want, rtol=0.05, atol=0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # frames of another dtype than the model's
        assert torch.equal(embed.float()(frames), low)
    torch.testing.assert_close(embed.float()(frames).double(), want, rtol=1e-5, atol=1e-5)


def test_a_float64_model_computes_in_float64_under_autocast(config):
    """Autocast leaves float64 alone (as its own matmuls do): the whole model too."""
    model = randomize_(VitaCLIP(config, CLASSES)).double()
    video = random_video(config, dtype=torch.float64)
    want = model(video)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(video)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_float64_model_gives_float64_logits_that_pass_gradcheck():
    """A researcher's gradcheck of the model needs float64 all the way to the logits (they were cast to fp32)."""
    config = tiny_config(layers=1, text_layers=1)
    model = randomize_(VitaCLIP(config, CLASSES)).double()
    video = random_video(config, batch=1, dtype=torch.float64)
    assert model(video).dtype == torch.float64
    with torch.no_grad():
        assert model(video).dtype == torch.float64 and model.text_features().dtype == torch.float64
    model.set_classes(["run", "jump"], templates=["a video of {}."])
    assert model(video).dtype == torch.float64
    model.set_classes(CLASSES)
    names = ["prompt_learner.ctx", "logit_scale", "visual.time_embed"]
    params = dict(model.named_parameters())

    def logits(*tensors):
        return torch.func.functional_call(model, dict(zip(names, tensors)), (video,))

    inputs = tuple(params[n].detach().clone().requires_grad_() for n in names)
    assert torch.autograd.gradcheck(logits, inputs, eps=1e-6, atol=1e-6, fast_mode=True)
    low = randomize_(VitaCLIP(config, CLASSES)).half()  # low-precision models keep fp32 logits
    assert low(random_video(config, dtype=torch.float16)).dtype == torch.float32


def test_logits_are_scaled_cosines(config):
    model = randomize_(VitaCLIP(config, CLASSES))
    video = random_video(config)
    logits = model(video)
    v = torch.nn.functional.normalize(model.encode_video(video), dim=-1)
    t = torch.nn.functional.normalize(model.encode_text(), dim=-1)
    assert logits.shape == (2, len(CLASSES))
    assert torch.allclose(logits, model.logit_scale.exp() * v @ t.t(), atol=1e-5)
    assert torch.allclose(VitaCLIP(config, CLASSES).logit_scale, torch.tensor(1 / 0.07).log())


def test_trainable_set_matches_public_code(config):
    model = VitaCLIP(config, CLASSES)
    names = {n for n, _ in model.named_trainable_parameters()}
    expected = {"logit_scale", "prompt_learner.ctx", "visual.time_embed", "visual.global_prompts"}
    for i in range(config.layers):
        expected.add(f"visual.blocks.{i}.local_prompts")
        for m in ("summary_ln", "summary_attn_layer.q_proj", "summary_attn_layer.k_proj",
                  "summary_attn_layer.v_proj", "summary_attn_layer.out_proj"):
            expected |= {f"visual.blocks.{i}.{m}.weight", f"visual.blocks.{i}.{m}.bias"}
    assert names == expected
    with_cls = VitaCLIP(tiny_config(train_cls_proj=True), CLASSES)
    extra = {n for n, _ in with_cls.named_trainable_parameters()} - expected
    assert extra == {f"visual.blocks.{i}.cls_proj.{p}" for i in range(config.layers) for p in ("weight", "bias")}


def test_only_trainable_parameters_get_gradients(config):
    model = randomize_(VitaCLIP(config, CLASSES))
    loss = torch.nn.functional.cross_entropy(model(random_video(config)), torch.tensor([0, 2]))
    loss.backward()
    trainable = {n for n, _ in model.named_trainable_parameters()}
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_reference_backend_runs_in_low_precision_autocast(config):
    model = randomize_(VitaCLIP(config, CLASSES))
    video = random_video(config)
    ref = model(video)
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out = model(video)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()


def test_text_features_are_cached_without_gradients_and_refreshed_after_updates(config):
    model = randomize_(VitaCLIP(config, CLASSES))
    with torch.no_grad():
        first = model.text_features()
        assert model.text_features() is first
        model.prompt_learner.ctx.add_(1.0)  # as an optimizer step would
        second = model.text_features()
    assert second is not first and not torch.allclose(first, second)
    assert torch.allclose(second, torch.nn.functional.normalize(model.encode_text(), dim=-1).detach())


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, torch.optim.SGD])
def test_cached_text_features_follow_a_fused_optimizers_steps(config, optimizer):
    """Fused optimizers update the parameters in place without bumping their version counters: an
    evaluation without gradients between training steps scored the context of the first one."""
    model = randomize_(VitaCLIP(config, CLASSES))
    video, labels = random_video(config), torch.tensor([0, 3])
    opt = optimizer(model.trainable_parameters(), lr=0.5, fused=True)
    for _ in range(3):
        model.train()
        F.cross_entropy(model(video), labels).backward()
        opt.step()
        opt.zero_grad()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model.text_features(), F.normalize(model.encode_text(), dim=-1))
            assert model.text_features() is model.text_features()  # still cached while nothing changes
    # zero-shot classes, the text tower trained by the user
    model.set_classes(["run", "jump"], templates=["a video of {}."])
    model.textual.text_projection.requires_grad_(True)
    opt = optimizer([model.textual.text_projection], lr=0.5, fused=True)
    for _ in range(2):
        model.textual.text_projection.grad = torch.randn_like(model.textual.text_projection)
        opt.step()
        with torch.no_grad():
            torch.testing.assert_close(model.text_features(), model.zero_shot_text_features(["run", "jump"],
                                                                                            ["a video of {}."]))


def test_cached_text_features_follow_reloads_and_casts(config):
    model = randomize_(VitaCLIP(config, CLASSES))
    other = randomize_(VitaCLIP(config, CLASSES))
    with torch.no_grad():
        model.text_features()
        # same architecture, untouched version counters: only the new memory tells
        model.load_state_dict(other.state_dict(), assign=True)
        torch.testing.assert_close(model.text_features(), other.text_features())
        model.half()
        assert model.text_features().dtype == torch.float32  # features are kept in at least fp32
        expected = torch.nn.functional.normalize(model.encode_text().float(), dim=-1)
        assert torch.equal(model.text_features(), expected)
        model.double()
        assert model.text_features().dtype == torch.float64
        expected = torch.nn.functional.normalize(model.encode_text(), dim=-1)
        assert torch.equal(model.text_features(), expected)


def test_zero_shot_text_features_follow_updates_and_reloads_of_the_text_tower(config):
    model = randomize_(VitaCLIP(config, CLASSES))
    other = randomize_(VitaCLIP(config, CLASSES))
    names, templates = ["run", "jump"], ["a video of {}.", "a clip of {}."]
    model.set_classes(names, templates=templates)
    first = model.text_features()
    assert model.text_features() is first  # computed once while nothing changes
    with torch.no_grad():
        model.textual.text_projection.mul_(-1)  # an in-place update
    assert torch.allclose(model.text_features(), -first, atol=1e-6)
    model.load_state_dict(other.state_dict())  # a reload, then the first call under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.text_features()
    assert torch.equal(model.text_features(), other.zero_shot_text_features(names, templates))


def test_a_model_made_under_inference_mode_runs(config):
    """Its tensors keep no version counter, which the text-feature cache's key reads."""
    with torch.inference_mode():
        model = randomize_(VitaCLIP(config, CLASSES))
        video = random_video(config)
        expected = model(video)
    with torch.no_grad():
        assert torch.equal(model(video), expected)


def test_zero_shot_classes_average_templates(config):
    model = randomize_(VitaCLIP(config, CLASSES))
    templates = ["a video of a person {}.", "a clip of {}."]
    model.set_classes(["run", "walk"], templates=templates)
    assert model.classnames == ["run", "walk"]
    feats = torch.nn.functional.normalize(model.encode_text([t.format("walk") for t in templates]), dim=-1)
    expected = torch.nn.functional.normalize(feats.mean(0), dim=-1)
    assert torch.allclose(model.text_features()[1], expected, atol=1e-6)
    assert model(random_video(config)).shape == (2, 2)
    model.set_classes(CLASSES)  # back to the learned context
    assert model(random_video(config)).shape == (2, len(CLASSES))


@pytest.mark.parametrize("templates, match", [
    (["a {} and a {}."], "exactly one"), (["a {name}."], "exactly one"), (["a video."], "exactly one"),
    (["a {"], "Single '{'"), ([], "empty"), ("a video of {}.", "list of strings")])
def test_bad_templates_are_refused_by_name(config, templates, match):
    model = VitaCLIP(config, CLASSES)
    with pytest.raises((ValueError, TypeError), match=match):
        model.set_classes(["run", "walk"], templates=templates)


def test_a_refused_class_list_leaves_the_zero_shot_classes_in_place(config):
    model = VitaCLIP(tiny_config(csc=True), CLASSES).eval()
    model.set_classes(["run", "jump", "swim"], templates=["a video of {}."])
    with pytest.raises(ValueError, match="trained for 4 classes, got 2"):
        model.set_classes(["run", "jump"])  # a class-specific context fits its own classes only
    assert model.classnames == ["run", "jump", "swim"] and model.zero_shot_templates == ["a video of {}."]
    assert model(random_video(config)).shape == (2, 3)


def test_a_lone_string_is_no_class_list(config):
    model = VitaCLIP(config, CLASSES)
    renamed = ["run", "walk", "jump_rope", "swim"]
    model.set_classes(name for name in renamed)  # any iterable of names, read once
    assert model.classnames == [n.replace("_", " ") for n in renamed]
    model.set_classes(iter(["run", "walk"]), templates=(t for t in ["a {}."]))
    assert model.zero_shot_templates == ["a {}."] and model.encode_text(iter(["dog", "cat"])).shape[0] == 2
    for call in (lambda: model.set_classes("swim"), lambda: model.encode_text("dog"),
                 lambda: model.set_classes("swim", templates=["a {}."]), lambda: VitaCLIP(config, "swim")):
        with pytest.raises(TypeError, match="list of strings"):
            call()


@pytest.mark.parametrize("shape, match", [
    ((2, 3, 3, 56), "rank 4"),
    ((2, 4, 3, 56, 56), "3 channels"),
    ((2, 3, 4, 56, 56), "multiple of the model's T0"),
    ((2, 3, 3, 64, 64), "positional embedding"),
    ((2, 3, 3, 56, 48), "positional embedding"),
])
def test_bad_video_shapes_are_rejected(config, shape, match):
    model = VitaCLIP(config, CLASSES)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


@pytest.mark.parametrize("video, match", [
    (torch.zeros(2, 3, 3, 56, 56, dtype=torch.uint8), "floating-point.*uint8.*raw pixels"),
    (torch.zeros(2, 3, 3, 56, 56, dtype=torch.int64), "floating-point.*int64"),
    (torch.zeros(2, 3, 3, 56, 56, dtype=torch.bool), "floating-point.*bool"),
    (torch.zeros(2, 3, 3, 56, 56, dtype=torch.complex64), "floating-point.*complex64"),
    (torch.zeros(2, 3, 3, 56, 56).numpy(), "torch.Tensor.*ndarray"),
    (torch.zeros(2, 3, 3, 56, 56).tolist(), "torch.Tensor.*list"),
])
def test_a_video_that_is_no_float_tensor_is_refused_by_type(config, video, match):
    """Raw uint8 frames (or integers) were cast and scored as they were, giving wrong logits silently."""
    model = VitaCLIP(config, CLASSES)
    for call in (model, model.encode_video):
        with pytest.raises(TypeError, match=match):
            call(video)


def test_frame_count_is_free_without_grouping_prompts():
    model = VitaCLIP(tiny_config(use_summary=False, use_local=False), CLASSES)
    assert model(torch.randn(1, 3, 5, 56, 56)).shape == (1, len(CLASSES))


@pytest.mark.parametrize("names, match", [
    ([], "empty"),
    (["run", ""], "empty class name"),
    (["run", "walk", "run"], "duplicate"),
    (["run", "run_"], "duplicate"),
])
def test_bad_class_lists_are_rejected(config, names, match):
    with pytest.raises(ValueError, match=match):
        VitaCLIP(config, names)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("ctx_init", [None, "a video of"])
def test_classes_set_after_a_cast_get_a_context_of_the_model_dtype(dtype, ctx_init):
    """A model cast before its classes are set gets its new context in its own dtype, as .half()
    would have cast it (it stayed float32: a mixed model, whose state dict and optimizer differ)."""
    model = VitaCLIP(tiny_config(ctx_init=ctx_init)).to(dtype)
    model.set_classes(CLASSES)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert model.prompt_learner.ctx.requires_grad
    assert model(random_video(model.config, dtype=dtype)).shape == (2, len(CLASSES))


def test_csc_context_only_fits_its_class_count(config):
    model = VitaCLIP(config, CLASSES)
    with pytest.raises(ValueError, match="4 classes"):
        model.set_classes(["a", "b"])
    generic = VitaCLIP(tiny_config(csc=False), CLASSES)
    generic.set_classes(["a", "b"])
    assert generic(random_video(config)).shape == (2, 2)


def test_unknown_backend_and_bad_config_are_rejected(config):
    with pytest.raises(ValueError, match="backend"):
        VitaCLIP(config, CLASSES, backend="nope")
    with pytest.raises(ValueError, match="ctx_position"):
        tiny_config(ctx_position="start")
    with pytest.raises(ValueError, match="divisible"):
        tiny_config(heads=3)


def test_presets():
    b16 = VitaCLIPConfig.preset("ViT-B/16")
    assert (b16.patch_size, b16.width, b16.num_patches, b16.embed_dim) == (16, 768, 196, 512)
    l336 = VitaCLIPConfig.preset("ViT-L/14-336", num_frames=16)
    assert (l336.image_size, l336.heads, l336.layers, l336.num_frames, l336.head_dim) == (336, 16, 24, 16, 64)
    assert VitaCLIPConfig.preset("vit-b-32").patch_size == 32
    with pytest.raises(ValueError, match="preset"):
        VitaCLIPConfig.preset("ViT-H/14")


def test_a_config_that_is_not_a_vitaclip_config_is_refused_by_type():
    from vitaclip.config import PRESETS

    with pytest.raises(TypeError, match=r"config must be a VitaCLIPConfig \(e.g. VitaCLIPConfig.preset"):
        VitaCLIP(PRESETS["ViT-B/32"], ["a", "b"])


def test_class_prompts_on_the_meta_device_are_refused_by_name(config):
    """Class prompts' token buffers come from the names, not from saved weights: on the meta device
    (made for to_empty() and load_state_dict) they would stay empty; it failed with 'Tensor.item()
    cannot be called on meta tensors'. A model built there without classes gets them afterwards."""
    with torch.device("meta"), pytest.raises(ValueError, match="class prompts cannot be made on the meta device"):
        VitaCLIP(config, ["a", "b"])
    with torch.device("meta"):
        model = VitaCLIP(config)
    with pytest.raises(ValueError, match=r"set them after model.to_empty\(device=...\)"):
        model.set_classes(["a", "b"])
    reference = VitaCLIP(config, ["a", "b"])
    model.to_empty(device="cpu")
    model.set_classes(["a", "b"])
    model.load_state_dict(reference.state_dict())
    video = torch.randn(2, 3, config.num_frames, config.image_size, config.image_size)
    torch.testing.assert_close(model(video), reference(video))


def test_backends_are_listed_for_a_device_and_a_wrong_choice_names_the_right_ones():
    from vitaclip import backends

    everywhere = backends.available_backends()
    assert "reference" in everywhere and backends.available_backends("meta") == ["reference"]
    if "fast" in everywhere:  # (Triton installed) offered on CUDA only
        with pytest.raises(ValueError, match=r"'fast' is not available on device meta \(there: \['auto', "
                                             r"'reference'\]\)"):
            backends.resolve_backend("fast", torch.device("meta"))


def test_cached_learned_text_features_follow_every_class_switch():
    """set_classes must drop the cached text features: the cache key holds only id(tokens), and a
    token buffer freed by one switch can be reborn at the same id two switches later."""
    model = randomize_(VitaCLIP(tiny_config(csc=False), CLASSES)).eval()
    lists = [list(CLASSES), ["run", "walk", "jump", "swim"], ["a", "b", "c"]]
    with torch.no_grad():
        for i in range(60):
            model.set_classes(lists[i % 3])
            if i % 2 == 0:  # features read after every second switch only
                want = F.normalize(model.encode_text().float(), dim=-1)
                got = model.text_features()
                assert got.shape == want.shape and torch.equal(got, want), i


def test_train_cls_proj_makes_cls_proj_trainable_and_get_gradients(config):
    """train_cls_proj=True: cls_proj is in the trainable set *and* requires grad, so it learns."""
    model = randomize_(VitaCLIP(tiny_config(train_cls_proj=True), CLASSES))
    trainable = {n for n, _ in model.named_trainable_parameters()}
    assert any(".cls_proj." in n for n in trainable)
    for name, p in model.named_parameters():
        assert p.requires_grad == (name in trainable), name
    F.cross_entropy(model(random_video(config)), torch.tensor([0, 2])).backward()
    for i in range(config.layers):
        g = model.visual.blocks[i].cls_proj.weight.grad
        assert g is not None and g.abs().sum() > 0


def test_set_backend_refuses_an_unknown_name_and_keeps_the_old_one(config):
    model = VitaCLIP(config, CLASSES, backend="reference")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        model.set_backend("nope")
    assert model.backend == "reference"
