"""Kahneman-Tversky optimisation: desirable / undesirable answers, no pairs needed."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.training.causal_lm import TrainResult
from tunesmith.training.pref_run import train_preference


def run(cfg: Config) -> TrainResult:
    return train_preference(cfg)
