"""`tunesmith predict`: complete records, resume after kill -9, extras pass through, 2 processes = 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunesmith
from tunesmith.errors import TunesmithError
from tunesmith.infer.predict import predict, sample_ids
from tunesmith.infer.predict_io import PredictionFile

CITIES = ("Paris", "Rome", "Oslo", "Lima")
FIELDS = {"id", "messages", "prompt", "predict", "label", "prompt_tokens", "completion_tokens",
          "finish_reason", "settings", "extra"}  # fmt: skip


def write_questions(path: Path, rows: int) -> Path:
    """The capital task as alpaca rows with two extra columns (qid, meta) and a reference answer."""
    data = [
        {
            "instruction": f"Name the capital city number {i % 4}.",
            "input": "Answer briefly." * (i % 3),
            "output": f"The capital is {CITIES[i % 4]}.",
            "qid": f"q{i}",
            "meta": {"n": i},
        }
        for i in range(rows)
    ]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def config(model: Path, data: Path, out: Path, cache: Path, **over) -> tunesmith.Config:
    keys = {
        "model_name_or_path": str(model), "template": "qwen", "eval_dataset": str(data), "output_dir": str(out),
        "do_sample": False, "max_new_tokens": 16, "per_device_eval_batch_size": 4, "cutoff_len": 64,
        "data_cache_dir": str(cache), "preprocessing_num_workers": 1, **over,
    }  # fmt: skip
    return tunesmith.load_config(None, keys)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_records_are_complete_in_data_order_and_scored(trained_full: Path, tmp_path: Path) -> None:
    data = write_questions(tmp_path / "q.json", 10)
    cfg = config(trained_full, data, tmp_path / "out", tmp_path / "cache")
    summary = predict(cfg, processes=1)
    recs = lines(tmp_path / "out" / "predictions.jsonl")
    assert summary.samples == len(recs) == 10 and summary.finish_reasons == {"stop": 10}
    assert [r["extra"]["qid"] for r in recs] == [f"q{i}" for i in range(10)]  # data order, extras kept
    assert recs[3]["extra"]["meta"] == {"n": 3}
    for i, r in enumerate(recs):
        assert set(r) == FIELDS
        assert r["id"].startswith(str(data)) and r["id"].endswith(f"(record {i})")
        assert r["predict"].startswith("The capital is") and r["finish_reason"] == "stop"
        assert r["label"] == f"The capital is {CITIES[i % 4]}."
        assert r["messages"][-1] == {"role": "user", "content": f"Name the capital city number {i % 4}."
                                     + ("\n" + "Answer briefly." * (i % 3) if i % 3 else "")}  # fmt: skip
        assert r["prompt"].endswith("<|im_start|>assistant\n") and r["prompt_tokens"] > 10
        assert 0 < r["completion_tokens"] < 16
        assert r["settings"] == {"do_sample": False, "max_new_tokens": 16, "repetition_penalty": 1.0,
                                 "stop": [], "n": 1}  # fmt: skip
    assert len({r["id"] for r in recs}) == 10
    meta = json.loads((tmp_path / "out" / "predictions.meta.json").read_text())
    assert meta["identity"]["settings"]["max_new_tokens"] == 16 and meta["summary"]["samples"] == 10
    scores = json.loads((tmp_path / "out" / "predictions.scores.json").read_text())
    assert scores["samples"] == 10 and set(scores) >= {"bleu-4", "rouge-1", "rouge-2", "rouge-l"}
    # the trained model answers its four cities right most of the time
    assert scores["rouge-1"] > 50

    again = predict(cfg, processes=1)  # everything is done: nothing is generated, nothing changes
    assert again.samples == 0 and again.skipped == 10
    assert lines(tmp_path / "out" / "predictions.jsonl") == recs

    with pytest.raises(TunesmithError, match="other settings"):
        predict(config(trained_full, data, tmp_path / "out", tmp_path / "cache", max_new_tokens=8))


def test_two_processes_give_the_same_predictions_as_one(trained_full: Path, tmp_path: Path) -> None:
    data = write_questions(tmp_path / "q.json", 12)
    one = config(trained_full, data, tmp_path / "one", tmp_path / "cache")
    two = config(trained_full, data, tmp_path / "two", tmp_path / "cache", per_device_eval_batch_size=3)
    predict(one, processes=1, score=False)
    summary = predict(two, processes=2, score=False)
    assert summary.samples == 12
    assert json.loads((tmp_path / "two" / "predictions.meta.json").read_text())["processes"] == 2
    a, b = lines(tmp_path / "one" / "predictions.jsonl"), lines(tmp_path / "two" / "predictions.jsonl")
    assert [(r["id"], r["predict"], r["completion_tokens"]) for r in a] == [
        (r["id"], r["predict"], r["completion_tokens"]) for r in b
    ]


def test_kill_9_halfway_then_rerun_has_every_id_once(trained_full: Path, tmp_path: Path) -> None:
    rows = 300
    data = write_questions(tmp_path / "q.json", rows)
    out = tmp_path / "out"
    keys = {"model_name_or_path": trained_full, "template": "qwen", "eval_dataset": data, "output_dir": out,
            "do_sample": False, "max_new_tokens": 16, "per_device_eval_batch_size": 1, "cutoff_len": 64,
            "data_cache_dir": tmp_path / "cache", "preprocessing_num_workers": 1}  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "tunesmith.cli",
        "predict",
        *[f"{k}={v}" for k, v in keys.items()],
        "--no-score",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pred = out / "predictions.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if pred.exists() and pred.read_bytes().count(b"\n") >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = pred.read_bytes()
    done = written.count(b"\n")
    assert 5 <= done < rows
    # a kill inside a write leaves a partial line: simulate one, the rerun must cut it off
    with open(pred, "ab") as f:
        f.write(b'{"id": "torn", "predict": "The cap')
    summary = predict(
        config(trained_full, data, out, tmp_path / "cache", per_device_eval_batch_size=16), score=False
    )
    assert summary.skipped == done and summary.samples == rows - done
    recs = lines(pred)  # every line parses
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)) == rows and "torn" not in ids
    assert all(r["finish_reason"] == "stop" and r["predict"].startswith("The capital is") for r in recs)


def test_do_predict_after_training_predicts_with_the_trained_model(
    tiny_model_dir: Path, capital_data: Path, tmp_path: Path
) -> None:
    from tests.training.helpers import run_config

    out = tmp_path / "run"
    keys = run_config(tiny_model_dir, capital_data, out, max_steps=2, do_predict=True, eval_dataset=str(capital_data),
                      max_new_tokens=4, do_sample=False, data_cache_dir=str(tmp_path / "cache"))  # fmt: skip
    tunesmith.run(tunesmith.load_config(None, keys))
    recs = lines(out / "predictions.jsonl")
    assert len(recs) == 16 and all(r["completion_tokens"] <= 4 for r in recs)
    meta = json.loads((out / "predictions.meta.json").read_text())
    assert meta["identity"]["adapters"] == [str(out)]  # the LoRA adapter training just saved
    assert (out / "predictions.scores.json").exists()


def test_torn_last_line_is_cut_and_ids_repeat_with_a_suffix(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "pre')
    f = PredictionFile.open(path)
    assert f.done == {"a", "b"} and f.torn_bytes == len(b'{"id": "c", "pre')
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    f.append(b'{"id": "c"}\n')
    f.reorder(["c", "a", "b"])
    assert path.read_bytes() == b'{"id": "c"}\n{"id": "a"}\n{"id": "b"}\n'
    assert sample_ids(["f:1", "f:2", "f:1", "f:1"]) == ["f:1", "f:2", "f:1#2", "f:1#3"]
