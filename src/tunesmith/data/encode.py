"""Rendered text -> token ids, each token tagged with the span its first character falls in.

The whole text is tokenized once, as ``apply_chat_template`` does (``add_special_tokens=False``: the
template's text already holds BOS and the turn tokens), so the ids are exactly the official ones. Token
offsets then place every token in a span; nothing searches the text for marker strings. A token that
straddles two spans belongs to the one its first character is in (sentencepiece merges the space before
an answer into the answer's first word, which is why templates put that space in the answer's body).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tunesmith.data.types import Encoded, Rendered
from tunesmith.errors import TunesmithError


def encode(tokenizer: Any, rendered: Rendered) -> Encoded:
    """Token ids of ``rendered.text`` and, per token, the index of its span in ``rendered.spans``."""
    return encode_batch(tokenizer, [rendered])[0]


def encode_batch(tokenizer: Any, rendered: Sequence[Rendered]) -> list[Encoded]:
    """``encode`` for many texts with ONE call of the (fast, Rust) tokenizer."""
    if not rendered:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise TunesmithError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; token offsets need a fast one. Load the "
            "model's tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True)) or convert it"
        )
    # The Rust backend directly: the transformers wrapper adds per-token Python work and nothing else here.
    encodings = tokenizer.backend_tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
    return [_tag(r, e.ids, e.offsets) for r, e in zip(rendered, encodings)]


def _tag(rendered: Rendered, ids: list[int], offsets: Sequence[tuple[int, int]]) -> Encoded:
    if not ids:
        return Encoded(input_ids=[], token_span=[], spans=rendered.spans)
    starts = np.fromiter((s.start for s in rendered.spans), dtype=np.int64, count=len(rendered.spans))
    token_starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
    token_span = np.clip(np.searchsorted(starts, token_starts, side="right") - 1, 0, len(starts) - 1)
    return Encoded(input_ids=list(ids), token_span=token_span.tolist(), spans=rendered.spans)
