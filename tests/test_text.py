import pytest
import torch

from conftest import CLASSES, randomize_, tiny_config
from vitaclip import VitaCLIP
from vitaclip.text import get_tokenizer, tokenize


def coop_prompt_embeddings(model, classname):
    """CoOp's construction written out for one class: [SOS] + pieces + [".", EOS, pad]."""
    cfg, emb = model.config, model.textual.token_embedding
    learner = model.prompt_learner
    i = learner.classnames.index(classname)
    if learner.ctx is None:
        ctx = torch.empty(0, cfg.text_width)
    else:
        ctx = learner.ctx[i] if learner.ctx.dim() == 3 else learner.ctx
    name = emb(torch.tensor(get_tokenizer().encode(classname)))
    tokens = tokenize([("X " * cfg.n_ctx + classname).strip() + "."], cfg.context_length)[0]
    full = emb(tokens)
    sos, rest = full[:1], full[1 + cfg.n_ctx + len(name):]
    half = cfg.n_ctx // 2
    pieces = {"end": [ctx, name], "front": [name, ctx], "middle": [ctx[:half], name, ctx[half:]]}
    return torch.cat([sos, *pieces[cfg.ctx_position], rest])


@pytest.mark.parametrize("position", ["end", "front", "middle"])
@pytest.mark.parametrize("csc", [True, False])
@pytest.mark.parametrize("n_ctx", [0, 1, 4])
def test_context_positions_match_coop(position, csc, n_ctx):
    model = randomize_(VitaCLIP(tiny_config(ctx_position=position, csc=csc, n_ctx=n_ctx), CLASSES))
    embeds, eot = model.prompt_learner(model.textual.token_embedding)
    assert (model.prompt_learner.ctx is None) == (n_ctx == 0)
    if n_ctx:
        assert model.prompt_learner.ctx.shape == ((len(CLASSES), n_ctx, 32) if csc else (n_ctx, 32))
    for i, name in enumerate(model.prompt_learner.classnames):
        expected = coop_prompt_embeddings(model, name)
        assert torch.equal(embeds[i], expected[: embeds.shape[1]])
        assert int(eot[i]) == len(get_tokenizer().encode(name)) + n_ctx + 2  # SOS + ctx + name + "." -> EOS


def test_underscores_become_spaces_and_names_are_kept():
    model = VitaCLIP(tiny_config(), CLASSES)
    assert model.classnames == ["jumping jacks", "ride bike", "SitUps", "swim"]


@pytest.mark.parametrize("position", ["end", "middle"])
def test_truncation_at_last_end_of_text_is_exact(position):
    model = randomize_(VitaCLIP(tiny_config(ctx_position=position), CLASSES + ["a much longer class name here"]))
    embeds, eot = model.prompt_learner(model.textual.token_embedding)
    assert embeds.shape[1] == int(eot.max()) + 1 < model.config.context_length
    full_embeds, _ = model.prompt_learner(model.textual.token_embedding, truncate=False)
    assert full_embeds.shape[1] == 77 and torch.equal(full_embeds[:, : embeds.shape[1]], embeds)
    assert torch.allclose(model.encode_text(truncate=True), model.encode_text(truncate=False), atol=1e-6)
    texts = ["a video of a person dancing.", "swim"]
    assert torch.allclose(model.encode_text(texts), model.encode_text(texts, truncate=False), atol=1e-6)


