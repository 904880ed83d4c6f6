"""Run history readers on run folders written the way training writes them, finished and mid-write."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import yaml

from tunesmith.webui.runs import LOG_FILE, compare, curves, list_runs, read_log, run_config


def _log(path: Path, records: list[dict[str, Any]], tail: str = "") -> None:
    path.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (path / LOG_FILE).write_text(lines + tail, encoding="utf-8")


def _record(step: int, **metrics: Any) -> dict[str, Any]:
    """A trainer_log.jsonl record as tunesmith.train_log writes it (fixed fields, then logged keys)."""
    return {
        "step": step, "total_steps": 10, "epoch": step / 10, "loss": None, "eval_loss": None, "lr": 1e-3,
        "grad_norm": 0.5, "tokens_seen": 100 * step, "tokens_per_s": 50.0, "elapsed_s": step * 1.0,
        "remaining_s": 10.0 - step, "percent": 10.0 * step, "peak_mem_gib": 0.5,
    } | metrics  # fmt: skip


def _manifest(
    path: Path, status: str, start: str, config: dict[str, Any], metrics: dict | None = None
) -> None:
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"status": status, "start_time": start, "end_time": None, "config": config,
                "final_metrics": metrics or {}}  # fmt: skip
    (path / "run.json").write_text(json.dumps(manifest), encoding="utf-8")


def _resolved(path: Path, config: dict[str, Any]) -> None:
    header = "# Resolved tunesmith config (from x.yaml); every key shown with its value.\n"
    (path / "tunesmith_config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False))


def test_log_file_name_is_the_one_training_writes() -> None:
    # Read, not imported: tunesmith.train_log imports torch (seconds), which is why runs.py copies it.
    source = Path(importlib.util.find_spec("tunesmith.train_log").origin).read_text(encoding="utf-8")
    assert f'\nLOG_FILE = "{LOG_FILE}"\n' in source


def test_read_log_is_incremental_and_leaves_a_half_written_line(tmp_path: Path) -> None:
    path = tmp_path / LOG_FILE
    path.write_text('{"step": 1}\nnot json\n[1, 2]\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    records, offset = read_log(path)
    assert records == [{"step": 1}, {"step": 2}]
    with path.open("a", encoding="utf-8") as f:
        f.write('ss": 1.5}\n{"step": 4}\n')
    more, offset = read_log(path, offset)
    assert more == [{"step": 3, "loss": 1.5}, {"step": 4}]
    assert read_log(path, offset) == ([], offset) == ([], path.stat().st_size)
    assert read_log(tmp_path / "missing.jsonl", 7) == ([], 7)


def test_list_runs_status_metrics_and_order(tmp_path: Path) -> None:
    config = {"stage": "dpo", "model_name_or_path": "tiny", "finetuning_type": "lora", "dataset": ["a", "b"]}
    done = tmp_path / "sweep" / "done"
    _manifest(done, "completed", "2026-01-02T00:00:00+00:00", config, {"train_loss": 0.5, "epoch": 1.0})
    _resolved(done, config)
    _log(done, [_record(1, loss=1.0), _record(2, loss=0.8)])
    running = tmp_path / "running"
    _manifest(running, "running", "2026-01-03T00:00:00+00:00", config | {"stage": "sft"})
    _log(running, [_record(1, loss=2.0), _record(2, loss=1.5)], tail='{"step": 3, "loss": 1.')
    stopped = tmp_path / "stopped"
    _manifest(stopped, "interrupted", "2026-01-01T00:00:00+00:00", config)
    (stopped / "all_results.json").write_text(json.dumps({"eval_loss": 0.7, "note": "text"}))
    foreign = tmp_path / "no_manifest"  # a log without run.json: listed, status unknown
    _log(foreign, [_record(5, loss=3.0)])
    torn = tmp_path / "torn"
    torn.mkdir()
    (torn / "run.json").write_text('{"status": "comp')
    (tmp_path / "not_a_run").mkdir()

    runs = {r.name: r for r in list_runs(tmp_path)}
    assert set(runs) == {"sweep/done", "running", "stopped", "no_manifest", "torn"}
    order = [r.name for r in list_runs(tmp_path)]
    # run.json's start time orders runs; the two without one started when their files were written (now)
    assert order[:2] in (["torn", "no_manifest"], ["no_manifest", "torn"])
    assert order[2:] == ["running", "sweep/done", "stopped"]
    d = runs["sweep/done"]
    assert (d.status, d.stage, d.model, d.method, d.dataset) == ("completed", "dpo", "tiny", "lora", "a,b")
    assert (d.step, d.total_steps, d.started) == (2, 10, "2026-01-02T00:00:00+00:00")
    assert d.metrics == {"train_loss": 0.5, "epoch": 1.0}
    r = runs["running"]
    assert (r.status, r.stage, r.step) == ("running", "sft", 2)
    assert r.metrics["loss"] == 1.5  # no final metrics yet: the last logged ones
    assert runs["stopped"].status == "interrupted" and runs["stopped"].metrics == {"eval_loss": 0.7}
    assert runs["no_manifest"].status == "unknown" and runs["no_manifest"].step == 5
    assert runs["torn"].status == "unknown" and runs["torn"].metrics == {}
    assert list_runs(tmp_path / "absent") == []


def test_curves_every_metric_loss_first_resumed_steps_replaced(tmp_path: Path) -> None:
    records = [
        _record(1, loss=1.0, **{"rewards/chosen": 0.1, "rewards/margins": 0.2}),
        _record(2, loss=0.9, **{"rewards/chosen": 0.2, "rewards/margins": 0.3}),
        _record(
            2, eval_loss=0.95, eval_runtime=1.2, eval_samples_per_second=9.0, **{"eval_rewards/chosen": 1}
        ),
        _record(3, loss=0.85, **{"rewards/chosen": 0.3, "rewards/margins": 0.4}),
        _record(2, loss=0.7),  # resumed from a checkpoint at step 1: step 2 logged again
        _record(3, train_runtime=3.0, train_loss=0.8, train_samples_per_second=5.0),  # the end summary
    ]
    _log(tmp_path, records, tail='{"step": 4, "loss": 0.')
    got = curves(tmp_path)
    assert list(got) == [
        "loss", "eval_loss", "rewards/chosen", "rewards/margins", "eval_rewards/chosen",
        "lr", "grad_norm", "tokens_per_s",
    ]  # fmt: skip
    assert got["loss"] == [(1, 1.0), (2, 0.7), (3, 0.85)]
    assert got["eval_loss"] == [(2, 0.95)]
    assert got["rewards/margins"] == [(1, 0.2), (2, 0.3), (3, 0.4)]
    assert curves(tmp_path / "absent") == {}


def test_run_config_prefers_the_resolved_yaml(tmp_path: Path) -> None:
    _manifest(tmp_path, "running", "2026-01-01T00:00:00+00:00", {"lora_rank": 4})
    assert run_config(tmp_path) == {"lora_rank": 4}
    _resolved(tmp_path, {"lora_rank": 8, "dataset": ["x"]})
    assert run_config(tmp_path) == {"lora_rank": 8, "dataset": ["x"]}
    assert run_config(tmp_path / "absent") == {}


def test_compare_lists_only_differing_keys_and_overlays_curves(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    base = {"stage": "sft", "learning_rate": 1e-4, "lora_rank": 8, "output_dir": str(a)}
    _manifest(a, "completed", "2026-01-01T00:00:00+00:00", base)
    _resolved(a, base)
    _log(a, [_record(1, loss=1.0), _record(2, loss=0.5, eval_loss=0.6)])
    other = base | {"learning_rate": 2e-4, "output_dir": str(b), "seed": 7}
    del other["lora_rank"]
    _manifest(b, "failed", "2026-01-02T00:00:00+00:00", other)
    _log(b, [_record(1, loss=1.1)])
    c = compare(a, b, tmp_path)
    assert (c.a.name, c.b.name, c.b.status) == ("a", "b", "failed")
    assert c.differing == [
        ("learning_rate", 1e-4, 2e-4),
        ("lora_rank", 8, None),
        ("output_dir", str(a), str(b)),
        ("seed", None, 7),
    ]
    assert c.curves["loss"] == {"a": [(1, 1.0), (2, 0.5)], "b": [(1, 1.1)]}
    assert c.curves["eval_loss"] == {"a": [(2, 0.6)]}
    assert list(c.curves)[:2] == ["loss", "eval_loss"]
