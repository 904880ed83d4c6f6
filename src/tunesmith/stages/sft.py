"""Supervised fine-tuning: loss on the assistant turns of chat-formatted data."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.training.causal_lm import TrainResult, train_causal_lm


def run(cfg: Config) -> TrainResult:
    return train_causal_lm(cfg, kind="sft")
