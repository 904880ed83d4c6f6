"""load_rows: the bad-row policy (skip + summary, share threshold, all-invalid, strict) over real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.data.formats import RowError
from tunesmith.data.load import BadRowPolicy, LoadReport, hub_offline, load_rows
from tunesmith.data.registry import Columns, DatasetSpec, resolve_dataset
from tunesmith.errors import DataError

GOOD = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
# One row per reason; the comment is the reason and the field the error must name.
BAD = {
    "missing_column": ({"dialogue": []}, "conversations"),
    "bad_role_order": ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
                       "conversations[0]"),
    "empty_response": ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]},
                       "conversations[1]"),
    "bad_type": ({"conversations": {"from": "human"}}, "conversations"),
}  # fmt: skip
SPEC = DatasetSpec(
    "chat", file_name="chat.jsonl", formatting="sharegpt", columns=Columns(messages="conversations")
)


def write(tmp_path: Path, rows: list[dict]) -> Path:
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return tmp_path


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_reason_names_file_line_and_field(tmp_path, reason):
    record, field = BAD[reason]
    d = write(tmp_path, [GOOD, GOOD, record])
    with pytest.raises(RowError) as info:
        list(load_rows(SPEC, dataset_dir=d, policy=BadRowPolicy(mode="fail")))
    err = info.value
    assert err.reason == reason and err.field == field
    assert (
        str(d / "chat.jsonl") + ":3" in str(err) and f"field {field!r}" in str(err) and "expected" in str(err)
    )


def test_skip_keeps_good_rows_and_summarises(tmp_path):
    rows = [GOOD] * 6 + [BAD["bad_role_order"][0], BAD["empty_response"][0], BAD["empty_response"][0]]
    d = write(tmp_path, rows)
    report = LoadReport()
    out = list(load_rows(SPEC, dataset_dir=d, policy=BadRowPolicy(), report=report))
    assert len(out) == 6 == report.valid and report.rows_read == 9
    assert report.invalid == {"bad_role_order": 1, "empty_response": 2} and report.invalid_total == 3
    assert [e.split(" ")[0] for e in report.examples["empty_response"]] == [
        f"{d / 'chat.jsonl'}:8",
        f"{d / 'chat.jsonl'}:9",
    ]
    text = report.summary()
    assert "9 rows read, 6 valid, 3 invalid (33.3%) skipped" in text
    assert text.index("empty_response: 2") < text.index("bad_role_order: 1")  # most frequent first
    assert "chat.jsonl:7" in text and "field 'conversations[0]'" in text


def test_examples_are_capped(tmp_path):
    d = write(tmp_path, [GOOD] * 20 + [BAD["bad_type"][0]] * 10)
    report = LoadReport(max_examples=2)
    assert len(list(load_rows(SPEC, dataset_dir=d, policy=BadRowPolicy(), report=report))) == 20
    assert report.invalid == {"bad_type": 10} and len(report.examples["bad_type"]) == 2


def test_all_invalid_fails_with_the_reasons(tmp_path):
    d = write(tmp_path, [BAD["bad_type"][0], BAD["missing_column"][0]])
    with pytest.raises(DataError) as info:
        list(load_rows(SPEC, dataset_dir=d, policy=BadRowPolicy(max_share=1.0)))
    msg = str(info.value)
    assert "every row is invalid" in msg and "bad_type: 1" in msg and "missing_column: 1" in msg
    assert "chat.jsonl:1" in msg and "chat.jsonl:2" in msg


def test_share_threshold(tmp_path):
    d = write(tmp_path, [GOOD] * 4 + [BAD["bad_type"][0]] * 6)
    with pytest.raises(DataError, match=r"60.0% of rows are invalid, more than the allowed 50%"):
        list(load_rows(SPEC, dataset_dir=d, policy=BadRowPolicy()))
    assert len(list(load_rows(SPEC, dataset_dir=d, policy=BadRowPolicy(max_share=0.6)))) == 4


def test_strict_fails_on_first_bad_row_after_yielding_good_ones(tmp_path):
    d = write(tmp_path, [GOOD, BAD["bad_type"][0], BAD["missing_column"][0]])
    got = []
    with pytest.raises(RowError) as info:
        for row in load_rows(SPEC, dataset_dir=d, policy=BadRowPolicy(mode="fail")):
            got.append(row)
    assert len(got) == 1 and info.value.reason == "bad_type" and "chat.jsonl:2" in str(info.value)


def test_reader_errors_propagate(tmp_path):
    (tmp_path / "chat.jsonl").write_text(json.dumps(GOOD) + "\n{broken\n", encoding="utf-8")
    with pytest.raises(DataError, match="chat.jsonl:2"):
        list(load_rows(SPEC, dataset_dir=tmp_path, policy=BadRowPolicy()))


def test_typed_columns_are_canonicalised(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    table = pa.table(
        {"instruction": ["add", "neg"], "input": ["1 2", None], "output": [3, -1], "score": [0.5, 1.0]}
    )
    pq.write_table(table, tmp_path / "d.parquet")
    spec = resolve_dataset(str(tmp_path / "d.parquet"), tmp_path)
    rows = list(load_rows(spec, dataset_dir=tmp_path, policy=BadRowPolicy(mode="fail")))
    assert rows[0]["messages"] == [
        {"role": "user", "content": "add\n1 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert rows[1]["messages"] == [{"role": "user", "content": "neg"}, {"role": "assistant", "content": "-1"}]
    assert rows[0]["extra"] == {"score": 0.5}


def test_policy_validation_and_hub_offline_env():
    with pytest.raises(ValueError):
        BadRowPolicy(mode="warn")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BadRowPolicy(max_share=1.5)
    assert hub_offline({"HF_HUB_OFFLINE": "1"}) and hub_offline({"HF_DATASETS_OFFLINE": "true"})
    assert not hub_offline({"HF_HUB_OFFLINE": "0"}) and not hub_offline({})
