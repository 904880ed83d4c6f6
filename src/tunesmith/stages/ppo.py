"""Proximal Policy Optimisation with a value head, rewarded by a reward model (stage rm) or reward functions."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.training.causal_lm import TrainResult
from tunesmith.training.rl_run import train_rl


def run(cfg: Config) -> TrainResult:
    return train_rl(cfg)
