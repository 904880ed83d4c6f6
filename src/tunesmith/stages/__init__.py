"""Training stages: one module per stage, one `run(cfg)` each. Selection is a table lookup."""

from __future__ import annotations

import importlib
from typing import Any

from tunesmith.errors import TunesmithError

# stage name -> module implementing run(cfg). Later stages plug in here.
STAGES = {
    "pt": "tunesmith.stages.pt",
    "sft": "tunesmith.stages.sft",
    "rm": "tunesmith.stages.rm",
    "dpo": "tunesmith.stages.dpo",
    "kto": "tunesmith.stages.kto",
    "ppo": "tunesmith.stages.ppo",
    "grpo": "tunesmith.stages.grpo",
}


def run(cfg: Any) -> Any:
    """Run the stage named by `cfg.finetuning.stage`."""
    stage = cfg.finetuning.stage
    if stage not in STAGES:
        raise TunesmithError(
            f"stage {stage!r} is not available yet in this version of tunesmith; available: {', '.join(STAGES)}"
        )
    return importlib.import_module(STAGES[stage]).run(cfg)
