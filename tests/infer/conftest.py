"""Fixtures of the inference tests: the tiny model, and the same model after a short SFT so that it
answers the capital-city task and stops on its own (full weights, and a LoRA adapter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training import conftest as training
from tests.training.helpers import run_config, write_sft_data

# the training tests' fixtures, shared: one torch thread, the tiny model built once per session
_one_torch_thread = training._one_torch_thread
tiny_model_dir = training.tiny_model_dir


@pytest.fixture(scope="session")
def capital_data(tmp_path_factory) -> Path:
    return write_sft_data(tmp_path_factory.mktemp("capitals") / "capitals.json", rows=16)


def _train(tmp_path_factory, tiny_model_dir: Path, data: Path, name: str, **overrides) -> Path:
    """Train the tiny model into a fresh folder, with its own data cache; returns the output folder."""
    import tunesmith

    out = tmp_path_factory.mktemp(name) / "out"
    overrides.setdefault("data_cache_dir", str(tmp_path_factory.mktemp(name + "-cache")))
    cfg = tunesmith.load_config(
        None, [f"{k}={v}" for k, v in run_config(tiny_model_dir, data, out, **overrides).items()]
    )
    tunesmith.run(cfg)
    return out


@pytest.fixture(scope="session")
def trained_full(tmp_path_factory, tiny_model_dir, capital_data) -> Path:
    """The tiny model fine-tuned (full) until it answers and stops: a merged/plain model folder."""
    return _train(
        tmp_path_factory,
        tiny_model_dir,
        capital_data,
        "full",
        finetuning_type="full",
        max_steps=40,
        learning_rate=3e-3,
    )


@pytest.fixture(scope="session")
def trained_lora(tmp_path_factory, tiny_model_dir, capital_data) -> Path:
    """A LoRA adapter folder over the tiny model (tokenizer and chat template saved beside it)."""
    return _train(tmp_path_factory, tiny_model_dir, capital_data, "lora", max_steps=30, learning_rate=2e-2)
