"""The trainer of grpo and ppo: `TunesmithTrainer` with generation in its training step.

Each micro-batch of prompt rows becomes a rollout (the algorithm samples completions with the engine,
scores them and prepares the loss tensors, without grad) and the loss is one forward/backward over it.
With `iterations` > 1 (grpo_iterations, ppo_epochs) the sampler repeats every generation window (the
micro-batches of one optimisation step) `iterations` times and the rollouts of a window are kept and reused,
so one generation serves `iterations` optimisation steps and the clip keeps the policy close to the one
that sampled. Checkpoints, resuming, logging (trainer_log.jsonl, the standard callbacks) and LoRA+ are the
Trainer's own; a checkpoint taken inside a cycle regenerates on resume. The algorithm's running state (PPO's
adaptive KL coefficient and score moments) is saved beside each checkpoint's trainer_state.json as
rl_state.json and read back by `train(resume_from_checkpoint=...)` on every rank.

Evaluation samples the eval prompts and logs their rewards; eval_loss is minus the mean reward, so
early stopping and load_best_model_at_end pick the highest reward.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from tunesmith.errors import TunesmithError
from tunesmith.plotting import plot_curve
from tunesmith.training.preference import MetricStore, reduce_means
from tunesmith.training.reward import load_reward_weights, save_reward_model
from tunesmith.training.rollout import RepeatSampler, RLAlgorithm, Rollout
from tunesmith.training.trainer import TunesmithTrainer

log = logging.getLogger("tunesmith")

RL_STATE_NAME = "rl_state.json"  # the algorithm's running state, in each checkpoint folder


class RLTrainer(TunesmithTrainer):
    """Generation, scoring and a policy-gradient loss per step; the method comes from `algorithm`."""

    loss_is_scaled_for_ga = False  # the loss is a mean over the micro-batch's completion tokens

    def __init__(
        self,
        *args: Any,
        algorithm: RLAlgorithm,
        iterations: int = 1,
        with_value_head: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, fused_loss=False, **kwargs)
        self.algorithm = algorithm
        self.iterations = iterations
        self.with_value_head = with_value_head  # ppo: saved and loaded in the reward-model layout
        self.metrics = MetricStore()
        self._rollouts: dict[int, Rollout] = {}  # window slot -> rollout of the current cycle
        self._window = (-1, -1)  # (global step, slot) of the last micro-batch

    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        a = self.args
        chunk = a.per_device_train_batch_size * a.world_size * a.gradient_accumulation_steps
        return RepeatSampler(len(dataset), chunk, self.iterations, a.seed)

    def training_step(
        self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        step = self.state.global_step
        slot = self._window[1] + 1 if self._window[0] == step else 0
        self._window = (step, slot)
        starts_cycle = step % self.iterations == 0
        if starts_cycle or slot not in self._rollouts:
            if slot == 0:
                self._rollouts.clear()
            # a regeneration inside a cycle (after resuming there) does not move the running state again:
            # the checkpoint already holds this cycle's update
            rollout = self._rollout(model, inputs["rows"], seed=step * 1009 + slot, learn=starts_cycle)
            self._rollouts[slot] = rollout
        return super().training_step(model, dict(self._rollouts[slot].batch), None)

    def _rollout(self, model: Any, rows: list[dict[str, Any]], seed: int, learn: bool = True) -> Rollout:
        policy = self.accelerator.unwrap_model(model)
        was_training = policy.training
        policy.eval()
        try:
            rollout = self.algorithm.rollout(
                policy, rows, self.args.seed + seed, learn=learn and was_training
            )
        finally:
            policy.train(was_training)
        split = "train" if was_training else "eval"
        self.metrics.add(split, reduce_means(self.accelerator, rollout.metrics))
        return rollout

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        loss, metrics = self.algorithm.loss(model, inputs)
        self.metrics.add("train", reduce_means(self.accelerator, metrics))
        return (loss, {}) if return_outputs else loss

    def prediction_step(
        self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool, ignore_keys: Any = None
    ) -> tuple[torch.Tensor, None, None]:
        rollout = self._rollout(model, inputs["rows"], seed=-1)
        return -rollout.metrics["reward"].detach().to(self.args.device), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        self.metrics.merge_into(logs)
        super().log(logs, start_time)

    # ---- the algorithm's running state in checkpoints ----------------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        state = self.algorithm.state_dict()
        if state and self.args.should_save:
            # written before the Trainer's files, so a checkpoint with trainer_state.json has it too
            folder = Path(
                self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            folder.mkdir(parents=True, exist_ok=True)
            (folder / RL_STATE_NAME).write_text(json.dumps(state, indent=2) + "\n")
        super()._save_checkpoint(model, trial)

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any) -> Any:
        """Trainer.train, with the algorithm's running state read back from the checkpoint first."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: the Trainer raises its own error
        if isinstance(checkpoint, str):
            self._load_algorithm_state(Path(checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_algorithm_state(self, checkpoint: Path) -> None:
        # every rank reads the same file (written by rank 0), so the restored state agrees across ranks
        path = checkpoint / RL_STATE_NAME
        if not path.is_file():
            if self.algorithm.state_dict():
                log.warning(
                    "%s is missing (a checkpoint of an older tunesmith?): the KL coefficient and score "
                    "statistics restart from their config values, so the resumed run departs from the "
                    "original",
                    path,
                )
            return
        try:
            self.algorithm.load_state_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError, TunesmithError) as e:
            raise TunesmithError(
                f"{path}: cannot restore the RL state ({type(e).__name__}: {e}). Fix: resume from an "
                f"intact checkpoint of this stage, or delete {RL_STATE_NAME} to restart the state"
            ) from e

    # ---- ppo: the LM (or adapter) plus value_head.safetensors, as stage rm saves ------------------------

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.with_value_head:
            return super()._save(output_dir, state_dict)
        out = output_dir or self.args.output_dir
        if self.args.should_save:
            save_reward_model(self.accelerator.unwrap_model(self.model), out)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(out)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        if not self.with_value_head:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_reward_weights(self.accelerator.unwrap_model(model or self.model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self.with_value_head:
            return super()._load_best_model()
        load_reward_weights(self.accelerator.unwrap_model(self.model), self.state.best_model_checkpoint)


RL_PLOTS = {
    "reward": "training_reward.png",
    "kl": "training_kl.png",
    "completion_length": "training_completion_length.png",
}


class PlotRewardCallback(TrainerCallback):
    """Draws the reward / KL / completion-length curves in output_dir at train end (rank 0)."""

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if not state.is_world_process_zero:
            return
        for key, name in RL_PLOTS.items():
            points = [(e["step"], e[key]) for e in state.log_history if key in e and math.isfinite(e[key])]
            if points:
                steps, values = zip(*points)
                plot_curve(
                    steps, values, f"{key} of {Path(args.output_dir).name}", Path(args.output_dir) / name
                )


__all__ = ["PlotRewardCallback", "RLTrainer"]
