"""Which token ids end a turn: the template's stop words and EOS, as single tokens of a tokenizer."""

from __future__ import annotations

from typing import Any


def stop_token_ids(tokenizer: Any, template: Any) -> list[int]:
    """Ids of the template's stop words (each must be a single token) and the tokenizer's EOS, deduplicated."""
    ids: list[int] = []
    words = [
        *getattr(template, "stop_words", ()),
        getattr(template, "eos", "") or "",
        tokenizer.eos_token or "",
    ]
    for word in words:
        if not word:
            continue
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids
