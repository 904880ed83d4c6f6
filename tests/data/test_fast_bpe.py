"""The tiktoken twin of byte-level BPE tokenizers gives exactly the tokenizer's ids and span tags."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import pytest

pytest.importorskip("tiktoken")

from tunesmith.data.encode import _tag
from tunesmith.data.fast_bpe import fast_bpe_for
from tunesmith.data.pipeline import DataOptions, prepare
from tunesmith.data.registry import resolve_dataset
from tunesmith.data.templates import get_template, resolve_template
from tunesmith.data.types import Rendered, Span

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "hf_tokenizers"
LF_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "compat" / "llamafactory-data"

# (fixture, template): byte-level BPE tokenizers of the shared fixtures and their chat templates.
BYTE_LEVEL = [
    ("qwen2.5-instruct", "qwen"),
    ("qwen3", "qwen3"),
    ("llama-3.2-instruct", "llama3"),
    ("phi-4-mini-instruct", "phi4_mini"),
]
DATASETS = ["alpaca_en_demo", "alpaca_zh_demo", "glaive_toolcall_en_demo", "identity", "dpo_zh_demo"]


@cache
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    if name == "tiny":
        from tunesmith.tiny import tiny_tokenizer_dir

        return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())
    if not (FIXTURES / name).exists():
        pytest.skip(f"{FIXTURES / name} not present")
    return AutoTokenizer.from_pretrained(str(FIXTURES / name))


def _rows(dataset: str, limit: int = 120) -> list[dict]:
    if not (LF_DATA / "dataset_info.json").exists():
        pytest.skip(f"{LF_DATA} not present")
    from tunesmith.data.load import BadRowPolicy, LoadReport, load_rows

    spec = resolve_dataset(dataset, str(LF_DATA))
    rows = load_rows(
        spec, dataset_dir=str(LF_DATA), policy=BadRowPolicy(), report=LoadReport(dataset), show_progress=False
    )
    out = []
    for row in rows:
        out.append(row)
        if len(out) >= limit:
            break
    return out


def _rendered(template, rows: list[dict]) -> list[Rendered]:
    out = []
    for row in rows:
        messages = row["messages"] + ([row["chosen"]] if "chosen" in row else [])
        tools = row.get("tools", "") if getattr(template, "tool_format", None) else ""
        out.append(template.render(messages, tools=tools))
    return out


def _reference(tokenizer, rendered: list[Rendered]):
    encs = tokenizer.backend_tokenizer.encode_batch([r.text for r in rendered], add_special_tokens=False)
    return [_tag(r, e) for r, e in zip(rendered, encs)]


@pytest.mark.parametrize(("fixture", "template_name"), [("tiny", "qwen"), *BYTE_LEVEL])
def test_ids_and_span_tags_equal_the_tokenizer(fixture: str, template_name: str) -> None:
    tok = _tokenizer(fixture)
    fast = fast_bpe_for(tok)
    assert fast is not None, f"{fixture} should be eligible for the fast path"
    template = resolve_template(template_name, tok)
    compared = 0
    for dataset in DATASETS:
        if "toolcall" in dataset and not getattr(template, "tool_format", None):
            continue
        rendered = _rendered(template, _rows(dataset))
        mine = fast.encode(rendered)
        assert mine is not None, f"{fixture}/{dataset}: the fast path declined a batch"
        for r, m, ref in zip(rendered, mine, _reference(tok, rendered)):
            assert m.input_ids == ref.input_ids, (fixture, dataset, r.text[:200])
            assert m.token_span == ref.token_span, (fixture, dataset, r.text[:200])
            compared += 1
    assert fast.trusted and compared >= 300


def test_span_boundaries_inside_words_and_tokens_follow_the_first_character_rule() -> None:
    tok = _tokenizer("tiny")
    fast = fast_bpe_for(tok)
    text = "<|im_start|>user\nunbelievable  spaces\u00e9t\u00e9 <|im_end|>\n<|im_start|>ok"
    cuts = [0, 3, 14, 17, 20, 27, 30, 35, len(text) - 3, len(text)]  # inside tokens, words, added tokens
    spans = tuple(Span(a, b, -1, False) for a, b in zip(cuts, cuts[1:]))
    r = Rendered(text, spans)
    mine = fast.encode_one(r)
    ref = _reference(tok, [r])[0]
    assert (mine.input_ids, mine.token_span) == (ref.input_ids, ref.token_span)


def test_not_byte_level_tokenizers_are_refused() -> None:
    for fixture in ("llama-2-chat", "falcon-40b", "mistral-7b-instruct-v0.3"):
        assert fast_bpe_for(_tokenizer(fixture)) is None, fixture


def test_non_nfc_rows_go_through_the_tokenizer() -> None:
    tok = _tokenizer("qwen2.5-instruct")  # normalises with NFC
    fast = fast_bpe_for(tok)
    decomposed = Rendered("cafe\u0301 and re\u0301sume\u0301", (Span(0, 23, -1, False),))
    assert fast.encode_one(decomposed) is None
    assert fast.encode([decomposed]) is None  # the caller then uses the tokenizer itself


def test_a_disagreement_found_by_the_spot_check_stops_the_fast_path() -> None:
    tok = _tokenizer("tiny")
    good = fast_bpe_for(tok)
    wrong = _tokenizer("qwen2.5-instruct").backend_tokenizer  # a backend that disagrees on ids
    fast = replace(good, backend=wrong, check_every=4)
    texts = [Rendered(f"row {i} hello world", (Span(0, 15 + len(str(i)), -1, False),)) for i in range(10)]
    assert fast.encode(texts) is None
    assert not fast.trusted
    assert fast.encode(texts[:1]) is None  # and stays off


def test_pipeline_output_is_identical_with_and_without_the_fast_path(tmp_path: Path) -> None:
    if not (LF_DATA / "alpaca_en_demo.json").exists():
        pytest.skip(f"{LF_DATA} not present")
    rows = json.loads((LF_DATA / "alpaca_en_demo.json").read_text())
    (tmp_path / "big.json").write_text(json.dumps(rows * 3))  # above FAST_MIN_ROWS
    (tmp_path / "dataset_info.json").write_text(json.dumps({"big": {"file_name": "big.json"}}))
    tok = _tokenizer("tiny")
    tables = []
    for fast in (True, False):
        opts = DataOptions(
            dataset=("big",),
            dataset_dir=str(tmp_path),
            cutoff_len=256,  # some rows truncated: the re-encoding path runs too
            val_size=0.1,
            cache_dir=str(tmp_path / f"cache-{fast}"),
            show_progress=False,
            fast_tokenizer=fast,
        )
        p = prepare(opts, tok, get_template("chatml"))
        tables.append((p.train.table, p.eval.table, int(p.train_stats.columns["truncated"].sum())))
    assert tables[0][0].equals(tables[1][0]) and tables[0][1].equals(tables[1][1])
    assert tables[0][2] > 0
