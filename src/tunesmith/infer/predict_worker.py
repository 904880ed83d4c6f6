"""The generating side of predict: batches of prompt rows -> JSON lines, in this process or in a worker.

A worker process (one per GPU) loads its own engine, takes the batches of its shard from its task queue
and sends each finished batch's lines back to the one writer, the parent. It stops
on a ``None`` task, and on its own when the parent is gone (a kill -9 of the parent leaves no orphan
generating on).
"""

from __future__ import annotations

import logging
import os
import queue
import traceback
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.tokenized import TokenDataset
from tunesmith.infer.engine import Completion, Engine
from tunesmith.infer.predict_io import record_line
from tunesmith.infer.settings import SamplingSettings

log = logging.getLogger("tunesmith")

Task = tuple[list[int], list[str]]  # dataset row indices and their sample ids


@dataclass
class BatchResult:
    """The JSON lines of one batch and what the summary needs to know about it."""

    lines: bytes
    samples: int
    finish: Counter = field(default_factory=Counter)
    completion_tokens: int = 0


@dataclass
class BatchRunner:
    """Runs tasks through an engine; halves the batch (and keeps it halved) when the GPU runs out of memory."""

    engine: Engine
    rows: TokenDataset
    settings: SamplingSettings
    extra_columns: list[str]
    limit: int = 1 << 30  # most prompts per generate call; lowered after an out-of-memory error

    def run(self, task: Task) -> BatchResult:
        indices, ids = task
        rows = [self.rows[i] for i in indices]
        completions = self._generate([r["input_ids"] for r in rows])
        effective = self.settings.effective()
        result = BatchResult(b"", len(rows))
        lines = []
        for row, sample_id, comps in zip(rows, ids, completions):
            lines.append(record_line(row, sample_id, comps, effective, self.extra_columns))
            result.finish.update(c.finish_reason for c in comps)
            result.completion_tokens += sum(c.completion_tokens for c in comps)
        result.lines = b"".join(lines)
        return result

    def _generate(self, prompts: Sequence[list[int]]) -> list[list[Completion]]:
        import torch

        out: list[list[Completion]] = []
        start = 0
        while start < len(prompts):
            chunk = prompts[start : start + self.limit]
            try:
                out.extend(self.engine.generate(chunk, self.settings))
            except torch.cuda.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                torch.cuda.empty_cache()
                self.limit = max(1, len(chunk) // 2)
                log.warning(
                    "out of GPU memory at %d prompts a batch: going on with %d", len(chunk), self.limit
                )
                continue
            start += len(chunk)
        return out


def run_tasks(runner: BatchRunner, tasks: Sequence[Task]) -> Iterator[BatchResult]:
    """The in-process path: every task in order."""
    for task in tasks:
        yield runner.run(task)


def worker_main(
    rank: int,
    device: str | None,
    threads: int | None,
    cfg: Any,
    parts: list[Path],
    extra_columns: list[str],
    settings: SamplingSettings,
    tasks: Any,
    results: Any,
    parent_pid: int,
) -> None:
    """A worker process: load the engine, then run tasks until a None task or the parent's death."""
    try:
        if device is not None:  # read by CUDA when it initialises, which happens only below
            os.environ["CUDA_VISIBLE_DEVICES"] = device
        import torch

        from tunesmith.infer.engine import load_engine

        if threads:
            torch.set_num_threads(threads)
        engine = load_engine(cfg)
        results.put(("ready", rank, engine.description))
        runner = BatchRunner(engine, TokenDataset(parts), settings, extra_columns)
        while os.getppid() == parent_pid:
            try:
                task = tasks.get(timeout=1.0)
            except queue.Empty:
                continue
            if task is None:
                break
            results.put(("batch", rank, runner.run(task)))
        if os.getppid() != parent_pid:
            results.cancel_join_thread()  # nobody reads the queue any more: exit without flushing it
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it as a user-facing error
        results.put(("error", rank, traceback.format_exc()))


__all__ = ["BatchResult", "BatchRunner", "Task", "run_tasks", "worker_main"]
