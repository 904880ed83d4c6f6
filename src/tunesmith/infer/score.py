"""`tunesmith score FILE`: BLEU-4, ROUGE-1/2/L, exact match and choice accuracy of a predictions.jsonl.

Writes the per-sample scores beside the file (``<stem>.scores.jsonl``, in the file's order) and the
averages (``<stem>.scores.json``). bleu-4 and rouge-* are LLaMA-Factory's (names, ×100 scale, formulas:
see metrics.py); exact_match and choice_accuracy are ×100 too. Chunks of lines are scored in worker
processes (fork), results written in order.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tunesmith.errors import DataError, TunesmithError
from tunesmith.infer.metrics import score_pair, segment, segmenter_name

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")
CHUNK = 2000  # lines per worker task; a file of one chunk is scored in this process


@dataclass(frozen=True)
class Fields:
    """Where the id, prediction and reference are in a line; dotted paths reach into objects (extra.answer)."""

    predict: str = "predict"
    label: str = "label"
    id: str = "id"
    bleu_tokens: str = "chars"


@dataclass
class ScoreResult:
    summary: dict[str, Any]
    scores_path: Path
    summary_path: Path


def _get(obj: dict[str, Any], path: str, where: str) -> Any:
    value: Any = obj
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(
                where, "field is missing", field=path, fix="name the field with the score options"
            )
        value = value[part]
    return value


def _text(obj: dict[str, Any], path: str, where: str) -> str:
    value = _get(obj, path, where)
    if value is None:
        return ""
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise DataError(where, f"got {type(value).__name__}", field=path, expected="text")


def _score_chunk(job: tuple[str, int, list[bytes], Fields]) -> tuple[bytes, list[list[float]], int, int]:
    """Score lines; returns their output lines, each metric's values, choice-scored lines, choices right."""
    file, first, lines, fields = job
    out: list[bytes] = []
    values: list[list[float]] = [[] for _ in METRICS]
    n_choice = right = 0
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{file}:{first + k}"
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise DataError(where, f"not JSON ({e})") from None
        s = score_pair(_text(rec, fields.predict, where), _text(rec, fields.label, where), fields.bleu_tokens)
        pc, lc = s.pop("choice")
        s["choice"] = {"predict": pc, "label": lc, "correct": None if lc is None else pc == lc}
        if lc is not None:
            n_choice += 1
            right += pc == lc
        for i, m in enumerate(METRICS):
            values[i].append(s[m])
        out.append(orjson.dumps({"id": _get(rec, fields.id, where) if fields.id else first + k, **s}))
    return b"\n".join(out) + (b"\n" if out else b""), values, n_choice, right


def score_file(
    path: str | Path, fields: Fields = Fields(), *, workers: int | None = None, chunk: int = CHUNK
) -> ScoreResult:
    """Score every line of a predictions file; write <stem>.scores.jsonl and <stem>.scores.json beside it.

    ``workers``: processes (default: every core; a file of fewer than two chunks is scored here).
    """
    path = Path(path)
    if not path.is_file():
        raise TunesmithError(f"{path}: no such file (give a predictions.jsonl written by tunesmith predict)")
    if fields.bleu_tokens not in ("chars", "words"):
        raise TunesmithError(
            f"bleu_tokens: got {fields.bleu_tokens!r}; allowed: chars (LLaMA-Factory's), words"
        )
    t0 = time.perf_counter()
    lines = path.read_bytes().split(b"\n")
    jobs = [(str(path), s + 1, lines[s : s + chunk], fields) for s in range(0, len(lines), chunk)]
    workers = workers or os.cpu_count() or 1
    stem = path.name.removesuffix(".jsonl")
    scores_path, summary_path = path.with_name(f"{stem}.scores.jsonl"), path.with_name(f"{stem}.scores.json")
    values: list[list[float]] = [[] for _ in METRICS]
    n_choice = right = 0
    parallel = workers > 1 and len(jobs) > 1 and "fork" in mp.get_all_start_methods()
    segment("预热 warm-up")  # load jieba's dictionary once, before forking, so workers inherit it
    with (
        open(scores_path, "wb") as f,
        mp.get_context("fork").Pool(workers) if parallel else nullcontext() as pool,
    ):
        for data, vals, c, r in pool.imap(_score_chunk, jobs) if parallel else map(_score_chunk, jobs):
            f.write(data)
            for acc, v in zip(values, vals):
                acc.extend(v)
            n_choice, right = n_choice + c, right + r
    seconds = time.perf_counter() - t0
    n = len(values[0])
    # fsum: the exact mean, whatever the chunking (LLaMA-Factory's np.mean agrees to ~1e-12)
    summary: dict[str, Any] = {m: (math.fsum(values[i]) / n if n else 0.0) for i, m in enumerate(METRICS)}
    summary |= {
        "choice_accuracy": 100.0 * right / n_choice if n_choice else None,
        "choice_samples": n_choice,
        "samples": n,
        "file": str(path),
        "fields": {"predict": fields.predict, "label": fields.label, "id": fields.id},
        "bleu_tokens": fields.bleu_tokens,
        "segmenter": segmenter_name(),
        "seconds": round(seconds, 3),
        "lines_per_s": round(n / seconds, 1) if seconds > 0 else None,
    }
    summary_path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    return ScoreResult(summary, scores_path, summary_path)


__all__ = ["METRICS", "Fields", "ScoreResult", "score_file"]
