"""DPO-family and KTO trainers: our own losses (training/pref_losses.py) on `TunesmithTrainer`.

Each trainer overrides `compute_loss` (policy forward, reference log-probs, loss), `prediction_step` (the
same loss for evaluation) and `log` (adds the batch metrics, averaged since the last log, to the record
that goes to trainer_log.jsonl and the callbacks). The loss is a mean over pairs/samples of a micro-batch,
so the Trainer divides it by the gradient-accumulation steps (`loss_is_scaled_for_ga = False`).

Sequence log-probs (policy, adapter-disabled policy, reference model, precomputed columns) go through the
fused LM head (`FusedHead.sequence_logps`: no [batch, time, vocab] logits) whenever `TunesmithTrainer`'s
decision for SFT accepts that model's head (`fused_loss`, no FSDP / ZeRO-3, the probe); otherwise through
the model's logits (`logps`), and the reason is logged once per model.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunesmith.plotting import plot_curve
from tunesmith.training.fused_head import FusedHead
from tunesmith.training.pref_losses import (
    LENGTH_NORMALISED,
    PrefLoss,
    dpo_loss,
    kto_kl,
    kto_loss,
    mean_logps,
    orpo_loss,
    pair_metrics,
    sequence_logps,
    simpo_loss,
)
from tunesmith.training.reference import RefColumns, Reference
from tunesmith.training.trainer import TunesmithTrainer

logger = logging.getLogger("tunesmith.train")


class MetricStore:
    """Batch metrics per split ("train"/"eval"), averaged and cleared at each log."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def add(self, split: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.values[split][name].append(value)

    def merge_into(self, logs: dict[str, Any]) -> None:
        """Add the averages of the split `logs` belongs to (eval logs carry eval_loss), prefixed for eval."""
        split = "eval" if "eval_loss" in logs else "train"
        prefix = "eval_" if split == "eval" else ""
        for name, values in self.values[split].items():
            logs[prefix + name] = sum(values) / len(values)
        self.values[split].clear()


