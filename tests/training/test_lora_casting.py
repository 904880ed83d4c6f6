"""LoRA layers read the bf16 input during a mixed-precision step: same numbers, less saved, flags restored."""

from __future__ import annotations

import pytest
import torch

from tests.training.helpers import logged_losses, train
from tunesmith.model.loader import load_model
from tunesmith.model.tuning import TuningOptions, apply_tuning
from tunesmith.training.lora_casting import casting_layers, inputs_uncast
from tunesmith.training.trainer import TunesmithTrainer


def _lora_bf16_model(model_dir):
    model = load_model(str(model_dir), dtype="bfloat16", attn="sdpa", gradient_checkpointing=False).model
    tuned = apply_tuning(model, TuningOptions(finetuning_type="lora", lora_rank=4)).model
    for p in tuned.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # tunesmith's default: trained weights in fp32 under bf16 compute
    return tuned


def _step(model, ids):
    """Forward + backward under CPU autocast; (loss, LoRA grads, bytes of the tensors saved for backward)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(seen.values())


def test_uncast_inputs_give_the_same_step_and_save_less(tiny_model_dir):
    model = _lora_bf16_model(tiny_model_dir)
    layers = casting_layers(model)
    assert len(layers) > 0 and all(m.cast_input_dtype_enabled for m in layers)
    ids = torch.randint(10, 500, (2, 48), generator=torch.Generator().manual_seed(0))
    loss_cast, grads_cast, saved_cast = _step(model, ids)
    with inputs_uncast(layers):
        assert not any(m.cast_input_dtype_enabled for m in layers)
        loss, grads, saved = _step(model, ids)
    assert all(m.cast_input_dtype_enabled for m in layers)  # restored
    assert torch.equal(loss, loss_cast)
    for name, g in grads.items():
        assert torch.equal(g, grads_cast[name]), name
    assert saved < saved_cast, (saved, saved_cast)  # bf16 copies of LoRA inputs no longer kept


def test_a_bf16_training_run_uncasts_only_inside_steps(monkeypatch, tiny_model_dir, sft_data, tmp_path):
    states: list[bool] = []
    real = TunesmithTrainer.compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        states.append(any(m.cast_input_dtype_enabled for m in casting_layers(model)))
        return real(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(TunesmithTrainer, "compute_loss", spy)
    keys = {"bf16": True, "use_cpu": True, "max_steps": 3}
    result = train(tiny_model_dir, sft_data, tmp_path / "uncast", **keys)
    assert states and not any(states), "every training forward ran with casting off"
    monkeypatch.setattr(TunesmithTrainer, "_layers_to_uncast", lambda self, model: [])
    train(tiny_model_dir, sft_data, tmp_path / "cast", **keys)
    assert logged_losses(tmp_path / "uncast") == logged_losses(tmp_path / "cast")
    del result


@pytest.mark.parametrize("flags", [{"bf16": False}, {"bf16": True, "fsdp": "full_shard"}])
def test_no_autocast_or_a_sharding_engine_keeps_peft_casting(flags):
    class Args:
        bf16 = flags["bf16"]
        fp16 = False

    class Fake:
        args = Args()
        is_deepspeed_enabled = False
        is_fsdp_enabled = "fsdp" in flags

    assert TunesmithTrainer._layers_to_uncast(Fake(), torch.nn.Linear(2, 2)) == []
