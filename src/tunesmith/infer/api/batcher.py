"""One worker thread owns the model: waiting requests with equal settings share one ``generate`` call.

Requests are queued from the event loop; the worker takes the oldest one and every other waiting
non-streaming request with the same SamplingSettings (up to ``max_batch`` sequences, n counted), runs
``engine.generate`` once for the group and resolves each request's future. A streaming request runs
alone through ``engine.stream``. So the model never runs two generations at once, and a burst of
clients costs about one batched generation instead of one each.

Sampling with a fixed seed runs alone: the engine seeds once per call, so a seeded request gives the
same answer whatever else is waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.infer.api.errors import ApiError
from tunesmith.infer.engine import Completion, Engine, StreamEvent
from tunesmith.infer.settings import SamplingSettings

log = logging.getLogger("tunesmith")

_END = object()  # marks the end of a stream in its event queue


@dataclass(eq=False)
class _Job:
    prompt: list[int]
    settings: SamplingSettings
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[Completion]] | None = None  # a non-streaming request
    events: asyncio.Queue[Any] | None = None  # a streaming request
    abandoned: bool = False  # the client went away: finish the generation, deliver nothing

    @property
    def waiting(self) -> bool:
        return not self.abandoned and (self.future is None or not self.future.done())


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    largest_batch: int = 0  # requests in the largest generate call so far
    queued: int = 0


@dataclass
class Batcher:
    """The queue and worker thread in front of an engine (start() before use, stop() at shutdown)."""

    engine: Engine
    max_batch: int = 32
    stats: BatchStats = field(default_factory=BatchStats)
    _queue: queue.Queue[_Job | None] = field(default_factory=queue.Queue, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tunesmith-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running generation, fail what is still queued, end the worker."""
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    async def generate(self, prompt: list[int], settings: SamplingSettings) -> list[Completion]:
        """settings.n completions of one prompt, generated in a batch with other waiting requests."""
        loop = asyncio.get_running_loop()
        job = _Job(prompt, settings, loop, future=loop.create_future())
        self._submit(job)
        assert job.future is not None
        try:
            return await job.future
        finally:
            job.abandoned = True  # cancelled by a disconnect: the worker skips it if not started

    async def stream(self, prompt: list[int], settings: SamplingSettings) -> AsyncIterator[StreamEvent]:
        """The engine's stream events of one prompt, generated when the worker gets to it."""
        loop = asyncio.get_running_loop()
        job = _Job(prompt, settings, loop, events=asyncio.Queue())
        self._submit(job)
        assert job.events is not None
        try:
            while True:
                item = await job.events.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.abandoned = True

    # ---- worker thread -------------------------------------------------------------------------

    def _submit(self, job: _Job) -> None:
        if self._thread is None or not self._thread.is_alive():
            raise ApiError(503, "the generation worker is not running (the server is starting or stopping)")
        self.stats.requests += 1
        self._queue.put(job)

    def _run(self) -> None:
        pending: deque[_Job] = deque()
        while True:
            if not pending:
                first = self._queue.get()
                if first is None:
                    return
                pending.append(first)
            while True:  # everything that arrived while the model was busy joins this round
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._fail_all(pending, TunesmithError("the server is shutting down"))
                    return
                pending.append(job)
            self.stats.queued = len(pending)
            head = pending.popleft()
            if not head.waiting:
                continue
            if head.events is not None:
                self._stream(head)
            else:
                self._generate(self._group(head, pending))

    def _group(self, head: _Job, pending: deque[_Job]) -> list[_Job]:
        """head and the waiting non-streaming jobs with its settings, up to max_batch sequences."""
        s = head.settings
        if s.seed is not None and not s.greedy:
            return [head]
        group, size, rest = [head], s.n, deque()
        while pending:
            job = pending.popleft()
            fits = job.events is None and job.settings == s and size + s.n <= self.max_batch
            if fits and job.waiting:
                group.append(job)
                size += s.n
            elif job.waiting:
                rest.append(job)
        pending.extend(rest)
        return group

    def _generate(self, group: list[_Job]) -> None:
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(group))
        try:
            results = self.engine.generate([j.prompt for j in group], group[0].settings)
        except Exception as e:  # noqa: BLE001 - delivered to the requests; the worker keeps serving
            if len(group) > 1:  # one bad request must not fail the others: retry each alone
                for job in group:
                    self._generate([job])
                return
            if not isinstance(e, TunesmithError):
                log.exception("generation failed")
            self._deliver(group[0], e)
            return
        for job, completions in zip(group, results):
            self._deliver(job, completions)

    def _stream(self, job: _Job) -> None:
        try:
            # Drained to the end even when the client left: the engine holds the model until it is done.
            for event in self.engine.stream(job.prompt, job.settings):
                if not job.abandoned:
                    self._push(job, event)
            self._push(job, _END)
        except Exception as e:  # noqa: BLE001 - delivered to the request; the worker keeps serving
            if not isinstance(e, TunesmithError):
                log.exception("streaming generation failed")
            self._push(job, e)

    def _deliver(self, job: _Job, value: list[Completion] | BaseException) -> None:
        def resolve() -> None:
            if job.future is not None and not job.future.done():
                if isinstance(value, BaseException):
                    job.future.set_exception(value)
                else:
                    job.future.set_result(value)

        self._call(job, resolve)

    def _push(self, job: _Job, item: Any) -> None:
        assert job.events is not None
        self._call(job, lambda: job.events.put_nowait(item))  # type: ignore[union-attr]

    @staticmethod
    def _call(job: _Job, fn: Any) -> None:
        # RuntimeError: the event loop closed (server stopped), so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            job.loop.call_soon_threadsafe(fn)

    def _fail_all(self, jobs: deque[_Job], error: BaseException) -> None:
        for job in jobs:
            if job.events is not None:
                self._push(job, error)
            else:
                self._deliver(job, error)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._fail_all(deque([job]), error)


__all__ = ["BatchStats", "Batcher"]
