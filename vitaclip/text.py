"""CLIP's causal text encoder and the CoOp-style prompt learner of Vita-CLIP."""
from __future__ import annotations

import functools
import string
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .compiling import compile_mode
from .config import VitaCLIPConfig
from .errors import ClassNamesError
from .switches import env_choice
from .vision import autocast_off, make_activation

PLACEHOLDER = "X"


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """open_clip's CLIP BPE tokenizer (the one every OpenAI-style CLIP uses)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def string_list(values: Sequence[str], what: str) -> List[str]:
    """values as a list of strings; a lone string is refused (list("swim") would be four
    one-letter classes)."""
    if isinstance(values, str):
        raise TypeError(f"{what} must be a list of strings, got the string {values!r}")
    if not isinstance(values, Iterable):  # None: list() would name neither the setting nor its value
        raise TypeError(f"{what} must be a list of strings, got {values!r}")
    values = list(values)  # once: an iterator can be read only once
    if not all(isinstance(v, str) for v in values):
        raise TypeError(f"{what} must be a list of strings, got {values!r}")
    return values


def tokenize(texts: Sequence[str], context_length: int) -> Tensor:
    """Token ids [n, context_length]; refuses texts that would be silently truncated."""
    texts = string_list(texts, "texts")
    tokenizer = get_tokenizer()
    for text in texts:
        n = len(tokenizer.encode(text)) + 2  # start and end of text
        if n > context_length:
            raise ValueError(f"text {text!r} is {n} tokens long, more than the context length {context_length}")
    return tokenizer(texts, context_length=context_length)


def clean_classname(name: str) -> str:
    return name.replace("_", " ").strip()


class TextAttention(nn.Module):
    """Causal self-attention with CLIP's fused in_proj layout."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        n, s, c = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(n, s, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if text_attention_kind() == "explicit":
            o = causal_attention(q, k, v, torch.arange(s, device=x.device)[None])
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(o.transpose(1, 2).reshape(n, s, c))

    def forward_row(self, x: Tensor, row: Tensor) -> Tensor:
        """The output [n, C] at one position per sequence (row [n]): that row's query over the keys
        up to it (its row of the causal mask), with the keys and values of every position."""
        n, s, c = x.shape
        heads, head_dim = self.heads, c // self.heads
        q_weight, kv_weight = self.in_proj_weight.split([c, 2 * c])
        q_bias, kv_bias = self.in_proj_bias.split([c, 2 * c])
        k, v = F.linear(x, kv_weight, kv_bias).view(n, s, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.linear(_rows(x, row), q_weight, q_bias).view(n, heads, 1, head_dim)
        # one query: explicit attention, which any SDPA kernel choice (flash takes no mask) leaves alone
        return self.out_proj(causal_attention(q, k, v, row[:, None]).reshape(n, c))


TEXT_ATTENTION_ENV = "VITACLIP_TEXT_ATTENTION"
TEXT_ATTENTION_KINDS = ("sdpa", "explicit")


def text_attention_kind() -> str:
    """How the text layers attend: "explicit" (default: `causal_attention`; a class prompt is a few
    tens of tokens, which fused kernels pad to their 64-128-row tiles: the text side of a graphed
    training step, prompts truncated, took 6.63 ms with it, 7.10 ms with SDPA's default kernel and
    6.83 ms with its flash kernel on an H200, benchmarks/RESULTS.md run 4; 77-token and inference
    passes are not measured) or "sdpa" (PyTorch's fused kernels). Read from
    $VITACLIP_TEXT_ATTENTION when a pass runs, or, under torch.compile, when it compiles."""
    return env_choice(TEXT_ATTENTION_ENV, TEXT_ATTENTION_KINDS, "explicit")


def causal_attention(q: Tensor, k: Tensor, v: Tensor, query_positions: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(Dh)) v with the keys after each query's position hidden; q [n, H, Lq, Dh]
    at query_positions [n or 1, Lq], k, v [n, H, L, Dh]. In at least fp32 (tiny matrices), so that
    fp16's loss-scaled gradients do not overflow in it; the result in v's dtype."""
    hidden = (torch.arange(k.shape[-2], device=k.device) > query_positions[..., None]).unsqueeze(1)
    wide = torch.promote_types(q.dtype, torch.float32)
    with autocast_off(q.device.type):
        scores = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * q.shape[-1] ** -0.5
        o = scores.masked_fill(hidden, float("-inf")).softmax(dim=-1) @ v.to(wide)
    return o.to(v.dtype)


def _rows(x: Tensor, row: Tensor) -> Tensor:
    """x[i, row[i]] for each sequence i of x [n, L, C]."""
    return x[torch.arange(x.shape[0], device=x.device), row]


class TextMlp(nn.Module):
    def __init__(self, width: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.gelu = make_activation(act)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = TextAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = TextMlp(width, act)

    def forward(self, x: Tensor, row: Optional[Tensor] = None) -> Tensor:
        """The output [n, L, C]; given row [n], only its rows output[i, row[i]] [n, C], computing no
        other position's query, output or MLP (the last layer's, called so that its hooks run)."""
        if row is None:
            x = x + self.attn(self.ln_1(x))
        else:
            x = _rows(x, row) + self.attn.forward_row(self.ln_1(x), row)
        return x + self.mlp(self.ln_2(x))


class TextTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str):
        super().__init__()
        self.resblocks = nn.ModuleList(TextBlock(width, heads, act) for _ in range(layers))

    def forward(self, x: Tensor, row: Optional[Tensor] = None) -> Tensor:
        """The output [n, L, C]; given row [n], only the output at that position [n, C], for
        which the last layer computes one query, output and MLP per sequence instead of L."""
        blocks = list(self.resblocks)
        last = blocks.pop() if row is not None else None
        for block in blocks:
            x = block(x)
        return last(x, row) if last is not None else x


class TextEncoder(nn.Module):
    def __init__(self, config: VitaCLIPConfig):
        super().__init__()
        w = config.text_width
        self.token_embedding = nn.Embedding(config.vocab_size, w)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, w))
        self.transformer = TextTransformer(w, config.text_layers, config.text_heads, config.act)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(torch.empty(w, config.embed_dim))
        self.reset_parameters(config)

    @torch.no_grad()
    def reset_parameters(self, config: VitaCLIPConfig) -> None:
        w, layers = config.text_width, config.text_layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = (w ** -0.5) * ((2 * layers) ** -0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=w ** -0.5)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    def forward(self, embeddings: Tensor, eot_index: Tensor, truncate: bool = True,
                compiled: bool = False, length: Optional[int] = None) -> Tensor:
        """Text features [n, D] from token embeddings [n, L, width] read at eot_index [n].

        The transformer is causal and the feature is read at the end-of-text token, so with
        `truncate` nothing that cannot reach it is computed: no token after the batch's last
        end-of-text position (the embeddings are cut to `length`, by default found from
        eot_index, which waits for the GPU), and in the last layer no token but the end-of-text
        ones. Without, every token of every layer, as the original. `compiled` runs the
        transformer under torch.compile (the learned class prompts keep one shape through
        training, so it compiles once).
        """
        if truncate and (length is not None or eot_index.numel()):  # (no texts: nothing to cut to)
            embeddings = embeddings[:, : length if length is not None else int(eot_index.max()) + 1]
        x = embeddings + self.positional_embedding[: embeddings.shape[1]].to(embeddings.dtype)
        transformer = self.compiled_transformer() if compiled else self.transformer
        x = transformer(x, eot_index) if truncate else _rows(transformer(x), eot_index)
        return self.ln_final(x) @ self.text_projection  # ln_final acts per token: after the gather

    def compiled_transformer(self):
        # kept out of the module tree: a compiled wrapper would duplicate every state-dict key
        if "_compiled_transformer" not in self.__dict__:
            mode = compile_mode()
            self.__dict__["_compiled_transformer"] = torch.compile(self.transformer, dynamic=False, mode=mode)
        return self.__dict__["_compiled_transformer"]

    def encode_tokens(self, tokens: Tensor, truncate: bool = True) -> Tensor:
        """Features [n, D] of token ids [n, L], on any device: the cut is read off them where they
        are (ids on the CPU: no wait for the GPU, and a tower on the meta device, whose tensors hold
        no values, still finds it)."""
        eot_index = tokens.argmax(dim=-1)
        length = int(eot_index.max()) + 1 if eot_index.numel() else None
        device = self.token_embedding.weight.device
        return self(self.token_embedding(tokens.to(device)), eot_index.to(device), truncate, length=length)


class PromptLearner(nn.Module):
    """Learnable context vectors spliced into "X X ... X <class name>." (CoOp).

    Only the context is a parameter. The class tokens are kept as ids and embedded on the fly
    through the (frozen) token embedding, so a reloaded embedding can never go stale.
    """

    def __init__(self, config: VitaCLIPConfig, token_embedding: nn.Embedding, classnames: Sequence[str]):
        super().__init__()
        self.config = config
        self.position = config.ctx_position
        width = config.text_width
        n_classes = len(classnames)
        self.fixed_after_ctx = 0  # tokens of the phrase after its learned words, kept as they are
        if config.ctx_init:
            init_tokens = tokenize([phrase_text(config.ctx_init)], config.context_length)
            n_ctx = phrase_words(config.ctx_init)
            config.n_ctx = n_ctx  # one vector per word (CoOp), from the phrase's first n_ctx tokens
            self.fixed_after_ctx = int(init_tokens.argmax(-1)) - 1 - n_ctx
            if self.fixed_after_ctx < 0:
                raise ValueError(f"ctx_init {config.ctx_init!r} has fewer tokens than words")
            with torch.no_grad():
                # on the embedding's device (a model moved to the GPU before its classes are set)
                init = token_embedding(init_tokens.to(token_embedding.weight.device))[0, 1 : 1 + n_ctx].clone()
            ctx = init.expand(n_classes, -1, -1).clone() if config.csc else init
        else:
            shape = (n_classes, config.n_ctx, width) if config.csc else (config.n_ctx, width)
            ctx = torch.empty(shape)
            nn.init.normal_(ctx, std=0.02)
        self.n_ctx = config.n_ctx
        self.ctx = nn.Parameter(ctx) if self.n_ctx else None
        self.set_classes(classnames)

    @property
    def prefix(self) -> str:
        return phrase_text(self.config.ctx_init) if self.config.ctx_init else " ".join([PLACEHOLDER] * self.n_ctx)

    def set_classes(self, classnames: Sequence[str]) -> None:
        names = [clean_classname(n) for n in string_list(classnames, "class names")]
        check_classnames(names)
        if self.config.csc and self.ctx is not None and self.ctx.shape[0] != len(names):
            raise ClassNamesError(f"the class-specific context was trained for {self.ctx.shape[0]} classes, "
                                  f"got {len(names)} class names")
        current = getattr(self, "classnames", None)
        if (self.config.csc and self.ctx is not None and current is not None and names != current
                and sorted(names) == sorted(current)):
            # each context is its position's: the same classes reordered would score each with another's
            moved = next(i for i, (new, old) in enumerate(zip(names, current)) if new != old)
            raise ClassNamesError(f"these are the model's classes in another order (class {moved} is "
                                  f"{names[moved]!r} here, {current[moved]!r} in the model), and its class-specific "
                                  f"contexts follow positions: give them in the model's order (model.classnames)")
        tokens = tokenize(class_prompts(self.prefix, names), self.config.context_length)
        if not (self.config.csc and self.ctx is not None):  # (a context of their own tells them apart)
            check_distinct_tokens(names, tokens)
        name_lens = [len(get_tokenizer().encode(name)) for name in names]
        token_src, ctx_slot = splice_indices(tokens.shape[1], self.n_ctx, name_lens, self.position,
                                             self.fixed_after_ctx)
        previous = getattr(self, "tokens", None)
        device = previous.device if previous is not None else (self.ctx.device if self.ctx is not None else None)
        self.classnames: List[str] = names
        self.register_buffer("tokens", tokens.to(device), persistent=False)
        self.register_buffer("token_src", token_src.to(device), persistent=False)
        self.register_buffer("ctx_slot", ctx_slot.to(device), persistent=False)
        self.prompt_length = int(tokens.argmax(dim=-1).max()) + 1  # through the last end-of-text

    def forward(self, token_embedding: nn.Embedding, truncate: bool = True) -> tuple[Tensor, Tensor]:
        """Prompt embeddings [n_classes, L, width] and their end-of-text positions [n_classes];
        L stops at the last end-of-text position (later ones never reach the feature) with `truncate`."""
        length = self.prompt_length if truncate else self.tokens.shape[1]
        src = self.token_src[:, :length]
        embeds = token_embedding(self.tokens.gather(1, src))
        if self.ctx is not None:
            slot = self.ctx_slot[:, :length]
            ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(len(self.classnames), -1, -1)
            gathered = ctx.to(embeds.dtype).gather(1, slot.clamp(min=0).unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
            embeds = torch.where((slot >= 0).unsqueeze(-1), gathered, embeds)
        return embeds, self.tokens.argmax(dim=-1)


def check_templates(templates: Sequence[str]) -> List[str]:
    """The zero-shot templates as a list, each with exactly one '{}' (the class name) and no other field."""
    templates = string_list(templates, "templates")
    if not templates:
        raise ValueError("templates: the list is empty")
    for template in templates:
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
        except ValueError as error:
            raise ValueError(f"template {template!r}: {error}") from None
        if fields != [""]:
            raise ValueError(f"template {template!r} must hold the class name as exactly one '{{}}' and no "
                             f"other field (write literal braces as '{{{{' and '}}}}')")
    return templates


def check_classnames(names: Sequence[str]) -> None:
    if not names:
        raise ClassNamesError("the class list is empty")
    empty = [i for i, n in enumerate(names) if not n]
    if empty:
        raise ClassNamesError(f"empty class name(s) at position(s) {empty}")
    seen, dups = set(), []
    for n in names:
        if n in seen:
            dups.append(n)
        seen.add(n)
    if dups:
        raise ClassNamesError(f"duplicate class name(s): {sorted(set(dups))}")


def class_prompts(prefix: str, names: Sequence[str]) -> List[str]:
    """Each class's prompt around a learned context: `prefix` (the context's words), the name, a full stop."""
    return [f"{prefix} {name}.".strip() for name in names]


def check_distinct_tokens(names: Sequence[str], tokens: Tensor) -> None:
    """Refuses two class names whose prompts (`tokens`, the same number per name) come out as the same
    token ids: CLIP's tokenizer lowercases and collapses white space, and such classes would tie on
    every video, one of them never predicted."""
    first: Dict[tuple, str] = {}
    for name, class_tokens in zip(names, tokens.view(len(names), -1).tolist()):
        other = first.setdefault(tuple(class_tokens), name)
        if other != name:
            raise ClassNamesError(f"classes {other!r} and {name!r} give the same tokens (CLIP's tokenizer "
                                  "lowercases and collapses white space): their scores would tie on every video")


def zero_shot_tokens(classnames: Sequence[str], templates: Sequence[str],
                     context_length: int) -> Tuple[List[str], List[str], Tensor]:
    """(the cleaned class names, the checked templates, the tokens of every class's prompt with each
    template, class-major): refuses class names or templates zero-shot scoring cannot use."""
    names = [clean_classname(n) for n in string_list(classnames, "class names")]
    check_classnames(names)
    templates = check_templates(templates)
    tokens = tokenize([t.format(n) for n in names for t in templates], context_length)
    check_distinct_tokens(names, tokens)
    return names, templates, tokens


def splice_indices(length: int, n_ctx: int, name_lens: Sequence[int], position: str,
                   fixed_after_ctx: int = 0) -> tuple[Tensor, Tensor]:
    """Where each output position of each class prompt reads from.

    The tokenised text is [SOS, X * n_ctx, fixed, name, ".", EOS, pad...], `fixed` being the
    `fixed_after_ctx` tokens of an initialising phrase after its learned words. Returns
    `token_src` [n, L], the token position to embed, and `ctx_slot` [n, L], the context vector
    index or -1, that rearrange it into the requested context position (end, front or middle);
    the fixed tokens follow the last context vector.
    """
    n = len(name_lens)
    token_src = torch.arange(length).repeat(n, 1)
    ctx_slot = torch.full((n, length), -1, dtype=torch.long)
    half = n_ctx // 2 if position == "middle" else (n_ctx if position == "end" else 0)
    fixed = list(range(1 + n_ctx, 1 + n_ctx + fixed_after_ctx))
    for i, name_len in enumerate(name_lens):
        name = list(range(1 + n_ctx + fixed_after_ctx, 1 + n_ctx + fixed_after_ctx + name_len))
        # output layout: SOS, ctx[:half], name, ctx[half:], with the fixed tokens after the last context vector
        sources = [(-1, j) for j in range(half)] + (fixed if half == n_ctx else [])
        sources += name + [(-1, j) for j in range(half, n_ctx)] + (fixed if half < n_ctx else [])
        for out, source in enumerate(sources, start=1):
            if isinstance(source, tuple):
                ctx_slot[i, out] = source[1]
            else:
                token_src[i, out] = source
    return token_src, ctx_slot


def phrase_text(phrase: str) -> str:
    """An initialising phrase as tokenised: underscores are spaces (as in class names)."""
    return " ".join(phrase.replace("_", " ").split())


def phrase_words(phrase: str) -> int:
    """Its word count: the context vectors a phrase initialises (SPEC)."""
    return len(phrase_text(phrase).split())


def keep_phrase_for_saved_context(config) -> None:
    """Before loading a saved context: it replaces the phrase's learned words, whose later tokens
    stay fixed text, so the phrase is kept; a context saved with one vector per token of the
    phrase (before n_ctx was its word count) replaces it wholly, so the phrase is dropped."""
    if config.ctx_init is not None and config.n_ctx != phrase_words(config.ctx_init):
        config.ctx_init = None
