"""Fixtures of the training tests: the tiny model (built once per session) and tiny synthetic datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.helpers import write_pt_data, write_sft_data


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tunesmith.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def sft_data(tmp_path_factory) -> Path:
    return write_sft_data(tmp_path_factory.mktemp("sft") / "sft.json")


@pytest.fixture(scope="session")
def pt_data(tmp_path_factory) -> Path:
    return write_pt_data(tmp_path_factory.mktemp("pt") / "pt.jsonl")
