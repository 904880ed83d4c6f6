"""tunesmith: one YAML from a user's data and an open LLM to a fine-tuned, evaluated, served expert.

Python API::

    import tunesmith
    cfg = tunesmith.load_config("my.yaml", ["learning_rate=5e-5"])
    tunesmith.run(cfg)
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_config(path: Any = None, overrides: Any = None) -> Any:
    """Load and validate a config file plus key=value overrides (see tunesmith.config.load_config)."""
    from tunesmith.config import load_config as _load

    return _load(path, overrides)


def run(cfg: Any) -> Any:
    """Run the stage the config names (train, ...)."""
    from tunesmith.stages import run as _run

    return _run(cfg)


__all__ = ["__version__", "load_config", "run"]
