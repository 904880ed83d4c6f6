"""Choice-letter token ids: the letter as the template's assistant turn writes it after the generation prompt."""

from __future__ import annotations

import pytest

from tunesmith.data.templates import resolve_template
from tunesmith.errors import TunesmithError
from tunesmith.evaluation.choice import choice_tokens


def test_chatml_letters_follow_the_generation_prompt_directly(tiny_tokenizer):
    choice = choice_tokens(tiny_tokenizer, resolve_template("chatml", tiny_tokenizer), "en")
    assert choice.prefix == ()
    assert list(choice.ids) == tiny_tokenizer.convert_tokens_to_ids(["A", "B", "C", "D"])
    assert choice == choice_tokens(tiny_tokenizer, resolve_template("auto", tiny_tokenizer), "zh")


def test_a_lone_space_token_before_the_letter_becomes_the_prefix(tiny_tokenizer):
    # llama2 writes "[/INST] A"; the tiny byte-level BPE has no " A" token, so the model emits " " then "A".
    choice = choice_tokens(tiny_tokenizer, resolve_template("llama2", tiny_tokenizer), "en")
    assert [tiny_tokenizer.decode([t]) for t in choice.prefix] == [" "]
    assert list(choice.ids) == tiny_tokenizer.convert_tokens_to_ids(["A", "B", "C", "D"])


def _load(hf_tokenizers, family):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_tokenizers / family)


def test_sentencepiece_space_letter_and_in_context_letter(hf_tokenizers):
    llama2 = _load(hf_tokenizers, "llama-2-chat")
    choice = choice_tokens(llama2, resolve_template("llama2", llama2), "en")
    assert choice.prefix == () and llama2.convert_ids_to_tokens(list(choice.ids)) == ["▁A", "▁B", "▁C", "▁D"]
    # Phi-3 answers "A" right after "<|assistant|>\n": the bare letter, not the "▁A" that encoding "A" alone
    # gives (LLaMA-Factory's choice ids); reading "▁A" would score a token the model never writes there.
    phi3 = _load(hf_tokenizers, "phi-3-mini-4k-instruct")
    choice = choice_tokens(phi3, resolve_template("phi3", phi3), "en")
    assert phi3.convert_ids_to_tokens(list(choice.ids)) == ["A", "B", "C", "D"]
    assert [phi3.encode(c, add_special_tokens=False)[-1] for c in "ABCD"] != list(choice.ids)


def test_thinking_template_needs_thinking_off(hf_tokenizers):
    qwen3 = _load(hf_tokenizers, "qwen3")
    template = resolve_template("qwen3", qwen3)
    with pytest.raises(TunesmithError, match="after it comes '<think>.*enable_thinking: false"):
        choice_tokens(qwen3, template, "en")
    assert list(
        choice_tokens(qwen3, template, "en", enable_thinking=False).ids
    ) == qwen3.convert_tokens_to_ids(["A", "B", "C", "D"])
