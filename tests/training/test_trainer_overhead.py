"""Per-step host work of TunesmithTrainer that must give what transformers' Trainer gives, only cheaper."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, Trainer

from tunesmith.training.trainer import TunesmithTrainer


def test_floating_point_ops_equal_hf_and_count_parameters_once(tiny_model_dir, monkeypatch):
    from peft import LoraConfig, get_peft_model

    for model in (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4)),
    ):
        inputs = {"input_ids": torch.ones(3, 17, dtype=torch.long)}
        ours = SimpleNamespace(model=model, _non_embedding_params=None)
        expected = Trainer.floating_point_ops(SimpleNamespace(model=model), inputs)
        assert expected > 0
        assert TunesmithTrainer.floating_point_ops(ours, inputs) == expected
        monkeypatch.setattr(model, "num_parameters", None)  # a second count would fail: calling None
        assert TunesmithTrainer.floating_point_ops(ours, inputs) == expected  # the cached count
        assert TunesmithTrainer.floating_point_ops(ours, {"labels": inputs["input_ids"]}) == 0


def test_clipping_over_trained_parameters_logs_hf_grad_norms(tiny_model_dir, sft_data, tmp_path, monkeypatch):
    """The same grad_norm at every step as HF's own clipping over model.parameters(), with clipping active."""
    import json

    import tunesmith.training.trainer as trainer_module
    from tests.training.helpers import train

    class HfClipping(trainer_module.TunesmithTrainer):
        def _clip_grad_norm(self, model):
            return Trainer._clip_grad_norm(self, model)

    def norms(out):
        rows = [json.loads(x) for x in (out / "trainer_log.jsonl").read_text().splitlines() if x]
        return [r["grad_norm"] for r in rows if r.get("grad_norm") is not None]

    common = dict(max_steps=4, max_grad_norm=0.05, finetuning_type="lora")
    torch.manual_seed(0)
    train(tiny_model_dir, sft_data, tmp_path / "ours", **common)
    with monkeypatch.context() as m:
        m.setattr(trainer_module, "TunesmithTrainer", HfClipping)
        torch.manual_seed(0)
        train(tiny_model_dir, sft_data, tmp_path / "hf", **common)
    ours, hf = norms(tmp_path / "ours"), norms(tmp_path / "hf")
    assert len(ours) == 4 and min(ours) > 0.05  # clipping is active at every step
    assert ours == hf
