"""Fixtures of the training tests: the tiny model (built once per session) and tiny synthetic datasets."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.training.helpers import write_pt_data, write_sft_data


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The tiny model's matmuls are too small to gain from threads; on a busy 2-core machine the OpenMP
    threads of several processes fight and a run gets ~10x slower (measured: 24 s -> 3 s)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
