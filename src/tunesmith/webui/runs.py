"""Run history for the web UI: every training run under a root, its status, metrics, curves, comparisons.

A run folder is one that holds ``run.json`` (written by ``tunesmith.runs`` when training starts, with
status "running", and rewritten when it ends) or ``trainer_log.jsonl`` (``tunesmith.train_log``). Every
reader here tolerates a run that is still being written: a half-written last JSONL line is left for
the next read, unreadable files count as absent.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from tunesmith.config import RESOLVED_CONFIG_NAME
from tunesmith.runs import MANIFEST

__all__ = [
    "LOG_FILE",
    "Comparison",
    "RunInfo",
    "STATUSES",
    "compare",
    "curves",
    "list_runs",
    "read_log",
    "run_config",
    "run_info",
]

# tunesmith.train_log.LOG_FILE; not imported from there because that module imports torch.
LOG_FILE = "trainer_log.jsonl"
STATUSES = ("running", "completed", "failed", "interrupted", "unknown")
RESULTS = "all_results.json"
# Bookkeeping fields of a log record: they describe progress, not the model, so they are not curves.
_NOT_CURVES = frozenset(
    {"step", "total_steps", "epoch", "percent", "elapsed_s", "remaining_s", "tokens_seen", "peak_mem_gib"}
)
# Curves shown last (after losses and rewards): optimiser state and speed.
_LAST = ("lr", "grad_norm", "tokens_per_s")


@dataclass(frozen=True)
class RunInfo:
    """One run folder as the history table shows it."""

    path: Path
    name: str  # path relative to the root
    status: str  # one of STATUSES
    stage: str | None
    model: str | None
    method: str | None  # finetuning_type
    dataset: str | None
    started: str | None  # ISO time
    step: int | None
    total_steps: int | None
    metrics: dict[str, float]  # final metrics (run.json / all_results.json), else the last logged ones


@dataclass(frozen=True)
class Comparison:
    """Two runs side by side: the config keys that differ and every metric's curves overlaid."""

    a: RunInfo
    b: RunInfo
    differing: list[tuple[str, Any, Any]]  # (key, value in a, value in b); a missing key reads None
    curves: dict[str, dict[str, list[tuple[int, float]]]]  # metric -> {run name: points}


def read_log(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSONL file from byte ``offset``, and the offset after the last complete line.

    A last line without its newline (still being written) is not consumed; lines that are not JSON
    objects are skipped. A missing file gives ([], offset).
    """
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when absent, unreadable or not an object (e.g. mid-write)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _numbers(mapping: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in ((k, _number(v)) for k, v in mapping.items()) if v is not None}


def run_config(run_dir: Path) -> dict[str, Any]:
    """The run's resolved config: tunesmith_config.yaml, else run.json's copy, else {}."""
    try:
        data = yaml.safe_load((run_dir / RESOLVED_CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        data = None
    if isinstance(data, dict):
        return data
    config = _read_json(run_dir / MANIFEST).get("config")
    return config if isinstance(config, dict) else {}


def _text(value: Any) -> str | None:
    if value in (None, "", [], ()):
        return None
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def run_info(run_dir: Path, root: Path) -> RunInfo:
    """What the history shows of one run folder."""
    manifest = _read_json(run_dir / MANIFEST)
    config = run_config(run_dir)
    records, _ = read_log(run_dir / LOG_FILE)
    stepped = [r for r in records if isinstance(r.get("step"), int)]
    last = stepped[-1] if stepped else {}
    status = manifest.get("status")
    metrics = _numbers(manifest.get("final_metrics") or {}) or _numbers(_read_json(run_dir / RESULTS))
    if not metrics:
        logged: dict[str, float] = {}
        for record in records:
            logged.update(_numbers({k: v for k, v in record.items() if k not in _NOT_CURVES}))
        metrics = logged
    name = run_dir.relative_to(root).as_posix() if run_dir != root else run_dir.name
    return RunInfo(
        path=run_dir,
        name=name,
        status=status if status in STATUSES else "unknown",
        stage=_text(config.get("stage")),
        model=_text(config.get("model_name_or_path")),
        method=_text(config.get("finetuning_type")),
        dataset=_text(config.get("dataset")),
        started=manifest.get("start_time") if isinstance(manifest.get("start_time"), str) else None,
        step=last.get("step"),
        total_steps=last.get("total_steps") if isinstance(last.get("total_steps"), int) else None,
        metrics=metrics,
    )


def _started_at(info: RunInfo) -> float:
    """Seconds since the epoch the run started: run.json's start time, else its oldest file's mtime."""
    if info.started:
        try:
            return datetime.fromisoformat(info.started).timestamp()
        except ValueError:
            pass
    times = [os.stat(p).st_mtime for p in (info.path / MANIFEST, info.path / LOG_FILE) if p.exists()]
    return min(times, default=0.0)


def list_runs(root: Path) -> list[RunInfo]:
    """Every run folder under ``root`` (recursive, ``root`` itself included), newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    folders = {p.parent for name in (MANIFEST, LOG_FILE) for p in root.rglob(name) if p.is_file()}
    infos = [run_info(folder, root) for folder in folders]
    return sorted(infos, key=lambda i: (_started_at(i), i.name), reverse=True)


def _curve_order(name: str, first_seen: int) -> tuple[int, int]:
    if name == "loss":
        return (0, 0)
    if name == "eval_loss":
        return (1, 0)
    if "loss" in name:
        return (2, first_seen)
    if name in _LAST:
        return (4, _LAST.index(name))
    return (3, first_seen)


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every numeric metric logged per step: {"loss": [(step, value), ...], ...}, loss-like ones first.

    A step logged twice (a resumed run re-logs steps after its checkpoint) keeps its latest value.
    The end-of-training summary (train_runtime, ...) and per-eval timings are not curves.
    """
    records, _ = read_log(Path(run_dir) / LOG_FILE)
    points: dict[str, dict[int, float]] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int) or "train_runtime" in record:
            continue
        for key, value in record.items():
            number = _number(value)
            if key in _NOT_CURVES or number is None or key.endswith(("_runtime", "_per_second")):
                continue
            points.setdefault(key, {})[step] = number
    order = {name: i for i, name in enumerate(points)}
    names = sorted(points, key=lambda n: _curve_order(n, order[n]))
    return {name: sorted(points[name].items()) for name in names}


def compare(a: Path, b: Path, root: Path) -> Comparison:
    """Runs ``a`` and ``b`` side by side: config keys whose values differ, sorted, and overlaid curves."""
    info_a, info_b = run_info(Path(a), Path(root)), run_info(Path(b), Path(root))
    config_a, config_b = run_config(Path(a)), run_config(Path(b))
    differing = [
        (key, config_a.get(key), config_b.get(key))
        for key in sorted(set(config_a) | set(config_b))
        if config_a.get(key) != config_b.get(key)
    ]
    curves_a, curves_b = curves(Path(a)), curves(Path(b))
    overlaid: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for metric in [*curves_a, *(m for m in curves_b if m not in curves_a)]:
        overlaid[metric] = {
            info.name: series[metric]
            for info, series in ((info_a, curves_a), (info_b, curves_b))
            if metric in series
        }
    return Comparison(info_a, info_b, differing, overlaid)
