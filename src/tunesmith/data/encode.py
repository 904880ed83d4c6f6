"""Rendered text -> token ids, each token tagged with the span its first character falls in.

The whole text is tokenized once, as ``apply_chat_template`` does (``add_special_tokens=False``: the
template's text already holds BOS and the turn tokens), so the ids are exactly the official ones. Token
offsets then place every token in a span; nothing searches the text for marker strings. A token that
straddles two spans belongs to the one its first character is in (sentencepiece merges the space before
an answer into the answer's first word, which is why templates put that space in the answer's body).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain, repeat
from typing import Any

from tunesmith.data.fast_bpe import FastBPE
from tunesmith.data.types import Encoded, Rendered
from tunesmith.errors import TunesmithError


def encode(tokenizer: Any, rendered: Rendered) -> Encoded:
    """Token ids of ``rendered.text`` and, per token, the index of its span in ``rendered.spans``."""
    return encode_batch(tokenizer, [rendered])[0]


def encode_batch(tokenizer: Any, rendered: Sequence[Rendered], fast: FastBPE | None = None) -> list[Encoded]:
    """``encode`` for many texts with ONE call of the (fast, Rust) tokenizer, or its verified tiktoken twin."""
    if not rendered:
        return []
    if fast is not None:
        out = fast.encode(rendered)
        if out is not None:
            return out
    if not getattr(tokenizer, "is_fast", False):
        raise TunesmithError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; token offsets need a fast one. Load the "
            "model's tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True)) or convert it"
        )
    # The Rust backend directly: the transformers wrapper adds per-token Python work and nothing else here.
    encodings = tokenizer.backend_tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
    return [_tag(r, e) for r, e in zip(rendered, encodings)]


def _first_token_at_or_after(e: Any, char: int, text_len: int) -> int | None:
    """Index of the first token whose first character is at or after `char` (None: no such token)."""
    while char < text_len:
        t = e.char_to_token(char)
        if t is not None:
            start, _ = e.token_to_chars(t)
            return t if start >= char else t + 1  # a token that starts earlier belongs to the span before
        char += 1  # a character no token covers (e.g. whitespace a normalizer removed)
    return None


def _tag(rendered: Rendered, e: Any) -> Encoded:
    """Tag tokens with spans using a few lookups per span, not per token (the hot path of preprocessing).

    Same rule as mapping every token's start offset: a token belongs to the span its first character is in.
    """
    ids = e.ids
    n = len(ids)
    if not n:
        return Encoded(input_ids=[], token_span=[], spans=rendered.spans)
    text_len = len(rendered.text)
    starts, prev = [], 0
    for k, span in enumerate(rendered.spans):
        t = 0 if k == 0 else _first_token_at_or_after(e, span.start, text_len)
        prev = max(prev, n if t is None else min(t, n))
        starts.append(prev)
    starts.append(n)
    # Per-row numpy calls cost more than they save on a few hundred tokens; repeat() runs in C.
    token_span = list(
        chain.from_iterable(repeat(k, starts[k + 1] - starts[k]) for k in range(len(starts) - 1))
    )
    return Encoded(input_ids=ids, token_span=token_span, spans=rendered.spans)