def reduce_means(accelerator: Any, metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    """Batch means averaged over processes, in one collective (every rank must pass the same keys)."""
    values = torch.stack([v.detach().float() for v in metrics.values()])
    return dict(zip(metrics, accelerator.reduce(values, "mean").tolist()))


def logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    head: FusedHead | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probs of the labelled tokens, their count) per sequence; through ``head`` when given
    (`model`'s own fused head: no logits), else from the model's logits."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if head is not None:
        sums, counts, _ = head.sequence_logps(model, inputs, labels)
        return sums, counts
    return sequence_logps(model(**inputs).logits, labels)


# model, input_ids, attention_mask, labels -> (sums, counts): `logps`, or a trainer's `logps` method
Logps = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def dpo_reference_columns(
    model: Any, batch: dict[str, Any], logps_of: Logps = logps
) -> dict[str, torch.Tensor]:
    """Summed reference log-probs of the chosen and rejected sides of a pairwise batch."""
    sums, _ = logps_of(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    half = sums.shape[0] // 2
    return {"ref_chosen_logps": sums[:half], "ref_rejected_logps": sums[half:]}


def kto_reference_columns(
    model: Any, batch: dict[str, Any], logps_of: Logps = logps
) -> dict[str, torch.Tensor]:
    """Summed reference log-probs of KTO samples and of their KL pairs."""
    sums, _ = logps_of(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    kl, _ = logps_of(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"])
    return {"ref_logps": sums, "ref_kl_logps": kl}


class MetricsTrainer(TunesmithTrainer):
    """A trainer whose losses carry metrics (``self.metrics``, a MetricStore): eval gives the loss only,
    and every log record gets the metrics averaged since the last one."""

    metrics: MetricStore

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.metrics.merge_into(logs)
        super().log(logs, start_time)


class _PreferenceBase(MetricsTrainer):
    """What DPO and KTO share: the reference, metric store, eval step and logging."""

    loss_is_scaled_for_ga = False

    def __init__(
        self,
        *args: Any,
        reference: Reference,
        ref_columns: RefColumns,
        beta: float,
        ftx: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.reference = reference
        # precomputing (pref_run) calls this too: reference columns take the same fused-or-plain path
        self.ref_columns: RefColumns = partial(ref_columns, logps_of=self.logps)
        # a separate reference model's head: the FusedHead, or why not (weak: a dropped reference is freed)
        self._ref_heads: WeakKeyDictionary[Any, FusedHead | str] = WeakKeyDictionary()
        self.beta = beta
        self.ftx = ftx
        self.metrics = MetricStore()
        if reference.kind == "model" and reference.model is not self.model:
            reference.model.to(self.args.device)

    def reference_values(
        self, model: Any, inputs: dict[str, Any], names: Sequence[str]
    ) -> list[torch.Tensor]:
        """Precomputed columns of the batch, or a no-grad pass of the reference model."""
        if names[0] in inputs:
            return [inputs[n] for n in names]
        with torch.no_grad(), self.reference.model_for(self.accelerator.unwrap_model(model)) as ref:
            values = self.ref_columns(ref, inputs)
        return [values[n] for n in names]

    def logps(
        self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`logps` of the policy or a reference, through its fused head where the decision allows it."""
        probe = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        base = self.accelerator.unwrap_model(model)
        if base is self.model:  # the policy, or its adapter-disabled self: one head, SFT's decision
            head = self._fused_head(model, probe)
        else:
            if base not in self._ref_heads:
                self._ref_heads[base] = decision = self._decide_fused(base, probe)
                if isinstance(decision, FusedHead):
                    logger.info("reference log-probs: fused lm_head (%s)", decision.describe())
                else:
                    logger.info("reference log-probs: plain logits path (fused off: %s)", decision)
            decision = self._ref_heads[base]
            head = decision if isinstance(decision, FusedHead) else None
        return logps(model, input_ids, attention_mask, labels, head)

    def record(self, model: Any, metrics: dict[str, float]) -> None:
        self.metrics.add("train" if model.training else "eval", metrics)


class DPOTrainer(_PreferenceBase):
    """DPO and its variants (sigmoid/cDPO, hinge, ipo, kto_pair) plus the reference-free orpo and simpo."""

    def __init__(
        self,
        *args: Any,
        loss_type: PrefLoss,
        label_smoothing: float = 0.0,
        simpo_gamma: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, ref_columns=dpo_reference_columns, **kwargs)
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.simpo_gamma = simpo_gamma

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        sums, counts = self.logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        half = sums.shape[0] // 2
        means = mean_logps(sums, counts)
        policy = means if self.loss_type in LENGTH_NORMALISED else sums
        chosen, rejected = policy[:half], policy[half:]
        if self.loss_type == "orpo":
            out = orpo_loss(chosen, rejected, beta=self.beta)
        elif self.loss_type == "simpo":
            out = simpo_loss(chosen, rejected, beta=self.beta, gamma=self.simpo_gamma)
        else:
            ref_c, ref_r = self.reference_values(model, inputs, ("ref_chosen_logps", "ref_rejected_logps"))
            if self.loss_type in LENGTH_NORMALISED:
                ref_c, ref_r = mean_logps(ref_c, counts[:half]), mean_logps(ref_r, counts[half:])
            out = dpo_loss(
                chosen,
                rejected,
                ref_c.to(chosen.dtype),
                ref_r.to(chosen.dtype),
                beta=self.beta,
                loss_type=self.loss_type,
                label_smoothing=self.label_smoothing,
            )
        losses = out.losses
        metrics = pair_metrics(out.chosen_rewards, out.rejected_rewards)
        metrics["logps/chosen"] = chosen.mean()
        metrics["logps/rejected"] = rejected.mean()
        if self.ftx:
            sft = -means[:half]  # mean token NLL of each chosen answer
            losses = losses + self.ftx * sft
            metrics["sft_loss"] = sft.mean()
        self.record(model, reduce_means(self.accelerator, metrics))
        loss = losses.mean()
        return (loss, {}) if return_outputs else loss


class KTOTrainer(_PreferenceBase):
    """KTO with desirable/undesirable weights and the KL reference point from mismatched pairs."""

    def __init__(
        self, *args: Any, desirable_weight: float = 1.0, undesirable_weight: float = 1.0, **kwargs: Any
    ) -> None:
        super().__init__(*args, ref_columns=kto_reference_columns, **kwargs)
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        sums, counts = self.logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["labels"])
        with torch.no_grad():  # the KL term is a detached reference point (KTO paper, TRL)
            kl_sums, _ = self.logps(
                model, inputs["kl_input_ids"], inputs["kl_attention_mask"], inputs["kl_labels"]
            )
        ref, ref_kl = self.reference_values(model, inputs, ("ref_logps", "ref_kl_logps"))
        kl = self.accelerator.reduce(kto_kl(kl_sums, ref_kl.to(kl_sums.dtype)), "mean")
        desirable = inputs["kto_tag"]
        out = kto_loss(
            sums,
            ref.to(sums.dtype),
            desirable,
            kl,
            beta=self.beta,
            desirable_weight=self.desirable_weight,
            undesirable_weight=self.undesirable_weight,
        )
        nll = -mean_logps(sums, counts)
        losses = out.losses
        if self.ftx:  # the NLL of desirable answers; undesirable samples add none
            losses = losses + self.ftx * torch.where(desirable, nll, torch.zeros_like(nll))
        self.record(model, kto_metrics(self.accelerator, out.rewards, sums, nll, desirable, out.kl))
        loss = losses.mean()
        return (loss, {}) if return_outputs else loss


def kto_metrics(
    accelerator: Any,
    rewards: torch.Tensor,
    sums: torch.Tensor,
    nll: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
) -> dict[str, float]:
    """KL, and rewards / log-probs / NLL means of the desirable and the undesirable samples of all processes.

    Sums and counts are reduced, not means: a micro-batch may hold no sample of one kind.
    """
    d = desirable.float().detach()
    u = 1 - d
    r, lp, nl = rewards.detach().float(), sums.detach().float(), nll.detach().float()
    stats = torch.stack(
        [(r * d).sum(), (lp * d).sum(), (nl * d).sum(), d.sum(), (r * u).sum(), (lp * u).sum(), u.sum()]
    )
    rc, lc, nc, n_c, rr, lr, n_r = accelerator.reduce(stats, "sum").tolist()
    out = {"kl": accelerator.reduce(kl.detach().float(), "mean").item()}
    if n_c:
        out.update({"rewards/chosen": rc / n_c, "logps/chosen": lc / n_c, "sft_loss": nc / n_c})
    if n_r:
        out.update({"rewards/rejected": rr / n_r, "logps/rejected": lr / n_r})
    if n_c and n_r:
        out["rewards/margins"] = rc / n_c - rr / n_r
    return out


PREFERENCE_PLOTS = {
    "rewards/margins": "training_rewards_margins.png",
    "rewards/accuracies": "training_rewards_accuracies.png",
    "kl": "training_kl.png",
}


def plot_preference_metrics(log_history: Sequence[dict[str, Any]], output_dir: str | Path) -> list[Path]:
    """Draw each of PREFERENCE_PLOTS that has finite logged values; returns the files written."""
    written = []
    for key, name in PREFERENCE_PLOTS.items():
        points = [(e["step"], e[key]) for e in log_history if key in e and math.isfinite(e[key])]
        if points:
            steps, values = zip(*points)
            title = f"{key} of {Path(output_dir).name}"
            written.append(plot_curve(steps, values, title, Path(output_dir) / name))
    return written


class PlotPreferenceCallback(TrainerCallback):
    """Draws the reward-margin / accuracy / KL curves in output_dir at train end (rank 0), like the loss PNGs."""

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            plot_preference_metrics(state.log_history, args.output_dir)
