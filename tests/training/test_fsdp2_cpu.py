"""FSDP2 through the launcher on 2 CPU processes (gloo): checkpoints that resume exactly, and final weights
gathered into one folder that plain `from_pretrained` loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.training.helpers import load_safetensors, run_config
from tests.training.test_distributed import _launch_env


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in rows if r.get("loss") is not None}


def _run(tmp_path: Path, name: str, config: dict) -> subprocess.CompletedProcess:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "tunesmith.cli", "train", str(path)]
    proc = subprocess.run(cmd, env=_launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_fsdp2_checkpoint_resumes_exactly_and_final_weights_load(tiny_model_dir, sft_data, tmp_path):
    common = dict(
        finetuning_type="full", max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3,
        per_device_train_batch_size=2, fsdp="full_shard auto_wrap",
    )  # fmt: skip
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = _run(tmp_path, "full", run_config(tiny_model_dir, sft_data, full, **common))
    assert "engine FSDP2" in proc.stderr and (full / "checkpoint-3" / "optimizer.pt").exists()

    resume = run_config(
        tiny_model_dir, sft_data, resumed, resume_from_checkpoint=str(full / "checkpoint-3"), **common
    )
    _run(tmp_path, "resumed", resume)
    before, after = _losses(full), _losses(resumed)
    assert sorted(after) == [4, 5, 6]
    assert [after[s] for s in (4, 5, 6)] == pytest.approx([before[s] for s in (4, 5, 6)], rel=1e-6)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(full)  # plain transformers, one process
    base = load_safetensors(tiny_model_dir / "model.safetensors")
    state = model.state_dict()
    for name, tensor in base.items():
        assert state[name].shape == tensor.shape, name  # gathered, not a shard
    assert max((state[n] - base[n]).abs().max().item() for n in base) > 1e-4  # and trained
    final, final_resumed = (
        load_safetensors(full / "model.safetensors"),
        load_safetensors(resumed / "model.safetensors"),
    )
    for name in final:  # the resumed run ends where the uninterrupted one did
        torch.testing.assert_close(final_resumed[name], final[name], rtol=0, atol=1e-6, msg=name)
