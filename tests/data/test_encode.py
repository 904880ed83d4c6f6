"""encode / encode_batch: one tokenizer call over the whole text, tokens tagged by offsets."""

from __future__ import annotations

from typing import Any

import pytest

from tunesmith.data.encode import encode, encode_batch
from tunesmith.data.templates import get_template, render
from tunesmith.data.types import Rendered, Span
from tunesmith.errors import TunesmithError

SPECIALS = ["<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok() -> Any:
    """A tiny byte-level BPE fast tokenizer with ChatML's special tokens, built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["Hello there, how are you?", "system user assistant", "The answer is 42.", "Be brief. Hi"] * 20
    bpe.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")


class CountingTokenizer:
    """Delegates to a tokenizer and counts calls (to prove encode_batch makes exactly one)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls, self.is_fast = inner, 0, True
        self.backend_tokenizer = self  # encode_batch goes straight to the Rust backend

    def encode_batch(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner.backend_tokenizer.encode_batch(*args, **kwargs)


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello there"},
    {"role": "user", "content": "how are you?"},
    {"role": "assistant", "content": "The answer is 42."},
]


def test_tokens_are_tagged_with_the_span_of_their_first_character(tok: Any) -> None:
    rendered = render(get_template("chatml"), CONV)
    enc = encode(tok, rendered)
    offsets = tok(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert enc.input_ids == tok(rendered.text, add_special_tokens=False)["input_ids"]
    assert len(enc.token_span) == len(enc.input_ids) and enc.spans == rendered.spans
    for (start, _), k in zip(offsets, enc.token_span):
        assert rendered.spans[k].start <= start < rendered.spans[k].end
    learned = [i for i, k in zip(enc.input_ids, enc.token_span) if rendered.spans[k].supervise]
    assert tok.decode(learned) == "Hello there<|im_end|>The answer is 42.<|im_end|>"


def test_encode_batch_is_one_call_and_equals_encode(tok: Any) -> None:
    t = get_template("chatml")
    batch = [render(t, CONV), render(t, CONV[1:3], add_generation_prompt=True), render(t, CONV[:2])]
    counting = CountingTokenizer(tok)
    out = encode_batch(counting, batch)
    assert counting.calls == 1
    assert out == [encode(tok, r) for r in batch]
    assert encode_batch(counting, []) == [] and counting.calls == 1


def test_a_token_straddling_two_spans_belongs_to_the_first(tok: Any) -> None:
    text = "Hello there"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 2  # "Hello", " there"
    rendered = Rendered(text, (Span(0, 3, 0, False), Span(3, 7, 1, True), Span(7, 11, -1, False)))
    assert encode(tok, rendered).token_span == [0, 1]  # " there" starts at 5, inside span 1


def test_slow_tokenizers_are_refused(tok: Any) -> None:
    slow = CountingTokenizer(tok)
    slow.is_fast = False
    with pytest.raises(TunesmithError, match="slow .*fast"):
        encode(slow, render(get_template("chatml"), CONV))
    assert slow.calls == 0
