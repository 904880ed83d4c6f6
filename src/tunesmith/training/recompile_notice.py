"""Say so when compiled code recompiles in the middle of a run (torch_compile).

A recompile stalls one step for as long as the first compile (seconds to a minute on a GPU), and nothing in
a loss curve or a progress line says why that step was slow. After the first step, whose compiles are
expected, this callback compares torch's count of compiled graphs at each step's end and logs a warning
that names the step, the new graphs and how to see the guard that failed; an evaluation's own graphs (it
runs without gradients) are said at info level instead. It reads torch's counters and changes nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("tunesmith")


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (recompiles included)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class RecompileNotice(TrainerCallback):
    """Logs a warning at each step after the first whose end finds more compiled graphs than the last."""

    def __init__(self) -> None:
        self.seen: int | None = None  # graphs as of the last step's end (None before the first)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = compiled_graphs()
        if self.seen is not None and now > self.seen:
            log.warning(
                "torch_compile: %d new graph(s) compiled during step %d, which stalled it: the compiled code "
                "had guarded on something this batch changed (a size, a dtype). To see which guard, run "
                "again with the environment variable TORCH_LOGS=recompiles",
                now - self.seen, state.global_step,
            )  # fmt: skip
        self.seen = now

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Evaluation runs without gradients, which compiled code guards on: its graphs are expected once,
        said at info level, and not counted against the next training step."""
        if self.seen is None:  # before the first step, whose compiles are expected anyway
            return
        now = compiled_graphs()
        if now > self.seen:
            log.info(
                "torch_compile: evaluation compiled %d graph(s) of its own (no gradients)", now - self.seen
            )
        self.seen = now
