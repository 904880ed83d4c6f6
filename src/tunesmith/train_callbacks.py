"""The callbacks every tunesmith training stage passes to its HF ``Trainer``.

Usage in a stage::

    cbs = training_callbacks(plot_loss=cfg.plot_loss, total_tokens=tokens_per_epoch * epochs)
    trainer = StageTrainer(..., callbacks=cbs.as_list())
    # in StageTrainer.training_step, after super().training_step(...):
    #     cbs.add_tokens(count_trained_tokens(inputs["labels"]))   # a device tensor: no sync
    #     cbs.watchdog.check(self.state.global_step + 1, loss, inputs)  # queued: read at log events

Each piece lives in its own module: ``train_log`` (progress line, trainer_log.jsonl), ``watchdog``
(NaN/inf/zero loss diagnosis), ``plotting`` (loss PNGs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from tunesmith.plotting import PlotLossCallback, plot_losses
from tunesmith.progress import TokenProgressCallback
from tunesmith.train_log import TrainLogCallback, count_trained_tokens
from tunesmith.watchdog import LossWatchdog

if TYPE_CHECKING:
    from tunesmith.training.late_logs import LateReads

__all__ = [
    "LossWatchdog",
    "PlotLossCallback",
    "TrainCallbacks",
    "TrainLogCallback",
    "count_trained_tokens",
    "plot_losses",
    "training_callbacks",
]


@dataclass(frozen=True)
class TrainCallbacks:
    """Handles the trainer needs (``add_tokens``, ``watchdog.check``) plus the optional plotter and bar.

    The progress bar gets its tokens from ``log`` at log events (``TrainLogCallback(progress=...)``).
    """

    log: TrainLogCallback
    watchdog: LossWatchdog
    plot: PlotLossCallback | None
    progress: TokenProgressCallback | None = None

    def add_tokens(self, n: int | torch.Tensor) -> None:
        """Count one micro-batch's trained tokens (read at the next log event, then shown by the bar)."""
        self.log.add_tokens(n)

    def late_reads(self) -> list[LateReads]:
        """What a log event reads from the device, for `training.late_logs` (in this order)."""
        return [self.log, self.watchdog]

    def as_list(self) -> list[TrainerCallback]:
        """For ``Trainer(callbacks=...)``."""
        return [cb for cb in (self.log, self.watchdog, self.plot, self.progress) if cb is not None]


def training_callbacks(
    plot_loss: bool = True,
    total_tokens: int | None = None,
    zero_loss_patience: int = 3,
    progress_bar: bool = False,
) -> TrainCallbacks:
    """Build the standard callbacks; ``total_tokens`` (trained tokens of the whole run) enables a token ETA."""
    progress = TokenProgressCallback(total_tokens) if progress_bar else None
    return TrainCallbacks(
        log=TrainLogCallback(total_tokens=total_tokens, progress=progress),
        watchdog=LossWatchdog(zero_patience=zero_loss_patience),
        plot=PlotLossCallback() if plot_loss else None,
        progress=progress,
    )
