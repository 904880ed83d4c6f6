"""A tiny chat tokenizer and model, built locally and deterministically (tests, demo, benchmarks).

The tokenizer is a byte-level BPE (every string encodes) with ChatML special tokens and a ChatML chat
template, so it behaves like a Qwen-family tokenizer at a few hundred KB. The model (built in the model
layer) is a 2-layer Qwen2 from config.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
VOCAB_SIZE = 2048

# ChatML, as Qwen2.5 writes it but without a default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "you",
    "that",
    "it",
    "he",
    "was",
    "for",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "have",
    "from",
    "or",
    "one",
    "had",
    "by",
    "word",
    "but",
    "not",
    "what",
    "all",
    "were",
    "we",
    "when",
    "your",
    "can",
    "said",
    "there",
    "use",
    "an",
    "each",
    "which",
    "she",
    "do",
    "how",
    "their",
    "if",
    "will",
    "up",
    "other",
    "about",
    "out",
    "many",
    "then",
    "them",
    "these",
    "so",
    "some",
    "her",
    "would",
    "make",
    "like",
    "him",
    "into",
    "time",
    "has",
    "look",
    "two",
    "more",
    "write",
    "go",
    "see",
    "number",
    "no",
    "way",
    "could",
    "people",
    "my",
    "than",
    "first",
    "water",
    "been",
    "call",
    "who",
    "oil",
    "its",
    "now",
    "find",
    "long",
    "down",
    "day",
    "did",
    "get",
    "come",
    "made",
    "may",
    "part",
    "give",
    "instruction",
    "input",
    "output",
    "answer",
    "question",
    "explain",
    "list",
    "describe",
    "write",
    "summarize",
    "translate",
    "create",
    "generate",
    "classify",
    "name",
    "identify",
    "what",
    "why",
    "how",
    "which",
    "where",
    "assistant",
    "user",
    "system",
    "model",
    "data",
    "train",
    "test",
    "label",
    "predict",
    "result",
    "function",
    "tool",
    "call",
    "response",
    "value",
    "capital",
    "country",
    "city",
    "river",
    "mountain",
    "color",
    "animal",
    "plant",
    "number",
    "sum",
    "difference",
    "product",
    "quotient",
    "add",
    "subtract",
    "multiply",
    "divide",
    "equals",
    "plus",
    "minus",
    "times",
    "yes",
    "no",
    "true",
    "false",
    "hello",
    "world",
    "thanks",
    "please",
    "Python",
    "code",
    "program",
    "error",
    "file",
    "line",
    "field",
    "expected",
    "reason",
    "because",
    "therefore",
    "example",
    "sample",
    "token",
]


def _corpus(seed: int = 0, lines: int = 4000) -> list[str]:
    """A fixed synthetic corpus: words, numbers, punctuation and arithmetic, the same on every machine."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        n = rng.randint(4, 18)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if i % 3 == 0:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            words += [f"{a} + {b} = {a + b}.", f"{a}-{b}", f"({a}, {b})"]
        if i % 5 == 0:
            words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", "?", "!", ":", ";", ",", "\n"]))
    out.append("".join(chr(c) for c in range(32, 127)))
    return out


def build_tiny_tokenizer(out_dir: str | Path) -> Path:
    """Train the tiny byte-level BPE tokenizer and save it with its chat template into out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=4096,
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    (out / "generation_config.json").write_text(
        json.dumps(
            {"eos_token_id": [fast.convert_tokens_to_ids("<|im_end|>")], "pad_token_id": fast.pad_token_id}
        )
    )
    return out


def tiny_tokenizer_dir() -> Path:
    """The shipped tiny tokenizer folder (built by `python -m tunesmith.tiny` at development time)."""
    return Path(__file__).parent / "assets" / "tiny"


if __name__ == "__main__":
    print(build_tiny_tokenizer(tiny_tokenizer_dir()))
