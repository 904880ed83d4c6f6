"""listed_zero_grad: torch's zero_grad without the module walk, only while a Trainer trains the model."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from tunesmith.training.listed_zero_grad import ListedZeroGrad, listed_zero_grad


def _lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(r=4))


def _backward(model) -> None:
    model(input_ids=torch.arange(1, 9).view(1, 8), labels=torch.arange(1, 9).view(1, 8)).loss.backward()


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_is_torchs_without_walking_the_modules(tiny_model_dir, monkeypatch, set_to_none):
    ours, theirs = _lora_model(tiny_model_dir), _lora_model(tiny_model_dir)
    with listed_zero_grad(ours):
        for model in (ours, theirs):
            _backward(model)
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            assert grads
        # the walk would fail now
        monkeypatch.setattr(type(ours).__mro__[2], "named_modules", lambda *a, **k: 1 / 0)
        ours.zero_grad(set_to_none=set_to_none)
        monkeypatch.undo()
        theirs.zero_grad(set_to_none=set_to_none)
        for (name, p), (_, q) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
            if set_to_none or q.grad is None:
                assert p.grad is None and q.grad is None, name
            else:
                assert torch.equal(p.grad, q.grad) and not p.grad.any() and not p.grad.requires_grad, name


def test_the_class_is_the_models_own_outside_and_after_a_failure(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    base = type(model)
    with pytest.raises(RuntimeError, match="inside"), listed_zero_grad(model):
        assert isinstance(model, ListedZeroGrad) and isinstance(model, base)
        assert type(model).__name__ == base.__name__ and type(model).__qualname__ == base.__qualname__
        with listed_zero_grad(model):  # nested (RLTrainer's train calls this trainer's): unchanged
            assert type(model).__mro__[2] is base
        assert isinstance(model, ListedZeroGrad)
        for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # copies are of the own class
            assert type(twin) is base and "_listed_parameters" not in twin.__dict__
            assert twin.state_dict().keys() == model.state_dict().keys()
        raise RuntimeError("inside")
    assert type(model) is base and "_listed_parameters" not in model.__dict__
    with listed_zero_grad(None):  # no model: nothing to do
        pass


def test_a_training_run_zeroes_through_the_list_and_gives_the_model_back(
    tiny_model_dir, sft_data, tmp_path, monkeypatch
):
    """Every optimizer step's zero_grad lets the gradients go (as torch's), and the listed class lasts the run."""
    import tunesmith.training.trainer as trainer_module
    from tests.training.helpers import logged_losses, train

    seen: list[tuple[bool, bool]] = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step:  # after an optimizer step
                seen.append(
                    (isinstance(model, ListedZeroGrad), all(p.grad is None for p in model.parameters()))
                )

    real_init = trainer_module.TunesmithTrainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        self.add_callback(Watch())

    monkeypatch.setattr(trainer_module.TunesmithTrainer, "__init__", init)
    torch.manual_seed(0)
    train(tiny_model_dir, sft_data, tmp_path / "listed", max_steps=4)
    assert seen == [(True, True)] * 3
    monkeypatch.setattr(trainer_module, "listed_zero_grad", lambda model: listed_zero_grad(None))
    torch.manual_seed(0)
    train(tiny_model_dir, sft_data, tmp_path / "walk", max_steps=4)
    assert logged_losses(tmp_path / "listed") == logged_losses(tmp_path / "walk")
