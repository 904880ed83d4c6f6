"""Which token ids end a turn: the template's stop words and EOS, as single tokens of a tokenizer."""

from __future__ import annotations

from typing import Any

from tunesmith.data.templates import AutoTemplate, Template


def stop_token_ids(tokenizer: Any, template: Template | AutoTemplate) -> list[int]:
    """Ids of the template's stop words, its ``train_eos`` (the stop token training samples end with) and
    the tokenizer's EOS, deduplicated; each must be a single token."""
    ids: list[int] = []
    words = [
        *template.stop_words,
        template.eos or "",
        template.train_eos if isinstance(template, Template) else "",
        tokenizer.eos_token or "",
    ]
    for word in words:
        if not word:
            continue
        enc = tokenizer.encode(word, add_special_tokens=False)
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
    return ids
