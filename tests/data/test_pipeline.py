"""The data pipeline: cache keyed by exactly what affects tokens, workers, splits, mixing."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from transformers import AutoTokenizer

from tunesmith.data.pipeline import DataOptions, prepare
from tunesmith.data.templates import resolve_template
from tunesmith.errors import DataError
from tunesmith.tiny import tiny_tokenizer_dir


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


@pytest.fixture
def data_dir(tmp_path):
    rows = [
        {"instruction": f"question {i}", "input": "", "output": f"answer {i} " * (1 + i % 7)}
        for i in range(600)
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    other = [{"instruction": f"other {i}", "output": f"reply {i}"} for i in range(60)]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in other) + "\n")
    (tmp_path / "dataset_info.json").write_text(
        json.dumps({"a": {"file_name": "a.json"}, "b": {"file_name": "b.jsonl"}})
    )
    return tmp_path


def opts(data_dir, tmp_path, **kw) -> DataOptions:
    base = DataOptions(
        dataset=("a",),
        dataset_dir=str(data_dir),
        cutoff_len=64,
        cache_dir=str(tmp_path / "cache"),
        show_progress=False,
        chunk_rows=100,
    )
    return replace(base, **kw)


def rows(ds) -> list[tuple]:
    return [(tuple(ds[i]["input_ids"]), tuple(ds[i]["labels"])) for i in range(len(ds))]


def test_second_run_reuses_cache_and_changes_miss(tok, data_dir, tmp_path):
    qwen = resolve_template("qwen", tok)
    first = prepare(opts(data_dir, tmp_path), tok, qwen)
    assert not first.reused and len(first.train) == 600
    again = prepare(opts(data_dir, tmp_path), tok, qwen)
    assert again.reused and again.key == first.key and rows(again.train) == rows(first.train)
    # Everything that affects tokens changes the key ...
    assert prepare(opts(data_dir, tmp_path, cutoff_len=32), tok, qwen).key != first.key
    assert prepare(opts(data_dir, tmp_path), tok, resolve_template("chatml", tok)).key != first.key
    assert prepare(opts(data_dir, tmp_path, train_on_prompt=True), tok, qwen).key != first.key
    # ... and what does not, does not: the worker count and progress display.
    assert prepare(opts(data_dir, tmp_path, num_workers=2, show_progress=True), tok, qwen).key == first.key
    # The data content is part of the key.
    data = json.loads((data_dir / "a.json").read_text())
    data[0]["output"] = "changed"
    (data_dir / "a.json").write_text(json.dumps(data))
    changed = prepare(opts(data_dir, tmp_path), tok, qwen)
    assert changed.key != first.key and not changed.reused


def test_workers_give_identical_results(tok, data_dir, tmp_path):
    qwen = resolve_template("qwen", tok)
    one = prepare(opts(data_dir, tmp_path, overwrite_cache=True), tok, qwen)
    two = prepare(opts(data_dir, tmp_path, overwrite_cache=True, num_workers=2), tok, qwen)
    assert rows(one.train) == rows(two.train)
    assert len(two.train.parts) > 1  # really chunked across workers


def test_val_split_and_separate_eval_dataset(tok, data_dir, tmp_path):
    qwen = resolve_template("qwen", tok)
    split = prepare(opts(data_dir, tmp_path, val_size=0.1), tok, qwen)
    assert len(split.train) == 540 and len(split.eval) == 60
    assert not set(rows(split.train)) & set(rows(split.eval))
    sep = prepare(opts(data_dir, tmp_path, eval_dataset=("b",)), tok, qwen)
    assert len(sep.train) == 600 and len(sep.eval) == 60
    with pytest.raises(DataError, match="val_size and eval_dataset"):
        prepare(opts(data_dir, tmp_path, eval_dataset=("b",), val_size=0.1), tok, qwen)


def test_mixing_and_max_samples(tok, data_dir, tmp_path):
    qwen = resolve_template("qwen", tok)
    concat = prepare(opts(data_dir, tmp_path, dataset=("a", "b"), max_samples=100), tok, qwen)
    assert len(concat.train) == 160  # 100 of a, all 60 of b
    under = prepare(
        opts(
            data_dir,
            tmp_path,
            dataset=("a", "b"),
            mix_strategy="interleave_under",
            interleave_probs=(0.5, 0.5),
        ),
        tok,
        qwen,
    )
    assert 60 <= len(under.train) < 660  # stops when the small dataset runs out
    over = prepare(opts(data_dir, tmp_path, dataset=("a", "b"), mix_strategy="interleave_over"), tok, qwen)
    assert len(over.train) == 1200  # both exhausted: the small one oversampled


def test_stats_report_lengths_and_truncation(tok, data_dir, tmp_path):
    p = prepare(opts(data_dir, tmp_path, cutoff_len=16), tok, resolve_template("qwen", tok))
    st = p.train_stats
    assert st.rows_in == 600
    assert int(st.columns["truncated"].sum()) > 0
    pct = st.percentiles("total_tokens")
    assert set(pct) == {"p50", "p90", "p99", "max"} and pct["p50"] <= pct["max"]
    assert max(len(p.train[i]["input_ids"]) for i in range(len(p.train))) <= 16
