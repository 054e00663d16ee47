"""Behaviour of the text side (vitaclip/text.py: the list check, the explicit causal attention, the text
encoder's initialisation and its cut after the last end-of-text token) that mutation testing found
unpinned by the other tests.
"""
import math

import pytest
import torch

from conftest import randomize_, tiny_config
from vitaclip import VitaCLIP
from vitaclip.text import TextEncoder, causal_attention, string_list, tokenize


@pytest.mark.parametrize("values", [["run", 3], ["run", None], [b"run"]])
def test_a_list_with_a_non_string_is_refused_by_name(values):
    """string_list takes lists of strings only: a number or bytes among the class names or templates
    is refused as such, naming the setting (else it failed later, in str.replace or str.format, with
    an error that names neither)."""
    with pytest.raises(TypeError, match="class names must be a list of strings"):
        string_list(values, "class names")
    with pytest.raises(TypeError, match="class names must be a list of strings"):
        VitaCLIP(tiny_config(), values)


def test_causal_attention_is_computed_in_at_least_float32_and_returned_in_vs_dtype():
    """causal_attention's contract: fp16 inputs are computed in float32 (q k^T of two fp16 vectors can
    pass fp16's largest value, 65504, where float32 does not overflow) and returned in v's dtype.
    Here each score is 300 * 300 = 90000: the softmax over the visible keys is uniform, so every
    output row is the mean of the values up to its position (SPEC: causal; the mask from the query's
    position)."""
    q = torch.full((1, 1, 3, 1), 300.0, dtype=torch.float16)
    k = torch.full((1, 1, 3, 1), 300.0, dtype=torch.float16)
    v = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float16).view(1, 1, 3, 1)
    out = causal_attention(q, k, v, torch.arange(3)[None])
    assert out.dtype == torch.float16
    want = torch.tensor([1.0, 1.5, 7.0 / 3.0]).view(1, 1, 3, 1)
    torch.testing.assert_close(out.float(), want, rtol=1e-3, atol=1e-3)


def test_text_encoder_initialises_as_clip_does():
    """A text tower made without CLIP weights starts as CLIP's initialize_parameters: token embedding
    std 0.02, positional embedding std 0.01, in_proj width^-0.5, out_proj and c_proj
    width^-0.5 * (2 * layers)^-0.5, c_fc (2 * width)^-0.5, text_projection width^-0.5 (sample standard
    deviations within 10%, each from thousands of draws)."""
    config = tiny_config(text_width=64, text_layers=3, embed_dim=64)
    encoder = TextEncoder(config)
    w, layers = 64, 3
    proj_std = w ** -0.5 * (2 * layers) ** -0.5
    block = encoder.transformer.resblocks[1]
    expected = {"token_embedding": (encoder.token_embedding.weight, 0.02),
                "positional_embedding": (encoder.positional_embedding, 0.01),
                "in_proj": (block.attn.in_proj_weight, w ** -0.5),
                "out_proj": (block.attn.out_proj.weight, proj_std),
                "c_fc": (block.mlp.c_fc.weight, (2 * w) ** -0.5),
                "c_proj": (block.mlp.c_proj.weight, proj_std),
                "text_projection": (encoder.text_projection, w ** -0.5)}
    for name, (tensor, std) in expected.items():
        got = tensor.detach().std().item()
        assert math.isclose(got, std, rel_tol=0.1), (name, got, std)
    assert torch.count_nonzero(block.attn.in_proj_bias) == 0


def test_the_text_encoder_called_on_embeddings_cuts_after_the_last_end_of_text_token():
    """TextEncoder(embeddings, eot_index) without `length` finds the cut from eot_index: through the
    batch's last end-of-text position, which it reads (SPEC's exact speed-up: the features are those
    of the full 77 tokens). The model's own calls always pass `length`; a direct call did not."""
    encoder = randomize_(TextEncoder(tiny_config(text_layers=1))).double()
    tokens = tokenize(["a video of a person swimming.", "run"], 77)
    with torch.no_grad():
        embeddings = encoder.token_embedding(tokens)
        eot = tokens.argmax(dim=-1)
        full = encoder(embeddings, eot, truncate=False)
        torch.testing.assert_close(encoder(embeddings, eot), full, rtol=1e-12, atol=1e-12)