@pytest.mark.parametrize("csc", [True, False])
def test_skipping_unread_work_changes_no_feature_or_context_gradient(csc):
    """With truncation the last layer computes only the end-of-text rows (and no token after the
    last one): the features and the context's gradient are those of the full computation."""
    classes = CLASSES + ["a much longer class name here"]
    model = randomize_(VitaCLIP(tiny_config(csc=csc, ctx_position="middle"), classes)).double()
    ctx = model.prompt_learner.ctx
    weights = torch.randn(len(classes), model.config.embed_dim, dtype=torch.float64)
    results = []
    for truncate in (True, False):
        features = model.encode_text(truncate=truncate)
        (features * weights).sum().backward()
        results.append((features.detach(), ctx.grad))
        ctx.grad = None
    (features, grad), (full_features, full_grad) = results
    torch.testing.assert_close(features, full_features, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(grad, full_grad, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("truncate", [True, False])
def test_explicit_text_attention_matches_sdpa(monkeypatch, truncate):
    """VITACLIP_TEXT_ATTENTION=explicit (the default, for short prompts): the features and the
    context's gradient of PyTorch's SDPA, in float64; under bf16 autocast no further from them."""
    classes = CLASSES + ["a much longer class name here"]
    model = randomize_(VitaCLIP(tiny_config(ctx_position="middle"), classes))
    weights = torch.randn(len(classes), model.config.embed_dim, dtype=torch.float64)

    def features_and_grad(kind, dtype):
        monkeypatch.setenv("VITACLIP_TEXT_ATTENTION", kind)
        copy = model.to(dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.float32):
            features = copy.encode_text(truncate=truncate).double()
        (features * weights).sum().backward()
        ctx = copy.prompt_learner.ctx
        grad, ctx.grad = ctx.grad.double(), None
        return features.detach(), grad

    reference = features_and_grad("sdpa", torch.float64)
    for got, want in zip(features_and_grad("explicit", torch.float64), reference):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    errors = {kind: [(got - want).abs().max() for got, want in zip(features_and_grad(kind, torch.float32), reference)]
              for kind in ("sdpa", "explicit")}
    for explicit, sdpa in zip(errors["explicit"], errors["sdpa"]):
        assert explicit <= 2 * sdpa + 1e-6
    monkeypatch.setenv("VITACLIP_TEXT_ATTENTION", "flash")
    with pytest.raises(ValueError, match="VITACLIP_TEXT_ATTENTION must be one of"):
        model.encode_text(truncate=truncate)


def test_generic_context_gets_gradient_from_every_class():
    model = randomize_(VitaCLIP(tiny_config(csc=False), CLASSES))
    model.encode_text()[2].sum().backward()
    assert model.prompt_learner.ctx.grad.abs().sum() > 0
    csc = randomize_(VitaCLIP(tiny_config(csc=True), CLASSES))
    csc.encode_text()[2].sum().backward()
    g = csc.prompt_learner.ctx.grad
    assert g[2].abs().sum() > 0 and g[[0, 1, 3]].abs().sum() == 0


def test_class_specific_contexts_refuse_the_models_classes_in_another_order():
    """Each class-specific context is its position's: set_classes with the classes reordered scored
    each class with another's context, silently (the commands refuse it too, with their files' names)."""
    csc = randomize_(VitaCLIP(tiny_config(csc=True), CLASSES))
    before = csc.text_features().clone()
    with pytest.raises(ValueError, match="class 0 is 'swim' here, 'jumping jacks' in the model"):
        csc.set_classes(list(reversed(CLASSES)))
    assert torch.equal(csc.text_features(), before)  # left as it was
    csc.set_classes(["a", "b", "c", "d"])  # other classes of the same number: the contexts by position
    for other in (tiny_config(csc=False), tiny_config(csc=True, n_ctx=0)):  # one context for all, or none
        model = VitaCLIP(other, CLASSES)
        model.set_classes(list(reversed(CLASSES)))
        assert model.classnames[0] == "swim"


def test_context_initialised_from_a_phrase():
    model = VitaCLIP(tiny_config(ctx_init="a video of a", csc=True), CLASSES)
    assert model.config.n_ctx == 4
    phrase = model.textual.token_embedding(tokenize(["a video of a"], 77))[0, 1:5]
    assert torch.equal(model.prompt_learner.ctx[1], phrase)
    embeds, _ = model.prompt_learner(model.textual.token_embedding)
    direct = model.textual.token_embedding(tokenize(["a video of a swim."], 77))[0]
    assert torch.equal(embeds[3], direct[: embeds.shape[1]])


def test_too_long_text_is_refused():
    with pytest.raises(ValueError, match="context length"):
        VitaCLIP(tiny_config(), ["word " * 80])


@pytest.mark.parametrize("truncate", [True, False])
def test_no_texts_give_no_features(truncate):
    """encode_text([]) failed in max() of no end-of-text positions; as any batch of 0 it gives [0, D]."""
    model = VitaCLIP(tiny_config(), CLASSES)
    features = model.encode_text([], truncate=truncate)
    assert features.shape == (0, model.config.embed_dim) and features.dtype == torch.float32


def test_a_text_of_exactly_the_context_length_fits():
    tokens = tokenize(["a " * 75], 77)  # start + 75 words + end of text: 77 tokens
    assert int(tokens[0].argmax()) == 76
    with pytest.raises(ValueError, match="context length"):
        tokenize(["a " * 76], 77)


@pytest.mark.parametrize("position, text", [("end", "a close-up video of swim."),
                                            ("front", "swim a close-up video of."),
                                            ("middle", "a close swim -up video of.")])
def test_a_phrase_gives_one_vector_per_word_and_keeps_its_other_tokens_fixed(position, text, tmp_path):
    """CoOp: n_ctx is the phrase's word count (underscores are spaces); its first n_ctx tokens
    become the context, the rest ("video of" after "a close - up") stay fixed text."""
    from vitaclip.text import keep_phrase_for_saved_context

    model = VitaCLIP(tiny_config(ctx_init="a close-up_video of", ctx_position=position), CLASSES)
    assert model.config.n_ctx == 4 and model.prompt_learner.fixed_after_ctx == 2
    embeds, eot = model.prompt_learner(model.textual.token_embedding)
    direct = model.textual.token_embedding(tokenize([text], 77))[0]
    assert torch.equal(embeds[3], direct[: embeds.shape[1]]) and int(eot[3]) == int(tokenize([text], 77).argmax())
    with torch.no_grad():
        model.prompt_learner.ctx.add_(torch.randn_like(model.prompt_learner.ctx))
    model.save_pretrained(tmp_path / "m")
    loaded = VitaCLIP.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded.encode_text()[2], model.encode_text()[2])  # the fixed tokens came back
    # a context saved with a vector per token of the phrase (before n_ctx was the word count) replaces it wholly
    config = tiny_config(ctx_init="a close-up_video of", n_ctx=6)
    keep_phrase_for_saved_context(config)
    assert config.ctx_init is None


@pytest.mark.parametrize("csc", [True, False])
def test_random_context_is_initialised_normal_std_0_02(csc):
    """SPEC: context vectors random init normal(std 0.02)."""
    ctx = VitaCLIP(tiny_config(csc=csc, n_ctx=8), CLASSES).prompt_learner.ctx
    assert abs(ctx.mean().item()) < 0.005
    assert 0.015 < ctx.std().item() < 0.025


@pytest.mark.parametrize("phrase, position, text", [("close-up", "front", "swim close-up."),
                                                    ("a close-up", "middle", "a swim close-up."),
                                                    ("close-up", "end", "close-up swim.")])
def test_a_phrases_fixed_tokens_follow_a_single_trailing_context_vector(phrase, position, text):
    """The phrase's tokens after its learned words stay after the last context vector, also when
    only one context vector follows the class name."""
    model = VitaCLIP(tiny_config(ctx_init=phrase, ctx_position=position), CLASSES)
    assert model.prompt_learner.fixed_after_ctx == 2
    embeds, eot = model.prompt_learner(model.textual.token_embedding)
    tokens = tokenize([text], 77)
    direct = model.textual.token_embedding(tokens)[0]
    assert int(eot[3]) == int(tokens.argmax())
    assert torch.equal(embeds[3], direct[: embeds.shape[1]])
