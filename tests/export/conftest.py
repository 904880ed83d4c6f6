"""Fixtures of the export tests: the tiny model (fp32 and a bf16 copy), a LoRA adapter trained on it until
it answers and stops, and a full fine-tune of it (each trained once per session, a few seconds)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.infer.conftest import _train
from tests.training import conftest as training
from tests.training.helpers import write_sft_data

# the training tests' fixtures, shared: one torch thread, the tiny model built once per session
_one_torch_thread = training._one_torch_thread
tiny_model_dir = training.tiny_model_dir

needs_bnb = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed"
)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {
        f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()
    }


# On a CPU with native bf16 (AVX512-BF16 / AMX), the tiny model's unmerged bf16 reference lands 1.19 away from
# the same model computed in fp32 at one position of one probe (0.44 with eager attention; the merged model
# 0.15, everywhere else both under 0.065): bf16 rounding, amplified at an ill-conditioned position of a tiny
# random model, beyond the tolerance meant for merge rounding (measured 2026-11-28 on such a host; the same
# tests pass on hosts without it, and GPU exports pass: bench/results/export_gpu_check-*). Skipped there.
BF16_CPU_NOISE = bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
BF16_CPU_NOISE_REASON = (
    "bf16 on this CPU (AVX512-BF16/AMX) puts the tiny model's unmerged bf16 reference up to 1.19 off its fp32 "
    "value at one position, beyond the merge-rounding tolerance (tests/export/conftest.py)"
)


@pytest.fixture(scope="session")
def capital_data(tmp_path_factory) -> Path:
    return write_sft_data(tmp_path_factory.mktemp("capitals") / "capitals.json", rows=16)


@pytest.fixture(scope="session")
def trained_lora(tmp_path_factory, tiny_model_dir, capital_data) -> Path:
    """A LoRA adapter folder (with run.json, tokenizer, chat template) over the fp32 tiny model."""
    return _train(tmp_path_factory, tiny_model_dir, capital_data, "lora", max_steps=30, learning_rate=2e-2)


@pytest.fixture(scope="session")
def trained_full(tmp_path_factory, tiny_model_dir, capital_data) -> Path:
    """The tiny model fine-tuned in full until it answers and stops."""
    return _train(
        tmp_path_factory, tiny_model_dir, capital_data, "full", finetuning_type="full", max_steps=40,
        learning_rate=3e-3,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_bf16_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model saved in bf16 (config dtype bfloat16), tokenizer files copied."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-bf16") / "model"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.is_file() and not (out / f.name).exists():
            shutil.copyfile(f, out / f.name)
    return out
