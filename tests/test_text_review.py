"""Review of the text side and the model's Python API against SPEC (prompt learner, text features,
zero-shot classes, the cached class features)."""
import copy

import pytest
import torch

from conftest import CLASSES, random_video, randomize_, tiny_config
from vitaclip import VitaCLIP
from vitaclip.text import tokenize


def test_a_phrase_context_survives_a_save_made_before_the_classes_are_set(tmp_path):
    """A model made with ctx_init but no classes (zero-shot use, classes set later) kept the config's
    n_ctx until its classes were set; saved so, the reloaded config's n_ctx differed from the phrase's
    word count, which reads as a context saved with one vector per token: the phrase was dropped and
    the classes set later got a random context instead of the phrase's embeddings."""
    model = VitaCLIP(tiny_config(ctx_init="a video of a", n_ctx=3))
    assert model.config.n_ctx == 4  # one vector per word (SPEC), from the start
    model.set_classes(["run", "jump"], templates=["a video of {}."])
    model.save_pretrained(tmp_path / "m")
    loaded = VitaCLIP.from_pretrained(tmp_path / "m")
    assert loaded.config.ctx_init == "a video of a" and loaded.config.n_ctx == 4
    loaded.set_classes(CLASSES)
    phrase = loaded.textual.token_embedding(tokenize(["a video of a"], 77))[0, 1:5]
    assert torch.equal(loaded.prompt_learner.ctx[0], phrase)


def test_cached_class_features_are_not_served_for_new_tensors_at_a_freed_address():
    """torch.func.functional_call with candidate contexts (plain tensors, each freed after its call)
    without gradients: the allocator hands the next candidate the freed one's memory, so the cache key
    (address, dtype, version 0) matched and the first candidate's class features scored every later
    one, silently."""
    model = randomize_(VitaCLIP(tiny_config(), CLASSES)).eval()
    reference = copy.deepcopy(model)
    video = random_video(model.config, batch=1)
    reused, previous = 0, None
    with torch.no_grad():
        for _ in range(20):
            context = torch.randn(model.prompt_learner.ctx.shape)
            reused += context.data_ptr() == previous
            previous = context.data_ptr()
            reference.prompt_learner.ctx.copy_(context)
            want = reference(video)
            got = torch.func.functional_call(model, {"prompt_learner.ctx": context}, (video,))
            del context
            torch.testing.assert_close(got, want)
        assert torch.equal(model(video), copy.deepcopy(model)(video))  # its own context again
    if not reused:
        pytest.skip("the allocator never gave a candidate a freed one's address")


@pytest.mark.parametrize("templates", [None, ["a video of {}."]])
def test_a_model_pickles_and_copies_after_its_class_features_are_cached(templates):
    """torch.save(model) and copy.deepcopy after an evaluation: the copy gives the same logits and
    follows its own weights."""
    import io

    model = randomize_(VitaCLIP(tiny_config(), CLASSES)).eval()
    if templates is not None:
        model.set_classes(["run", "jump"], templates=templates)
    video = random_video(model.config, batch=1)
    with torch.no_grad():
        want = model(video)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for copied in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
            assert torch.equal(copied(video), want)
            copied.textual.text_projection.mul_(-1)
            assert torch.allclose(copied(video), -want, atol=1e-5)
        assert torch.equal(model(video), want)


@pytest.mark.gpu  # (gpu_check.sh's tests stage runs -m gpu)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_phrase_context_is_made_for_a_model_already_on_the_gpu():
    """Classes first set on a model moved to the GPU: the phrase's token ids (made on the CPU) were
    looked up in the GPU's token embedding, which failed with a device mismatch."""
    model = VitaCLIP(tiny_config(ctx_init="a video of")).cuda()
    model.set_classes(CLASSES)
    assert model.prompt_learner.ctx.is_cuda
    phrase = model.textual.token_embedding(tokenize(["a video of"], 77).cuda())[0, 1:4]
    assert torch.equal(model.prompt_learner.ctx[0], phrase)


@pytest.mark.parametrize("what", ["templates", "class names"])
def test_no_list_at_all_is_named(what):
    """templates=None (or class names None) failed with "'NoneType' object is not iterable"."""
    from vitaclip.text import string_list

    with pytest.raises(TypeError, match=f"{what} must be a list of strings, got None"):
        string_list(None, what)


@pytest.mark.parametrize("names", [[], ["run", ""], ["run", "run"], ["Run", "run"]])
def test_class_lists_a_model_cannot_take_are_refused_as_such(names):
    """The command line names --classes for these only (ClassNamesError), not for every loading error."""
    from vitaclip.errors import ClassNamesError
    from vitaclip.text import check_classnames, check_distinct_tokens

    with pytest.raises(ClassNamesError):
        check_classnames(names)
        check_distinct_tokens(names, tokenize(names, 8))
