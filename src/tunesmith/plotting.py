"""Loss curves as PNGs (raw + smoothed), drawn at train end from the trainer's log history."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

logger = logging.getLogger("tunesmith.train")

PLOTS = {"loss": "training_loss.png", "eval_loss": "training_eval_loss.png"}


def smooth(values: Sequence[float]) -> list[float]:
    """Exponential moving average whose weight grows with the number of points (few points: little smoothing)."""
    if not values:
        return []
    weight = 1.8 * (1 / (1 + math.exp(-0.05 * len(values))) - 0.5)  # 0.04 for 1 point, -> 0.9 for many
    out, last = [], values[0]
    for v in values:
        last = weight * last + (1 - weight) * v
        out.append(last)
    return out


def plot_curve(steps: Sequence[int], values: Sequence[float], title: str, path: Path) -> Path:
    """Write one raw + smoothed curve to ``path`` with matplotlib's Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="raw")
    ax.plot(steps, smooth(values), color="#1f77b4", label="smoothed")
    ax.set(title=title, xlabel="step", ylabel=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_losses(log_history: Sequence[dict[str, Any]], output_dir: str | Path) -> list[Path]:
    """Plot ``loss`` and ``eval_loss`` from HF's ``state.log_history``; a key with no finite point is skipped."""
    written = []
    for key, name in PLOTS.items():
        points = [(e["step"], e[key]) for e in log_history if key in e and math.isfinite(e[key])]
        if not points:
            logger.info("no %s values logged: %s not drawn", key, name)
            continue
        steps, values = zip(*points)
        written.append(
            plot_curve(steps, values, f"{key} of {Path(output_dir).name}", Path(output_dir) / name)
        )
    return written


class PlotLossCallback(TrainerCallback):
    """Draws training_loss.png / training_eval_loss.png in ``args.output_dir`` at train end (rank 0)."""

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if state.is_world_process_zero:
            for path in plot_losses(state.log_history, args.output_dir):
                logger.info("loss curve: %s", path)
