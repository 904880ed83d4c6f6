"""The answer of a multiple-choice prompt, read from the logits of the choice letters' tokens.

Which token a letter is depends on the tokenizer and the template ("A" or " A", merged with a space or
not), so the ids are taken from the template itself: a conversation rendered with the answer letter as
its assistant turn, tokenized, gives the tokens after the generation prompt's tokens. The letter's token
there is the one the model would emit when answering, and its logits are read at the position before it.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from tunesmith.data.types import Message
from tunesmith.errors import TunesmithError
from tunesmith.evaluation.benchmark import CHOICES
from tunesmith.evaluation.prompts import WORDINGS, encode_text


@dataclass(frozen=True)
class ChoiceTokens:
    """Where the answer letter is read: after ``prefix`` (appended to every prompt), among ``ids`` (A-D)."""

    prefix: tuple[int, ...]  # tokens between the generation prompt and the letter, e.g. a lone " "
    ids: tuple[int, ...]


def choice_tokens(
    tokenizer: Any, template: Any, lang: str, enable_thinking: bool | None = None
) -> ChoiceTokens:
    """The token of each letter A-D as the template's assistant turn writes it after the generation prompt.

    A template whose answer body starts with a space (llama2: ``[/INST] A``) gives "▁A" with a
    sentencepiece tokenizer, but a lone " " token and then "A" with some byte-level ones: such leading
    whitespace tokens become the prefix, exactly as the model would emit them before the letter.
    """
    user: list[Message] = [
        {"role": "user", "content": "Question?\nA. a\nB. b\nC. c\nD. d" + WORDINGS[lang].answer}
    ]
    prompt = template.render(user, add_generation_prompt=True, enable_thinking=enable_thinking).text
    [prompt_ids] = encode_text(tokenizer, [prompt])
    prefixes, ids = set(), []
    for letter in CHOICES:
        answered: list[Message] = [*user, {"role": "assistant", "content": letter}]
        full = template.render(answered, enable_thinking=enable_thinking).text
        if not full.startswith(prompt) or not full[len(prompt) :].lstrip().startswith(letter):
            after = full[len(prompt) :][:40] if full.startswith(prompt) else "(the prompt text changed)"
            raise TunesmithError(
                f"template {template.name!r}: the answer does not follow the generation prompt directly "
                f"(after it comes {after!r}), so the next-token logits cannot be read as the answer. "
                "Fix: set enable_thinking: false for a thinking template, or pick a template without text "
                "between the generation prompt and the answer"
            )
        [full_ids] = encode_text(tokenizer, [full])
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise TunesmithError(
                f"template {template.name!r}: with this tokenizer the answer {letter!r} merges with the end "
                "of the generation prompt into one token, so no prompt is followed by the letter alone. "
                "Fix: pick a template whose generation prompt ends in a newline or a special token"
            )
        rest = full_ids[len(prompt_ids) :]
        k = 0
        while k < len(rest) and not tokenizer.decode([rest[k]]).strip():
            k += 1
        if k == len(rest) or tokenizer.decode([rest[k]]).strip() != letter:
            piece = tokenizer.decode(rest[k : k + 1])
            raise TunesmithError(
                f"template {template.name!r}: the answer {letter!r} starts with the token {piece!r}, not the "
                "letter alone, so the choices cannot be told apart by one token. Fix: pick another template"
            )
        prefixes.add(tuple(rest[:k]))
        ids.append(rest[k])
    if len(prefixes) != 1 or len(set(ids)) != len(ids):
        raise TunesmithError(
            f"the choice letters do not tokenize as one distinct token each after the same prefix "
            f"(ids {ids}, prefixes {sorted(prefixes)}): their logits cannot be compared"
        )
    return ChoiceTokens(prefixes.pop(), tuple(ids))


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward can compute the head on chosen positions only (most transformers models)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.inference_mode()
def choice_probs(
    model: Any,
    prompts: Sequence[list[int]],
    choice_ids: Sequence[int],
    *,
    batch_size: int,
    pad_id: int,
    show_progress: bool = True,
) -> list[list[float]]:
    """Softmax over the choice tokens' next-token logits of each prompt (in the order given).

    Prompts are batched longest first and right-padded; each row's logits are read at its own last token,
    and only there is the output head computed (``logits_to_keep``).
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    choice = torch.tensor(list(choice_ids), device=device)
    keeps = _keeps_logits(model)
    out: list[list[float]] = [[] for _ in prompts]
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc="eval", unit="batch", disable=not show_progress, file=sys.stderr):
        rows = order[start : start + batch_size]
        width = len(prompts[rows[0]])
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(prompts[i])] = torch.tensor(prompts[i])
            mask[r, : len(prompts[i])] = 1
        last = mask.sum(dim=1) - 1
        kwargs: dict[str, Any] = {}
        if keeps:
            keep = torch.unique(last)  # sorted: row r's last position is at keep.searchsorted(last[r])
            kwargs["logits_to_keep"] = keep.to(device)
            at = torch.searchsorted(keep, last)
        else:
            at = last
        logits = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs
        ).logits
        picked = logits[torch.arange(len(rows), device=device), at.to(device)][:, choice].float()
        for i, p in zip(rows, torch.softmax(picked, dim=-1).tolist()):
            out[i] = p
    return out
