"""Group Relative Policy Optimisation: completions sampled per prompt, rewarded, compared within their group."""

from __future__ import annotations

from tunesmith.config import Config
from tunesmith.training.causal_lm import TrainResult
from tunesmith.training.rl_run import train_rl


def run(cfg: Config) -> TrainResult:
    return train_rl(cfg)
