"""registry: dataset_info.json parsed strictly, plain paths detected, unsupported sources rejected clearly."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tunesmith.data.load import BadRowPolicy, LoadReport, load_rows
from tunesmith.data.registry import Columns, load_dataset_info, resolve_dataset
from tunesmith.errors import ConfigError, DataError

LF_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "compat" / "llamafactory-data"


@pytest.fixture(scope="module")
def lf_dir() -> Path:
    if not (LF_DATA / "dataset_info.json").is_file():
        pytest.skip(f"{LF_DATA} not present")
    return LF_DATA.resolve()


def write_info(tmp_path: Path, info: dict) -> Path:
    (tmp_path / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return tmp_path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# -- the real LLaMA-Factory registry ------------------------------------------------------------------


def test_real_dataset_info_parses_with_llamafactory_defaults(lf_dir):
    specs = load_dataset_info(lf_dir)
    assert len(specs) > 100
    assert specs["identity"].columns == Columns(prompt="instruction", query="input", response="output")
    assert specs["glaive_toolcall_en_demo"].columns == Columns(messages="conversations", tools="tools")
    assert specs["glaive_toolcall_en_demo"].tags.role_tag == "from"
    assert specs["kto_en_demo"].kind == "kto" and specs["kto_en_demo"].tags.user_tag == "user"
    assert specs["dpo_en_demo"].kind == "ranking"
    assert specs["wiki_demo"].kind == "text" and specs["c4_demo"].kind == "text"
    assert specs["openorca"].columns.query is None  # explicit columns replace all defaults
    assert specs["adgen_eval"].split == "validation" and specs["starcoder_python"].folder == "python"


def test_every_text_demo_dataset_loads_fully(lf_dir):
    expected_kinds = {"identity": "sft", "glaive_toolcall_en_demo": "sft", "dpo_en_demo": "ranking",
                      "kto_en_demo": "kto", "wiki_demo": "text", "c4_demo": "text"}  # fmt: skip
    loaded = 0
    for name, entry in load_dataset_info(lf_dir).items():
        if entry.file_name is None or name.startswith("mllm_"):
            continue
        spec = resolve_dataset(name, lf_dir)
        report = LoadReport()
        rows = list(load_rows(spec, dataset_dir=lf_dir, policy=BadRowPolicy(mode="fail"), report=report))
        assert len(rows) == report.rows_read == report.valid > 0 and not report.invalid, name
        assert spec.kind == expected_kinds.get(name, spec.kind)
        if spec.kind == "text":
            assert all(r["text"] for r in rows)
        else:
            assert all(r["messages"] and r["source"].startswith(str(lf_dir)) for r in rows)
        loaded += 1
    assert loaded >= 10  # identity, alpaca x2, glaive x2, dpo x2, kto, wiki, c4


@pytest.mark.parametrize("name", ["mllm_demo", "mllm_audio_demo", "mllm_video_demo", "mllm_video_audio_demo"])
def test_multimodal_entries_fail_clearly(lf_dir, name):
    with pytest.raises(
        DataError, match=r"multimodal datasets are not supported yet \(column '(images|videos|audios)'\)"
    ):
        resolve_dataset(name, lf_dir)


def test_unknown_name_lists_close_matches_and_info_path(lf_dir):
    with pytest.raises(DataError) as info:
        resolve_dataset("alpaca_en_dem", lf_dir)
    msg = str(info.value)
    assert "alpaca_en_demo" in msg and str(lf_dir / "dataset_info.json") in msg


def test_ms_hub_only_and_offline_hub(lf_dir, monkeypatch):
    with pytest.raises(
        DataError, match="ms_hub_url datasets are not supported.*use hf_hub_url or a local file"
    ):
        resolve_dataset("deepctrl", lf_dir)
    spec = resolve_dataset("alpaca_en", lf_dir)
    assert spec.hf_hub_url == "llamafactory/alpaca_en" and spec.local_path(lf_dir) is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("datasets")
    with pytest.raises(DataError, match="hub is offline.*local file"):
        next(load_rows(spec, dataset_dir=lf_dir, policy=BadRowPolicy()))


def test_hub_without_datasets_names_the_extra(lf_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # makes `import datasets` fail
    spec = resolve_dataset("alpaca_en", lf_dir)
    with pytest.raises(DataError, match=r"tunesmith\[hub\]"):
        next(load_rows(spec, dataset_dir=lf_dir, policy=BadRowPolicy()))


def test_reason_tool_use_detected_as_openai(lf_dir):
    spec = resolve_dataset(str(lf_dir / "reason_tool_use_demo_50.jsonl"), lf_dir)
    assert spec.formatting == "openai" and spec.columns.tools == "tools"
    rows = list(load_rows(spec, dataset_dir=lf_dir, policy=BadRowPolicy(mode="fail")))
    assert len(rows) == 50
    calls = [m for r in rows for m in r["messages"] if m.get("tool_calls")]
    assert calls and all(isinstance(c["tool_calls"][0]["arguments"], dict) for c in calls)
    assert all(m.get("reasoning") for r in rows for m in r["messages"] if m["role"] == "assistant")


# -- strict parsing -----------------------------------------------------------------------------------


def test_unknown_keys_are_all_reported_with_suggestions(tmp_path):
    write_info(tmp_path, {
        "a": {"file_nme": "a.json"},
        "b": {"file_name": "b.json", "columns": {"promt": "q"}, "tags": {"role": "r"}},
        "c": {"file_name": "c.json", "formatting": "chatml", "ranking": "yes"},
    })  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_dataset_info(tmp_path)
    msg = str(info.value)
    assert "a.file_nme: unknown key" in msg and "did you mean 'file_name'" in msg
    assert "b.columns.promt" in msg and "'prompt'" in msg
    assert "b.tags.role" in msg and "'role_tag'" in msg
    assert "c.formatting" in msg and "c.ranking" in msg
    assert len(info.value.problems) == 5  # file_nme, promt, role, formatting, ranking (no "no source" noise)
    assert str(tmp_path / "dataset_info.json") in msg


def test_bad_json_names_the_line(tmp_path):
    (tmp_path / "dataset_info.json").write_text('{\n  "a": {"file_name": "x.json",}\n}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset_info.json:2: not valid JSON"):
        load_dataset_info(tmp_path)


def test_missing_file_and_unsupported_sources(tmp_path):
    write_info(tmp_path, {"gone": {"file_name": "gone.json"}, "s": {"script_url": "x"},
                          "cloud": {"cloud_file_name": "s3://b/k.json"}})  # fmt: skip
    with pytest.raises(DataError, match=r"\[gone\].*data file not found"):
        resolve_dataset("gone", tmp_path)
    with pytest.raises(DataError, match="script_url datasets are not supported"):
        resolve_dataset("s", tmp_path)
    with pytest.raises(DataError, match="cloud_file_name datasets are not supported"):
        resolve_dataset("cloud", tmp_path)


def test_file_sha1_is_verified(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "q", "output": "a"}])
    good = hashlib.sha1(data.read_bytes()).hexdigest()
    write_info(tmp_path, {"ok": {"file_name": "d.jsonl", "file_sha1": good},
                          "bad": {"file_name": "d.jsonl", "file_sha1": "0" * 40}})  # fmt: skip
    assert (
        len(list(load_rows(resolve_dataset("ok", tmp_path), dataset_dir=tmp_path, policy=BadRowPolicy())))
        == 1
    )
    with pytest.raises(DataError) as info:
        list(load_rows(resolve_dataset("bad", tmp_path), dataset_dir=tmp_path, policy=BadRowPolicy()))
    assert good in str(info.value) and "0" * 40 in str(info.value)


# -- plain paths --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("record", "formatting", "kind", "columns"),
    [
        ({"instruction": "q", "input": "", "output": "a", "system": "s"}, "alpaca", "sft",
         Columns(prompt="instruction", query="input", response="output", system="system")),
        ({"conversations": [{"from": "human", "value": "q"}], "tools": "[]"}, "sharegpt", "sft",
         Columns(messages="conversations", tools="tools")),
        ({"messages": [{"role": "user", "content": "q"}]}, "openai", "sft", Columns(messages="messages")),
        ({"text": "plain"}, "alpaca", "text", Columns(prompt="text")),
        ({"conversations": [{"from": "human", "value": "q"}], "chosen": {}, "rejected": {}}, "sharegpt", "ranking",
         Columns(messages="conversations", chosen="chosen", rejected="rejected")),
        ({"prompt": "q", "chosen": "y", "rejected": "n"}, "alpaca", "ranking",
         Columns(prompt="prompt", chosen="chosen", rejected="rejected")),
        ({"messages": [{"role": "user", "content": "q"}], "label": True}, "openai", "kto",
         Columns(messages="messages", kto_tag="label")),
    ],
)  # fmt: skip
def test_plain_path_format_detection(tmp_path, record, formatting, kind, columns):
    path = write_jsonl(tmp_path / "d.jsonl", [record])
    spec = resolve_dataset(str(path), tmp_path / "no-registry")
    assert (spec.formatting, spec.kind, spec.columns) == (formatting, kind, columns)
    assert spec.local_path("/elsewhere") == path.resolve()  # absolute: dataset_dir does not matter


def test_plain_path_relative_to_dataset_dir_and_folder(tmp_path):
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts" / "a.jsonl", [{"instruction": "q1", "output": "a1"}])
    write_jsonl(tmp_path / "parts" / "b.jsonl", [{"instruction": "q2", "output": "a2"}])
    spec = resolve_dataset("parts", tmp_path)
    rows = list(load_rows(spec, dataset_dir=tmp_path, policy=BadRowPolicy(mode="fail")))
    assert [r["messages"][0]["content"] for r in rows] == ["q1", "q2"]


def test_plain_path_undetectable_or_multimodal(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        DataError, match=r"cannot detect the dataset format from keys \['answer', 'question'\]"
    ):
        resolve_dataset(str(path), tmp_path)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [], "images": ["x.png"]}])
    with pytest.raises(DataError, match=r"multimodal datasets are not supported yet \(column 'images'\)"):
        resolve_dataset(str(path), tmp_path)
