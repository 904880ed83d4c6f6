"""The one HF Trainer subclass: token counting + loss watchdog per step, weighted loss, LoRA+ groups.

Loss normalisation: transformers' Trainer counts the supervised tokens of the whole gradient-accumulation
window (`num_items_in_batch`) and the model's loss divides the summed token losses by it, so the loss is
a mean over supervised tokens of the window, whatever the micro-batch / accumulation split
(tests/training/test_invariants.py proves 8x1 == 1x8).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer

from tunesmith.data.collate import IGNORE_INDEX
from tunesmith.model.tuning import build_optimizer_param_groups
from tunesmith.train_callbacks import TrainCallbacks
from tunesmith.train_log import count_trained_tokens


class TunesmithTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        callbacks_bundle: TrainCallbacks,
        loraplus_lr_ratio: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, callbacks=callbacks_bundle.as_list(), **kwargs)
        self.bundle = callbacks_bundle
        self.loraplus_lr_ratio = loraplus_lr_ratio

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        tokens = count_trained_tokens(inputs["labels"])
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.bundle.add_tokens(tokens)
        self.bundle.watchdog.check(self.state.global_step + 1, loss, inputs)
        return loss

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        weights = inputs.pop("loss_weights", None)
        if weights is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = weighted_causal_lm_loss(outputs.logits, labels, weights, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts the tokens of every rank and DDP averages gradients over ranks, so
            # scale back up, as Trainer.compute_loss does for the model's own loss.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None or not self.loraplus_lr_ratio:
            return super().create_optimizer(model) if model is not None else super().create_optimizer()
        groups = build_optimizer_param_groups(
            self.model, self.args.learning_rate, self.loraplus_lr_ratio, self.args.weight_decay
        )
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, self.model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer


def weighted_causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_items_in_batch: Any = None
) -> torch.Tensor:
    """Per-token weighted next-token loss, normalised like the model's own loss (by supervised tokens)."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    w = weights[:, 1:].to(logits.device)
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    total = (per_token * w.reshape(-1)).sum()
    denom = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE_INDEX).sum()
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device)
    return total / denom


__all__ = ["TunesmithTrainer", "weighted_causal_lm_loss"]
