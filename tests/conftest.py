"""Shared test fixtures. Tests never touch the network: the hub is switched off here too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LF_DATA = SHARED / "compat" / "llamafactory-data"
HF_TOKENIZERS = SHARED / "fixtures" / "hf_tokenizers"


@pytest.fixture(scope="session")
def lf_data() -> Path:
    """LLaMA-Factory's dataset_info.json and demo data (skip when ../shared is absent)."""
    if not (LF_DATA / "dataset_info.json").exists():
        pytest.skip(f"{LF_DATA} not present")
    return LF_DATA


@pytest.fixture(scope="session")
def hf_tokenizers() -> Path:
    if not HF_TOKENIZERS.exists():
        pytest.skip(f"{HF_TOKENIZERS} not present")
    return HF_TOKENIZERS


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from transformers import AutoTokenizer

    from tunesmith.tiny import tiny_tokenizer_dir

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir())


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own data cache so results never leak between tests."""
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path_factory.mktemp("cache")))
