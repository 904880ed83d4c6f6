"""Whole-step CUDA graphs: each batch shape's forward + backward captured once, then replayed.

A small step (the default LoRA batch: 8 rows, about 1,200 tokens) is bound by the host: eager PyTorch
launches some 2,300 kernels one by one from Python, 0.146 s a step for about 19 ms of GPU work on an H200.
Replayed as one CUDA graph the same step took 0.039 s, and 0.025 s with the decoder layers compiled
(bench/results/cuda_graph_step-2026-11-28T1843Z-rows8-h200.json; the numbers matched the eager step's).

How a step is replayed here:
- the collator gives every batch static shapes (`CausalLMCollator(static_shapes=True)`: widths on a grid,
  the loss rows padded with zero-weight rows), so a run's batches fall into a few shapes; one graph per
  shape, all sharing one memory pool, the likely widths captured at the start (`prepare`, from the trainer);
- a graph's inputs are buffers of its own, into which each batch is copied before the replay;
- the captured region is the Trainer's own `training_step` (loss scaling, autocast, backward, as eager);
  the parameters' `.grad` are accumulators made before the first capture, into which autograd adds each
  step's gradients in place (no second copy of the gradients in the graphs' pool), so gradient
  accumulation, clipping and the optimizer (outside the graph) see ordinary gradients; a gradient set to
  None (the optimizer's zero_grad) zeroes its accumulator before the next replay;
- the whole training runs on one side stream (`training_stream`), where graphs can be captured;
- a shape seen for the first time is captured and then replayed in the same step, so it costs about one
  eager step; the first capture is preceded by one eager run of the step (and, with compiled layers, every
  new shape is, so compiling never happens under capture);
- a capture that fails (a host sync inside, an op that cannot be captured) turns graphs off for the rest of
  the run, logged with the reason, and the step runs eagerly: training never depends on graphs working.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from tunesmith.errors import TunesmithError

logger = logging.getLogger("tunesmith.train")

MAX_GRAPHS = 128  # shapes captured per run; a batch of a further shape runs eagerly

Step = Callable[[dict[str, Any], Any], torch.Tensor]  # (inputs, num_items_in_batch) -> detached loss


class Capturer(Protocol):
    """Runs and records a step function (`CudaCapturer`; tests use an eager stand-in)."""

    def warm_up(self, fn: Callable[[], Any]) -> None: ...

    def capture(self, fn: Callable[[], Any]) -> Callable[[], None]: ...


class CudaCapturer:
    """CUDA graphs captured on the current stream, all in one memory pool.

    The current stream must be a side stream, and the whole training must run on it (`training_stream`,
    entered by the sft/pt stage before it loads the model): the autograd engine accumulates a parameter's
    gradient on the stream its first backward ran on, so gradients first made on the default stream would
    make the default stream wait on the capture, which CUDA refuses ("operation would make the legacy stream depend on a capturing
    blocking stream", measured on an H200). Every capture shares one pool, so the capture is begun and
    ended here rather than through `torch.cuda.graph` (which would also synchronise and collect garbage).
    ``thread_local``: the data loader's pin-memory thread may use CUDA meanwhile.
    """

    def __init__(self) -> None:
        self.pool = torch.cuda.graph_pool_handle()

    def warm_up(self, fn: Callable[[], Any]) -> None:
        fn()

    def capture(self, fn: Callable[[], Any]) -> Callable[[], None]:
        if torch.cuda.current_stream() == torch.cuda.default_stream():
            raise RuntimeError("CUDA graphs are captured on a side stream, and the training runs on it")
        # the blocks eager steps left cached go back first, so the pool can take them: otherwise a run would
        # hold its activations twice, once in the allocator's cache and once in the graphs' pool
        torch.cuda.empty_cache()
        generator = torch.cuda.default_generators[torch.cuda.current_device()]
        rng = generator.clone_state()  # the generator's state before the capture, not capturing
        graph = torch.cuda.CUDAGraph()
        graph.capture_begin(self.pool, capture_error_mode="thread_local")
        try:
            fn()
        except BaseException:
            with contextlib.suppress(Exception):  # end the invalidated capture; the step's error is raised
                graph.capture_end()
            # capture_end of an invalidated capture raises before it takes the generator out of capture
            # mode, and every later random draw would fail ("Offset increment outside graph capture
            # encountered unexpectedly"); graphs are off after this, so none reads the old state again
            generator.graphsafe_set_state(rng)
            raise
        graph.capture_end()
        return graph.replay


@contextlib.contextmanager
def training_stream() -> Iterator[None]:
    """A side stream to run a whole training on, so its steps can be captured (`CudaCapturer`): entered
    after the default stream's work so far, and left with the default stream waiting for it. Already on a
    side stream, it stays there."""
    if torch.cuda.current_stream() != torch.cuda.default_stream():
        yield
        return
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        torch.cuda.current_stream().wait_stream(stream)


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: dict[str, Any]  # the graph's own input buffers (and the batch's non-tensor values)
    num_items: torch.Tensor | None
    loss: torch.Tensor  # written by every replay


def _where(e: BaseException, frames: int = 4) -> str:
    """The innermost frames of an exception, innermost first: "fused_ce.py:88 forward < ..."."""
    tb = traceback.extract_tb(e.__traceback__)[-frames:]
    return " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(tb))


def shape_key(inputs: dict[str, Any], num_items: Any, extra: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """What a graph is specific to: every tensor's name, shape and dtype, every other value, how the token
    count comes (tensor, int or None) and ``extra`` (the trainer's accumulation steps)."""
    parts = tuple(
        (k, tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else (k, v)
        for k, v in sorted(inputs.items())
    )
    return (*parts, num_items is None, *extra)


class StepGraphs:
    """Replays ``step`` (forward + backward of one micro-batch) as a CUDA graph per batch shape.

    ``params``: the trained parameters; their gradients are accumulated into buffers of this object.
    ``warm_up_every_shape``: run each new shape once before capturing it (compiled layers compile there).
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        capturer: Capturer,
        warm_up_every_shape: bool = False,
        max_graphs: int = MAX_GRAPHS,
        required: bool = False,
    ) -> None:
        self.params = params
        self.required = required  # a failed capture raises instead of training on eagerly
        self.capturer = capturer
        self.warm_up_every_shape = warm_up_every_shape
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self.grads: list[torch.Tensor] | None = None  # the accumulators, made at the first capture
        self.off: str | None = None  # why graphs stopped, once they did
        self.replays = 0
        self._warm = False  # the first capture runs the step eagerly first
        self._full = False  # max_graphs reached (logged once)

    def step(self, step: Step, inputs: dict[str, Any], num_items: Any, extra: tuple[Any, ...] = ()) -> Any:
        """The micro-batch's detached loss, its gradients added to the parameters' `.grad`; replayed when
        possible, else ``step`` eagerly (a new shape past ``max_graphs``, or after graphs failed)."""
        graph = self._graph_for(step, inputs, num_items, extra)
        if graph is None:
            return step(inputs, num_items)
        self._feed(graph, inputs, num_items)
        self._bind_grads()
        graph.replay()
        self.replays += 1
        return graph.loss.clone()  # the next replay rewrites graph.loss

    def prepare(
        self, step: Step, inputs: dict[str, Any], num_items: Any, extra: tuple[Any, ...] = ()
    ) -> bool:
        """Capture the graph of ``inputs``' shape now, without replaying it (nothing is trained): a later
        batch of that shape replays at once. False when it cannot be captured (graphs off, or full)."""
        return self._graph_for(step, inputs, num_items, extra) is not None

    def _graph_for(
        self, step: Step, inputs: dict[str, Any], num_items: Any, extra: tuple[Any, ...]
    ) -> _Graph | None:
        """The graph of this shape, captured now if it is new; None: run the step eagerly."""
        if self.off is not None:
            return None
        key = shape_key(inputs, num_items, extra)
        graph = self.graphs.get(key)
        if graph is not None:
            return graph
        if len(self.graphs) >= self.max_graphs:
            if not self._full:
                logger.info(
                    "cuda graphs: %d batch shapes captured; further shapes run eagerly", self.max_graphs
                )
                self._full = True
            return None
        try:
            graph = self._capture(step, inputs, num_items)
        except Exception as e:  # noqa: BLE001 - any failure: train on eagerly, say why
            self.off = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} (at {_where(e)})"
            if self.required:
                raise TunesmithError(
                    f"cuda_graphs: true, but capturing a training step failed: {self.off}. Fix: remove "
                    "cuda_graphs to train on without graphs (logged) where a step cannot be captured"
                ) from e
            logger.warning("cuda graphs: off for the rest of the run, capturing a step failed (%s); "
                           "training goes on without them. Fix: report it; cuda_graphs: false "
                           "silences this", self.off)  # fmt: skip
            self._bind_grads()  # the window's gradients stay .grad until zero_grad lets them go
            self.graphs.clear()  # and the graphs' memory goes now
            self.grads = None
            return None
        self.graphs[key] = graph
        return graph

    def _capture(self, step: Step, inputs: dict[str, Any], num_items: Any) -> _Graph:
        static = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        count = None
        if num_items is not None:
            count = torch.as_tensor(num_items, device=self.params[0].device).clone()
        loss = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        if self.grads is None:
            self.grads = [torch.zeros_like(p) for p in self.params]
        kept = [p.grad for p in self.params]  # the window's gradients so far, untouched by the warm-up

        def run() -> None:  # autograd adds the step's gradients into .grad in place: the accumulators
            for p, acc in zip(self.params, self.grads):
                p.grad = acc
            loss.copy_(step(dict(static), count))

        try:
            if self.warm_up_every_shape or not self._warm:
                snapshot = [g.clone() for g in self.grads]
                try:
                    self.capturer.warm_up(run)
                finally:  # the warm-up's gradients (all or, if it failed, part) are not the step's
                    torch._foreach_copy_(self.grads, snapshot)
                self._warm = True
            replay = self.capturer.capture(run)
        finally:
            for p, g in zip(self.params, kept):
                p.grad = g
        if len(self.graphs) == 0:
            logger.info(
                "cuda graphs: on (each batch shape's forward + backward is captured once, then replayed)"
            )
        return _Graph(replay, static, count, loss)

    def _feed(self, graph: _Graph, inputs: dict[str, Any], num_items: Any) -> None:
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                graph.inputs[k].copy_(v, non_blocking=True)
        if graph.num_items is not None:
            graph.num_items.copy_(torch.as_tensor(num_items), non_blocking=True)

    def _bind_grads(self) -> None:
        """Make every parameter's `.grad` its accumulator: zeroed if it was set to None (a new window), the
        gradient copied in if it was replaced (an eager micro-batch of a fresh window)."""
        if self.grads is None:
            return
        zero = []
        for p, acc in zip(self.params, self.grads):
            g = p.grad
            if g is acc:
                continue
            if g is None:
                zero.append(acc)
            else:
                acc.copy_(g)
            p.grad = acc
        if zero:
            torch._foreach_zero_(zero)
