"""Trained weights are fp32 (16-bit compute) unless pure_bf16; results are saved in the loaded dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import tunesmith
from tunesmith.training.causal_lm import _set_trainable_dtype, restore_loaded_dtype


def _cfg(model: Path, **over):
    keys = {"model_name_or_path": str(model), "dataset": "x.json", "finetuning_type": "full", **over}
    return tunesmith.load_config(None, [f"{k}={v}" for k, v in keys.items()])


def _bf16_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("over", "trained_dtype"),
    [
        ({}, torch.float32),
        ({"pure_bf16": True}, torch.bfloat16),
        ({"deepspeed": "zero2"}, torch.bfloat16),  # DeepSpeed keeps its own fp32 master weights
    ],
)
def test_trainable_weights_are_fp32_unless_told(tiny_model_dir: Path, over: dict, trained_dtype) -> None:
    model = _bf16_model(tiny_model_dir)
    _set_trainable_dtype(model, _cfg(tiny_model_dir, **over))
    assert {p.dtype for p in model.parameters()} == {trained_dtype}


def test_only_trainable_weights_are_upcast_and_results_are_saved_bf16(tiny_model_dir: Path) -> None:
    model = _bf16_model(tiny_model_dir)
    for name, p in model.named_parameters():
        p.requires_grad = "layers.1." in name
    cfg = _cfg(tiny_model_dir, finetuning_type="freeze")
    _set_trainable_dtype(model, cfg)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all((d == torch.float32) == ("layers.1." in n) for n, d in dtypes.items())
    restore_loaded_dtype(model, cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
