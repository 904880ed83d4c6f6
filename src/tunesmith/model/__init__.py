"""The model layer: load a tokenizer and model for training, then choose what trains."""

from tunesmith.model.loader import LoadedModel, load_model, load_tokenizer
from tunesmith.model.tuning import (
    TuningOptions,
    TuningResult,
    apply_tuning,
    build_optimizer_param_groups,
    trainable_summary,
)

__all__ = [
    "LoadedModel",
    "TuningOptions",
    "TuningResult",
    "apply_tuning",
    "build_optimizer_param_groups",
    "load_model",
    "load_tokenizer",
    "trainable_summary",
]
