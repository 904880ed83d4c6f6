"""Streaming readers: every format round-trips with exact Locations; every bad input names file and line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith.data import readers_json
from tunesmith.data.readers import ReadStats, detect_file_format, iter_records, list_data_files
from tunesmith.errors import DataError, Location

ROWS = [
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "多语言 {braces} [brackets]", "input": 'quote " and \\ slash', "output": "42"},
    {"instruction": "numbers", "input": "", "output": "x", "n": 12345, "f": -1.5e3, "ok": True, "none": None},
]
SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "compat" / "llamafactory-data"


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return p


def pretty_array(rows: list[dict]) -> tuple[str, list[int]]:
    """A json.dump(indent=2)-style array and the 1-based line each record starts on."""
    parts, lines, line = ["[\n"], [], 2
    for i, row in enumerate(rows):
        body = json.dumps(row, indent=2, ensure_ascii=False)
        lines.append(line)
        parts.append(body + (",\n" if i < len(rows) - 1 else "\n"))
        line += body.count("\n") + 1
    parts.append("]\n")
    return "".join(parts), lines


def read(path: Path, **kw: object) -> list:
    return list(iter_records(path, **kw))


def error(path: Path, **kw: object) -> str:
    with pytest.raises(DataError) as e:
        read(path, **kw)
    return str(e.value)


# --- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 1, 7, 64])
def test_json_array_streams_with_start_lines(tmp_path, monkeypatch, chunk):
    if chunk:  # tiny windows put every value, number, escape and multi-byte char across a boundary
        monkeypatch.setattr(readers_json, "CHUNK_BYTES", chunk)
    rng = random.Random(0)
    rows = [dict(ROWS[i % 3], k=i, pad="é" * rng.randint(0, 30)) for i in range(40)]
    text, lines = pretty_array(rows)
    p = write(tmp_path, "a.json", "\ufeff" + text)
    recs = read(p)
    assert [r.data for r in recs] == rows
    assert [r.where for r in recs] == [Location(str(p), line, i) for i, line in enumerate(lines)]


def test_json_compact_array_and_wrapper_object(tmp_path):
    p = write(tmp_path, "c.json", json.dumps(ROWS))
    assert [r.data for r in read(p)] == ROWS and detect_file_format(p) == "json"
    w = write(tmp_path, "w.json", '{\n  "data": [\n' + ",\n".join(json.dumps(r) for r in ROWS) + "\n  ]\n}\n")
    recs = read(w)
    assert [r.data for r in recs] == ROWS
    assert [r.where.line for r in recs] == [3, 4, 5]


def test_jsonl_and_json_named_jsonl(tmp_path):
    body = json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\r\n" + json.dumps(ROWS[2])
    for name in ("a.jsonl", "b.json"):
        p = write(tmp_path, name, "\ufeff" + body)
        assert detect_file_format(p) == "jsonl"
        recs = read(p)
        assert [r.data for r in recs] == ROWS
        assert [r.where for r in recs] == [Location(str(p), line, i) for i, line in enumerate([1, 3, 4])]


def test_csv_header_multiline_field_and_bom(tmp_path):
    p = write(tmp_path, "a.csv", '\ufeffinstruction,output\nhi,"two\nlines"\n\n"a, b",c\n')
    recs = read(p)
    assert [r.data for r in recs] == [
        {"instruction": "hi", "output": "two\nlines"},
        {"instruction": "a, b", "output": "c"},
    ]
    assert [(r.where.line, r.where.index) for r in recs] == [(2, 0), (5, 1)]


def test_txt_non_empty_lines(tmp_path):
    p = write(tmp_path, "a.txt", "\ufefffirst line\n\n   \nsecond  line  \r\nthird")
    recs = read(p)
    assert [r.data for r in recs] == [{"text": "first line"}, {"text": "second  line  "}, {"text": "third"}]
    assert [r.where.line for r in recs] == [1, 4, 5]


def test_parquet_and_arrow_file_and_stream(tmp_path):
    table = pa.Table.from_pylist([{"instruction": f"q{i}", "output": f"a{i}", "n": i} for i in range(2500)])
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=700)
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table, max_chunksize=900)
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table, max_chunksize=900)
    for name in ("a.parquet", "f.arrow", "s.arrow"):
        recs = read(tmp_path / name)
        assert [r.data for r in recs] == table.to_pylist(), name
        assert recs[-1].where == Location(str(tmp_path / name), None, 2499)


def test_folder_reads_data_files_in_order(tmp_path):
    d = tmp_path / "ds"
    (d / "sub").mkdir(parents=True)
    write(d, "b.jsonl", json.dumps(ROWS[1]) + "\n")
    write(d, "a.json", json.dumps([ROWS[0]]))
    write(d / "sub", "c.jsonl", json.dumps(ROWS[2]) + "\n")
    write(d, "dataset_info.json", '{"x": {"file_name": "a.json"}}')  # metadata, not data
    write(d, ".hidden.jsonl", "not json\n")
    write(d, "README.md", "# about")
    assert list_data_files(d) == [d / "a.json", d / "b.jsonl", d / "sub" / "c.jsonl"]
    assert detect_file_format(d) == "json"
    recs = read(d)
    assert [r.data for r in recs] == ROWS
    assert [Path(r.where.file).name for r in recs] == ["a.json", "b.jsonl", "c.jsonl"]
    assert list_data_files(d / "a.json") == [d / "a.json"]


def test_progress_bar_summary_and_stats(tmp_path, capfd):
    p = write(tmp_path, "a.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS * 100))
    stats = ReadStats()
    assert len(read(p, show_progress=True, stats=stats)) == 300
    err = capfd.readouterr().err
    assert "a.jsonl: 100%" in err and "300 rows, " in err and "rows/s]" in err  # the tqdm bar's postfix
    assert err.strip().splitlines()[-1].startswith(f"read 300 rows from {p} in ")
    assert err.strip().endswith(" rows/s)")
    assert stats.rows == 300 and stats.bytes == p.stat().st_size and stats.seconds > 0
    assert stats.rows_per_s == pytest.approx(300 / stats.seconds)
    read(p)
    assert capfd.readouterr().err == ""
    early = ReadStats()
    records = iter_records(p, stats=early)
    next(records)
    records.close()  # a consumer that stops early still gets its stats
    assert early.rows == 1


@pytest.mark.skipif(not SHARED.is_dir(), reason="shared LLaMA-Factory demo data not present")
def test_llamafactory_demo_files_read():
    files = [p for p in sorted(SHARED.iterdir()) if p.name != "dataset_info.json"]
    for p in files:
        recs = read(p)
        assert recs and all(isinstance(r.data, dict) for r in recs), p.name
    alpaca = read(SHARED / "alpaca_en_demo.json")
    assert {"instruction", "input", "output"} <= set(alpaca[0].data)
    assert alpaca[1].where.line is not None and alpaca[1].where.line > 1


# --- bad inputs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [None, 5])
@pytest.mark.parametrize(
    ("body", "line", "phrase"),
    [
        ('[\n{"a": 1},\n{"b": 2}\n', 3, "array is not closed"),
        ('[\n{"a": 1},\n{"b": 2},\n', 3, "array is not closed"),
        ('[\n{"a": 1},\n{"b": "cut', 3, "ends inside record 1"),  # object cut off
        ('[\n{"a": 1},\n{"b": [1, 2', 3, "ends inside record 1"),
        ('[\n{"a": 1},\n{"b": 2 "c": 3}\n]', 3, "Expecting ',' delimiter"),  # syntax error mid-file
        ('[\n{"a": 1},\n2\n]', 3, "record 1 is a number"),  # not an object
        ('[\n{"a": 1},\n["x"]\n]', 3, "record 1 is an array"),
        ('[{"a": 1},\n]', 2, "trailing comma"),
        ('[{"a": 1}]\n[{"b": 2}]', 2, "unexpected content after"),
        ('{\n"version": 1,\n"data": []\n}', 1, "not a list of records"),
        ('"just a string"', 1, "expected a JSON array"),
    ],
)
def test_json_errors_name_file_line_and_problem(tmp_path, monkeypatch, chunk, body, line, phrase):
    if chunk:
        monkeypatch.setattr(readers_json, "CHUNK_BYTES", chunk)
    msg = error(write(tmp_path, "bad.json", body))
    assert f"bad.json:{line}" in msg and phrase in msg


def test_jsonl_invalid_line_carries_line_number(tmp_path):
    p = write(tmp_path, "bad.jsonl", '{"a": 1}\n\n{"a": 2}\n{"a": 3,,}\n{"a": 4}\n')
    with pytest.raises(DataError) as e:
        read(p)
    assert e.value.where == Location(str(p), 4, 2)
    assert "invalid JSON on this line" in str(e.value) and "bad.jsonl:4" in str(e.value)
    cut = error(write(tmp_path, "cut.jsonl", '{"a": 1}\n{"a": "tru'))
    assert "cut.jsonl:2" in cut and "cut off" in cut
    obj = error(write(tmp_path, "num.jsonl", '{"a": 1}\n[1, 2]\n'))
    assert "num.jsonl:2 (record 1)" in obj and "is an array" in obj


@pytest.mark.parametrize("body", ["", "  \n\t\n", "[]", " [ ] \n", "\ufeff"])
def test_empty_json_files(tmp_path, body):
    for name in ("e.json", "e.jsonl"):
        msg = error(write(tmp_path, name, body))
        assert name in msg and "contains no records" in msg


def test_empty_other_formats(tmp_path):
    assert "contains no records" in error(write(tmp_path, "e.csv", "a,b\n"))
    assert "contains no records" in error(write(tmp_path, "e.txt", "\n \n"))
    assert "contains no records" in error(write(tmp_path, "h.csv", ""))


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("g.jsonl", b'{"a": "ok"}\n{"a": "'),
        ("g.json", b'[{"a": "ok"},\n{"a": "'),
        ("g.txt", b"ok\n"),
        ("g.csv", b"a\n"),
    ],
)
def test_non_utf8_names_line_offset_and_fix(tmp_path, name, head):
    gbk = "中文".encode("gbk")
    p = write(tmp_path, name, head + gbk + b'"}\n')
    msg = error(p)
    assert f"{name}:2" in msg and "not valid UTF-8" in msg and "iconv -f gbk -t utf-8" in msg
    assert f"byte offset {len(head)}" in msg


def test_csv_ragged_row(tmp_path):
    msg = error(write(tmp_path, "r.csv", "instruction,output\na,b\nc,d,e\n"))
    assert "r.csv:3 (record 1)" in msg and "3 field(s) but the header has 2" in msg


def test_folder_and_path_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty", "notes.md", "hi")
    assert "empty" in error(tmp_path / "empty") and "no data files" in error(tmp_path / "empty")
    (tmp_path / "mixed").mkdir()
    write(tmp_path / "mixed", "a.jsonl", '{"a": 1}\n')
    write(tmp_path / "mixed", "b.csv", "a\n1\n")
    assert "mixes data files of different kinds: .csv, .jsonl" in error(tmp_path / "mixed")
    msg = error(write(tmp_path, "data.xlsx", "x"))
    assert "data.xlsx" in msg and "'.xlsx'" in msg and ".jsonl" in msg and ".parquet" in msg
    assert "no such file or folder" in error(tmp_path / "missing.json")
    assert "unknown file format 'yaml'" in error(write(tmp_path, "a.json", "[]"), file_format="yaml")
    assert "not a readable Parquet file" in error(write(tmp_path, "x.parquet", "nope"))
    assert "not a readable Arrow" in error(write(tmp_path, "x.arrow", "nope"))
