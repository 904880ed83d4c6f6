"""Continued pre-training: next-token loss on plain text (EOS between documents), with perplexity."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.training.causal_lm import TrainResult, train_causal_lm


def run(cfg: Config) -> TrainResult:
    return train_causal_lm(cfg, kind="pt")
