"""The training progress bar: counts trained (supervised) tokens, so its rate is tokens/s and its ETA is
based on tokens, not steps (steps of packed or length-varying batches take very different times)."""

from __future__ import annotations

import sys

from tqdm import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments


class TokenProgressCallback(TrainerCallback):
    """A tqdm bar on rank 0. `total_tokens` None (e.g. max_steps runs): estimated from the tokens per step."""

    def __init__(self, total_tokens: int | None = None) -> None:
        self.total_tokens = total_tokens
        self.bar: tqdm | None = None
        self._pending = 0
        self._seen = 0

    def add_tokens(self, n: int) -> None:
        self._pending += n

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=self.total_tokens,
                unit="tok",
                unit_scale=True,
                desc="train",
                file=sys.stderr,
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.bar is None:
            return
        n = self._pending * max(args.world_size, 1)  # rank 0's count stands for every rank's
        self._pending = 0
        self._seen += n
        if self.total_tokens is None and state.max_steps and state.global_step:
            self.bar.total = int(self._seen / state.global_step * state.max_steps)
        self.bar.update(n)
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        self.bar.set_postfix_str(
            f"step {state.global_step}/{state.max_steps}" + (f" loss {loss:.4f}" if loss is not None else ""),
            refresh=False,
        )

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
