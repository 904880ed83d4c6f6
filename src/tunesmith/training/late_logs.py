"""Log events read their values from the GPU one step late, so logging never stalls the GPU.

A log event needs values that live on the GPU: the summed loss and the gradient norm (transformers'
Trainer reads both with ``.item()``), the trained-token count (`train_log`) and the loss watchdog's queued
losses (`watchdog`). A read waits until the GPU has run everything queued; the GPU then idles while the
host writes the log and prepares and launches the next step. At ``logging_steps: 1`` that is every step:
3.4 ms of each 257 ms Llama-3.2-1B full step on an H200 went to it
(bench/results/profile_step_gpu-2026-11-29T0434Z-llama-full-mix-h200-trace.json.gz).

Here a log event *stages* its values instead: each is stacked on the GPU, copied to pinned host memory
without blocking, and followed by a CUDA event. The next step's log call delivers it: by then the GPU has
finished the staged step (the host runs about one step ahead), so the wait is for work that is done, and the
GPU has the next step queued meanwhile. A step that evaluates, saves or ends training delivers at once, so
records keep their order with evaluation, checkpoints and the final metrics.

A delivered record keeps its own step, epoch and time. The time is when the GPU finished the staged step:
CUDA event timing against an anchor event whose wall time is read once, before training. Elapsed
times and tokens/s are therefore those a synchronous read would have logged. On the CPU the same path runs
(work is done when it is queued, so a staged event is as good as read): one code path for every run.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class LateReads(Protocol):
    """Something a log event reads from the GPU (the token count, the watchdog's losses)."""

    def stage_reads(self) -> list[torch.Tensor]:
        """The 0-dim tensors this log event needs; the next ones count from here."""
        ...

    def take_reads(self, values: list[float], at: float) -> None:
        """The staged tensors' values, and the ``time.monotonic()`` moment the GPU finished their step."""
        ...


@dataclass(frozen=True)
class Delivered:
    """A staged log event, read: transformers' log record plus what the trainer's bookkeeping needs."""

    step: int
    epoch: float | None
    input_tokens: int  # the state's num_input_tokens_seen at the event
    logs: dict[str, float]
    loss_sum: float  # before division by the event's steps (the Trainer's running total adds it)


@dataclass
class _Staged:
    step: int
    epoch: float | None
    input_tokens: int
    steps: int
    learning_rate: float
    has_norm: bool  # whether values[1] is the gradient norm
    sizes: list[int]  # how many values each participant staged, in order
    host: torch.Tensor  # float64 [loss_sum, (grad_norm,) participants' values...], pinned on a GPU
    done: Any  # the device's mark after the copy


class _CudaMarks:
    """A CUDA stream's marks: timed events, dated against an anchor whose wall time is read once."""

    def __init__(self) -> None:
        anchor = torch.cuda.Event(enable_timing=True)
        anchor.record()
        anchor.synchronize()  # once, before training: the anchor dates every later event
        self._anchor = (anchor, time.monotonic())

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def wait(self, mark: torch.cuda.Event) -> None:
        mark.synchronize()

    def time_of(self, mark: torch.cuda.Event) -> float:
        anchor, wall = self._anchor
        return wall + anchor.elapsed_time(mark) / 1000

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=True)


class _HostMarks:
    """The CPU's: work is done when it is queued, so a mark is the time it is made."""

    def mark(self) -> float:
        return time.monotonic()

    def wait(self, mark: float) -> None:
        """Nothing to wait for: the CPU ran the staged work before the mark was made."""

    def time_of(self, mark: float) -> float:
        return mark

    def buffer(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype)


def supported(device: torch.device) -> bool:
    """Devices whose log events can be staged: CUDA, and the CPU (there a staged event is read at once in
    effect, which keeps one code path for every run and lets the CPU test suite cover it)."""
    return device.type in ("cuda", "cpu")


class LateLogs:
    """Stages log events and delivers them a step later (see the module docstring)."""

    def __init__(self, participants: Sequence[LateReads], device: torch.device) -> None:
        if not supported(device):
            raise ValueError(f"late log events need a CUDA device or the CPU, not {device}")
        self.participants = list(participants)
        self.device = device
        self._marks = _CudaMarks() if device.type == "cuda" else _HostMarks()
        self._staged: deque[_Staged] = deque()

    @property
    def pending(self) -> int:
        return len(self._staged)

    def stage(
        self,
        *,
        step: int,
        epoch: float | None,
        input_tokens: int,
        steps: int,
        learning_rate: float,
        loss_sum: torch.Tensor,
        grad_norm: torch.Tensor | float | None,
    ) -> None:
        """Queue one log event: its values copied to the host behind a device mark, nothing read now."""
        if grad_norm is not None and not isinstance(grad_norm, torch.Tensor):  # DeepSpeed gives a float
            grad_norm = torch.tensor(float(grad_norm))
        values = [loss_sum] + ([grad_norm] if grad_norm is not None else [])
        sizes = []
        for p in self.participants:
            staged = p.stage_reads()
            sizes.append(len(staged))
            values.extend(staged)
        stacked = torch.stack([v.detach().reshape(()).to(self.device, torch.float64) for v in values])
        host = self._marks.buffer(stacked)
        host.copy_(stacked, non_blocking=True)
        self._staged.append(
            _Staged(
                step, epoch, input_tokens, steps, learning_rate, grad_norm is not None, sizes, host,
                self._marks.mark(),
            )
        )  # fmt: skip

    def deliver(self, keep_latest: bool) -> Iterator[Delivered]:
        """Read the staged events, oldest first (all of them, or all but the newest with ``keep_latest``):
        the participants take their values, then the caller logs each record."""
        while len(self._staged) > (1 if keep_latest else 0):
            s = self._staged.popleft()
            self._marks.wait(s.done)
            at = self._marks.time_of(s.done)
            values = s.host.tolist()
            loss_sum, rest = values[0], values[1:]
            logs = {"loss": loss_sum / s.steps}
            if s.has_norm:
                logs["grad_norm"], rest = rest[0], rest[1:]
            logs["learning_rate"] = s.learning_rate
            for p, n in zip(self.participants, s.sizes):
                p.take_reads(rest[:n], at)
                rest = rest[n:]
            yield Delivered(s.step, s.epoch, s.input_tokens, logs, loss_sum)
