"""Loss watchdog: stop a run whose loss is NaN/inf, or exactly 0.0 for several steps, and say why.

A callback never sees the batch, so the trainer calls ``check`` from its ``training_step``::

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.watchdog.check(self.state.global_step + 1, loss, inputs)
        return loss

``check`` only queues the loss tensor and the batch: nothing is read from the device then. The queue is
read at each log event (on a GPU a step later, with the event's other values: `training.late_logs`), at the
end of training, and after ``max_pending`` micro-batches (which bounds the batches held; one sync). The first bad micro-batch of the queue
is reported with its own step and batch; training has then gone on to the step of the check, which the
message says. As a callback it also watches the logged loss, for trainers that do not call ``check``;
that diagnosis has no batch to save.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from tunesmith.errors import TunesmithError

logger = logging.getLogger("tunesmith.train")

IGNORE_INDEX = -100


def batch_summary(batch: Mapping[str, Any]) -> str:
    """Shape and supervised-token count of a batch, for the diagnosis."""
    ids, labels = batch.get("input_ids"), batch.get("labels")
    parts = []
    if isinstance(ids, torch.Tensor):
        parts.append(f"{ids.shape[0]} sequence(s) x {ids.shape[-1]} tokens")
    if isinstance(labels, torch.Tensor):
        parts.append(f"{int((labels != IGNORE_INDEX).sum())} supervised token(s) (labels != -100)")
    return ", ".join(parts) or f"keys {sorted(batch)}"


def diagnose(
    what: str, step: int, *, nonfinite: bool, fp16: bool, lr: float, batch_file: Path | None = None,
    batch: Mapping[str, Any] | None = None, checked_at: int | None = None,
) -> str:  # fmt: skip
    """The message of the error that stops the run: what happened, where the batch is, likely causes."""
    lines = [f"training stopped by the loss watchdog at step {step}: {what}."]
    if checked_at is not None and checked_at > step:
        lines.append(
            f"Step {step} is the first bad step since the previous check: losses are read at log events "
            f"(reading every step would sync the device), so training went on to step {checked_at} "
            "before this check."
        )
    if batch_file is not None and batch is not None:
        lines.append(f"The batch of that step ({batch_summary(batch)}) is saved to {batch_file}")
        lines.append("  (batch = torch.load(path); model(**batch) reproduces the forward pass).")
    else:
        lines.append("No batch was saved: this trainer does not call LossWatchdog.check(step, loss, batch).")
    masked = batch is not None and isinstance(batch.get("labels"), torch.Tensor)
    masked = masked and not bool((batch["labels"] != IGNORE_INDEX).any())
    lines.append("Likely causes:")
    if masked:
        lines.append("  - every label of this batch is masked (-100): there is nothing to learn from it.")
    if nonfinite:
        if fp16:
            lines.append(
                "  - fp16 overflow: values exceeded fp16's range. Fix: bf16: true, or a lower learning_rate."
            )
        lines.append(f"  - learning rate too high (learning_rate {lr:g}): the loss diverged. "
                     "Fix: lower it (e.g. 10x) or add warmup_ratio.")  # fmt: skip
        lines.append("  - samples with every label masked give 0/0 = nan.")
    else:
        lines.append(
            "  - samples with every label masked (wrong template/masking, or cutoff_len cuts the answer)."
        )
        lines.append("  - a loss weight of 0 on every supervised turn.")
        if fp16:
            lines.append("  - fp16 underflow of a tiny loss. Fix: bf16: true.")
    lines.append("Run `tunesmith check <config>` to find samples with no supervised tokens.")
    return "\n".join(lines)


class LossWatchdog(TrainerCallback):
    """Raises TunesmithError when the loss is NaN/inf, or exactly 0.0 for ``zero_patience`` consecutive steps.

    The batch file goes to ``args.output_dir/watchdog_batch_step{N}.pt`` (``_rank{R}`` added when distributed).
    """

    def __init__(self, zero_patience: int = 3, max_pending: int = 32) -> None:
        if zero_patience < 1:
            raise ValueError(f"zero_patience must be >= 1, got {zero_patience}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.output_dir = Path(".")  # args.output_dir from train begin
        self.zero_patience = zero_patience
        self.max_pending = max_pending
        # (step, loss, batch) of the micro-batches not read yet; the batches stay on their device
        self._pending: list[tuple[int, torch.Tensor, Mapping[str, Any]]] = []
        self.fp16 = False
        self.lr = 0.0
        self.rank, self.world_size = 0, 1
        self._zero_steps: set[int] = set()  # consecutive steps whose every checked loss was exactly 0.0
        self._zero_logs = 0
        # the queues staged by late log events not read yet, oldest first
        self._staged: deque[list[tuple[int, torch.Tensor, Mapping[str, Any]]]] = deque()
        self._latest = 0  # the latest step checked: where training is when a late event is read

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.output_dir = Path(args.output_dir)
        self.fp16, self.lr = bool(args.fp16), float(args.learning_rate)
        self.rank, self.world_size = args.process_index, args.world_size

    def check(self, step: int, loss: torch.Tensor | float, batch: Mapping[str, Any]) -> None:
        """Queue one micro-batch's loss (no device sync); a bad loss raises TunesmithError when read."""
        value = loss.detach().float().reshape(()) if isinstance(loss, torch.Tensor) else torch.tensor(loss)
        self._pending.append((step, value, batch))
        self._latest = max(self._latest, step)
        if len(self._pending) >= self.max_pending:
            self.inspect(step)

    def inspect(self, current_step: int) -> None:
        """Read the queued losses of steps up to ``current_step`` (one device sync); on a bad one save its
        batch and raise TunesmithError. Later steps' losses stay queued (a late log event is read while the
        next step's loss is queued: reading it would wait for that step)."""
        due = [entry for entry in self._pending if entry[0] <= current_step]
        if not due:
            return
        self._pending = [entry for entry in self._pending if entry[0] > current_step]
        device = due[0][1].device
        values = torch.stack([v.to(device) for _, v, _ in due]).tolist()
        for (step, _, batch), value in zip(due, values):
            self._judge(step, value, batch, current_step)

    def stage_reads(self) -> list[torch.Tensor]:
        """The queued losses, for a late log event to read (`training.late_logs`); the queue starts empty."""
        staged, self._pending = self._pending, []
        self._staged.append(staged)
        return [v for _, v, _ in staged]

    def take_reads(self, values: list[float], at: float) -> None:
        """Judge the oldest staged losses; a bad one stops the run, which has gone on to the latest checked
        step."""
        staged = self._staged.popleft()
        for (step, _, batch), value in zip(staged, values):
            self._judge(step, value, batch, self._latest)

    def _judge(self, step: int, value: float, batch: Mapping[str, Any], current_step: int) -> None:
        if not math.isfinite(value):
            self._trip(f"loss is {value}", step, batch, nonfinite=True, checked_at=current_step)
        if value != 0.0:
            self._zero_steps.clear()
            return
        self._zero_steps.add(step)
        if len(self._zero_steps) >= self.zero_patience:
            steps = sorted(self._zero_steps)
            what = f"loss is exactly 0.0 for {len(steps)} consecutive steps ({steps[0]}-{steps[-1]})"
            self._trip(what, step, batch, nonfinite=False, checked_at=current_step)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.inspect(state.global_step)

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ):
        self.inspect(state.global_step)  # the queued per-batch losses first: they name the step and batch
        if not logs or "learning_rate" not in logs:  # only training-step logs carry a learning rate
            return
        self.lr = float(logs["learning_rate"])
        loss = logs.get("loss")
        if loss is None:
            return
        if not math.isfinite(loss):
            self._trip(f"logged loss is {loss}", state.global_step, None, nonfinite=True)
        self._zero_logs = self._zero_logs + 1 if loss == 0.0 else 0
        if self._zero_logs >= self.zero_patience:
            what = f"logged loss is exactly 0.0 for {self._zero_logs} consecutive logs"
            self._trip(what, state.global_step, None, nonfinite=False)

    def _trip(
        self,
        what: str,
        step: int,
        batch: Mapping[str, Any] | None,
        nonfinite: bool,
        checked_at: int | None = None,
    ) -> None:
        batch_file = None
        if batch is not None:
            suffix = f"_rank{self.rank}" if self.world_size > 1 else ""
            batch_file = self.output_dir / f"watchdog_batch_step{step}{suffix}.pt"
            self.output_dir.mkdir(parents=True, exist_ok=True)
            torch.save(
                {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()},
                batch_file,
            )
        message = diagnose(
            what, step, nonfinite=nonfinite, fp16=self.fp16, lr=self.lr, batch_file=batch_file,
            batch=batch, checked_at=checked_at,
        )  # fmt: skip
        # The CLI prints the error's full diagnosis; the log keeps one line, so it is not said twice.
        logger.error("loss watchdog: stopping the run at step %d (%s)", step, what)
        raise TunesmithError(message)
