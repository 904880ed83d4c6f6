"""Progress line and ``trainer_log.jsonl``: trained tokens/s, token-based ETA, peak memory.

Token counting: the trainer calls ``TrainLogCallback.add_tokens(count_trained_tokens(batch["labels"]))``
once per micro-batch on every rank, with that rank's count as a device tensor: it is summed on the device
and read once per log event, never per micro-batch; on a GPU a step later (`training.late_logs`), so the read
waits for nothing. "Trained tokens"
are the tokens that carry a loss term (label != -100 after the causal shift): padding and masked prompt
tokens are not counted. This differs from HF's ``include_num_input_tokens_seen`` ("all" counts padding;
"non_padding" counts the attention mask, so prompt tokens too). Ranks' counts are summed (all_reduce) at
each log event, and this rank's count then goes on to the progress bar, which therefore moves at log
events.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunesmith.progress import TokenProgressCallback

logger = logging.getLogger("tunesmith.train")

IGNORE_INDEX = -100
LOG_FILE = "trainer_log.jsonl"
# HF log keys renamed or consumed by the fixed fields; every other key is passed through unchanged.
_RENAMED = {"learning_rate": "lr"}
_SHOWN = (("loss", ".4f"), ("eval_loss", ".4f"), ("train_loss", ".4f"), ("lr", ".2e"), ("grad_norm", ".3g"))
_FIXED = ("step", "total_steps", "epoch", "loss", "eval_loss", "lr", "grad_norm")


def count_trained_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens with a loss term in a causal-LM batch: labels after the one-position shift that are not -100.

    A 0-dim int64 tensor on the labels' device, so counting does not wait for the device.
    """
    return (labels[..., 1:] != IGNORE_INDEX).sum()


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA max_memory_allocated on a GPU, else this process's peak RSS.

    On a GPU read from the allocator's nested statistics: `max_memory_allocated` flattens and sorts all of
    them in Python first, host time spent after the logging step's sync, while the GPU waits."""
    if device.type == "cuda":
        stats = torch.cuda.memory_stats_as_nested_dict(device)
        return stats.get("allocated_bytes", {}).get("all", {}).get("peak", 0) / 2**30
    import resource  # POSIX only; imported here so the module still imports elsewhere

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 2**30  # bytes on macOS, KiB on Linux


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null (the watchdog reports such losses itself)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _clock(seconds: float | None) -> str:
    return "?" if seconds is None else str(timedelta(seconds=round(seconds)))


def format_progress(record: Mapping[str, Any]) -> str:
    """One person-readable line for a log record (see ``TrainLogCallback.record``)."""
    parts = [f"step {record['step']}/{record['total_steps']} ({record['percent']:.0f}%)"]
    if record["epoch"] is not None:
        parts.append(f"epoch {record['epoch']:.2f}")
    for key, fmt in _SHOWN:
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:{fmt}}")
    if record["tokens_per_s"]:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{_clock(record['elapsed_s'])} elapsed, {_clock(record['remaining_s'])} left")
    parts.append(f"peak mem {record['peak_mem_gib']:.2f} GiB")
    return " | ".join(parts)


class TrainLogCallback(TrainerCallback):
    """Writes one JSON line per log event to ``args.output_dir/trainer_log.jsonl``; logs a progress line.

    ``total_tokens``: trained tokens the whole run will see (all epochs), for a token-based ETA; without
    it (or before any tokens are counted) the ETA comes from steps. Rank 0 writes; every rank counts.
    ``progress``: the token progress bar to pass this rank's count to at each log event.
    """

    def __init__(
        self, total_tokens: int | None = None, progress: TokenProgressCallback | None = None
    ) -> None:
        self.path = Path(LOG_FILE)  # under args.output_dir from train begin
        self.total_tokens = total_tokens
        self.progress = progress
        self.tokens_seen = 0  # summed over ranks, as of the last log event
        self._pending: int | torch.Tensor = 0  # this rank's tokens since the last log event, on its device
        self._start = 0.0
        self._start_step = 0
        self._tokens_before = 0  # estimated trained tokens of earlier sessions when resuming
        self._device = torch.device("cpu")
        # a late log event's counts (this rank's, all ranks') and the time its step ended (`late_logs`)
        self._taken: tuple[int, int, float] | None = None

    def add_tokens(self, n: int | torch.Tensor) -> None:
        """Count ``n`` trained tokens of one micro-batch on this rank (a device tensor is not read here)."""
        self._pending = self._pending + n

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._start = time.monotonic()
        self._start_step = state.global_step
        self._device = args.device
        self.path = Path(args.output_dir) / LOG_FILE
        if self.total_tokens and state.global_step and state.max_steps:
            self._tokens_before = self.total_tokens * state.global_step // state.max_steps
        if state.is_world_process_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if state.global_step == 0:  # a fresh run starts a fresh log; a resumed one appends
                self.path.write_text("")

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        at = self._sync_tokens()
        if not state.is_world_process_zero or not logs:
            return
        record = self.record(state, logs, at - self._start)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
        logger.info(format_progress(record))

    def stage_reads(self) -> list[torch.Tensor]:
        """This rank's and every rank's count since the last log event, on the device, not read (a
        collective: log events run on all ranks); counting starts again from zero."""
        local = torch.as_tensor(self._pending).to(self._device, torch.int64)
        summed = local.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(summed)
        self._pending = 0
        return [local, summed]

    def take_reads(self, values: list[float], at: float) -> None:
        """The staged counts of a late log event (`late_logs`), for its on_log; ``at``: when its step ended."""
        mine, everyone = values
        self._taken = (int(mine), int(everyone), at)

    def _sync_tokens(self) -> float:
        """Add every rank's count to ``tokens_seen``: a late event's staged counts, else read now (the one
        read of the counts). Returns the event's time (``time.monotonic()``)."""
        if self._taken is not None:
            mine, everyone, at = self._taken
            self._taken = None
        else:
            mine, everyone = torch.stack(self.stage_reads()).tolist()
            at = time.monotonic()
        self.tokens_seen += everyone
        if self.progress is not None:
            self.progress.add_tokens(mine)
        return at

    def record(self, state: TrainerState, logs: Mapping[str, Any], elapsed: float) -> dict[str, Any]:
        """The JSON record of one log event: fixed fields first, then every other logged key."""
        step, total = state.global_step, state.max_steps
        rate = self.tokens_seen / elapsed if elapsed > 0 else 0.0
        remaining: float | None = None
        if self.total_tokens and rate > 0:
            remaining = max(self.total_tokens - self._tokens_before - self.tokens_seen, 0) / rate
        elif step > self._start_step:
            remaining = (total - step) * elapsed / (step - self._start_step)
        record: dict[str, Any] = {
            "step": step,
            "total_steps": total,
            "epoch": logs.get("epoch", state.epoch),
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "lr": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "tokens_seen": self._tokens_before + self.tokens_seen,
            "tokens_per_s": round(rate, 1),
            "elapsed_s": round(elapsed, 3),
            "remaining_s": None if remaining is None else round(remaining, 2),
            "percent": 100.0 * step / total if total else 0.0,
            "peak_mem_gib": round(peak_memory_gib(self._device), 3),
        }
        extra = {_RENAMED.get(k, k): v for k, v in logs.items() if _RENAMED.get(k, k) not in _FIXED}
        return record | extra
