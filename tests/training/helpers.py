"""Helpers of the training tests: tiny datasets, one-call training through the public API, log readers."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

CITIES = ("Paris", "Rome", "Oslo", "Lima")


class LogMessages(logging.Handler):
    """Collects the messages of a logger: `logging.getLogger("tunesmith").addHandler(h)`, then h.messages."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def tunesmith_messages() -> Iterator[list[str]]:
    """The messages the "tunesmith" logger emits inside the block (its handlers, not propagation)."""
    handler = LogMessages()
    logging.getLogger("tunesmith").addHandler(handler)
    try:
        yield handler.messages
    finally:
        logging.getLogger("tunesmith").removeHandler(handler)


def write_sft_data(path: Path, rows: int = 16) -> Path:
    """An alpaca file of a few repeated questions (learnable in a few steps), of different lengths."""
    data = [
        {
            "instruction": f"Name the capital city number {i % 4}.",
            "input": "Answer briefly." * (i % 3),
            "output": f"The capital is {CITIES[i % 4]}." + " Thanks." * (i % 2),
        }
        for i in range(rows)
    ]
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_weighted_sft_data(path: Path, rows: int = 8) -> Path:
    """An openai-format jsonl file whose assistant turns carry loss weights (0.5 or 2.0)."""
    lines = [
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Name the capital city number {i % 4}." + " Please." * i},
                    {
                        "role": "assistant",
                        "content": f"It is {CITIES[i % 4]}." * (1 + i % 3),
                        "weight": 0.5 + 1.5 * (i % 2),
                    },
                ]
            }
        )
        for i in range(rows)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_pt_data(path: Path, rows: int = 16) -> Path:
    """A jsonl file of repetitive plain-text documents of different lengths."""
    lines = [json.dumps({"text": "the cat sat on the mat. " * (1 + i % 3)}) for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run_config(model: Path, data: Path, out: Path, **overrides: Any) -> dict[str, Any]:
    """A small, fast CPU training config; `overrides` win."""
    cfg: dict[str, Any] = {
        "model_name_or_path": str(model),
        "dataset": str(data),
        "output_dir": str(out),
        "stage": "sft",
        "finetuning_type": "lora",
        "template": "qwen",
        "do_train": True,
        "cutoff_len": 64,
        "max_steps": 12,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "preprocessing_num_workers": 1,
        "overwrite_output_dir": True,
        "seed": 0,
    }
    cfg.update(overrides)
    return cfg


def train(model: Path, data: Path, out: Path, **overrides: Any) -> Any:
    """Train through the public API (`stages.run(load_config(...))`)."""
    from tunesmith.config import load_config
    from tunesmith.stages import run

    return run(load_config(None, run_config(model, data, out, **overrides)))


def logged_losses(out: Path) -> list[tuple[int, float]]:
    """(step, loss) of every training log record of trainer_log.jsonl."""
    records = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line]
    return [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
