"""Bounded micro-batching: concurrent requests for one model become one backend call.

Per model: at most ``max_batch`` images per call, a partial batch waits at most
``max_delay_s`` for company, at most ``max_queue`` images wait at all, and every image
carries its request's deadline (504 at it; an expired image is dropped before it costs
any compute). Admission comes before any work: :meth:`Batcher.reserve` refuses a request
at once (503 + Retry-After) when the queue is full or when the queue ahead of it could not
be worked off before its deadline, and holds its place while its images are decoded.

Every accepted request gets exactly one answer: a result, or the error of its batch, or
``ShuttingDown`` if the gateway is closing before its batch could run (``close`` first
drains what was queued).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from service.errors import DeadlineExceeded, InternalError, Overloaded, ServiceError, ShuttingDown
from service.metrics import Metrics

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray, float], Awaitable[np.ndarray]]


@dataclass(eq=False)
class _Item:
    tensor: np.ndarray
    deadline: float
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its batch went to the backend
    finished: float = 0.0  # when its batch came back


@dataclass(frozen=True)
class Batched:
    """A request's rows of logits, and where its time went."""

    rows: list[np.ndarray]
    #: From submission until the first of its images went to the backend.
    queued_s: float
    #: From then until the last of its images came back (one batch, or several).
    computed_s: float


class Batcher:
    def __init__(
        self,
        model: str,
        infer: InferFn,
        *,
        max_batch: int,
        max_delay_s: float,
        max_queue: int,
        metrics: Metrics,
        backend_name: str,
        max_inflight: int = 1,
    ) -> None:
        self.model = model
        self._infer = infer
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self._metrics = metrics
        self._backend = backend_name
        self._pending: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight)
        self._running: set[asyncio.Task[None]] = set()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._max_inflight = max_inflight
        self._reserved = 0  # images admitted, still being decoded
        self._batch_seconds = 0.05  # EWMA of a batch's backend time

    def start(self) -> None:
        self._worker = asyncio.create_task(self._loop(), name=f"batcher-{self.model}")

    @property
    def waiting(self) -> int:
        """Images ahead of a new request: queued, and admitted but still decoding."""
        return len(self._pending) + self._reserved

    def wait_s(self, images: int) -> float:
        """Predicted time until ``images`` more images (after those waiting) are done."""
        waves = math.ceil((self.waiting + images) / self.max_batch)
        return waves * self._batch_seconds / self._max_inflight

    def reserve(self, images: int, deadline: float, extra_s: float = 0.0) -> None:
        """Admit a request of ``images`` images before any work is done for it, or refuse
        it at once (503 + Retry-After): the queue is full, or what waits ahead of it (plus
        ``extra_s`` of its own work before the queue) cannot be done by ``deadline``.
        An admitted request's place is held until :meth:`submit` (or :meth:`release`)."""
        if self._closing:
            raise ShuttingDown("the gateway is shutting down; retry on another replica")
        if self.waiting + images > self.max_queue:
            raise Overloaded(
                f"model {self.model!r} has {self.waiting} images waiting (limit "
                f"{self.max_queue}); retry later",
                retry_after=self.wait_s(0),
            )
        wait = self.wait_s(images) + extra_s
        if time.perf_counter() + wait > deadline:
            raise Overloaded(
                f"model {self.model!r} is busy: this request would be answered in about "
                f"{wait:.1f}s, after its deadline; retry later",
                retry_after=wait,
            )
        self._reserved += images

    def release(self, images: int) -> None:
        """Give back a reservation whose images will never be submitted."""
        self._reserved -= images

    async def submit(
        self, tensors: list[np.ndarray], deadline: float, reserved: bool = False
    ) -> Batched:
        """Queue ``tensors`` (one per image); return their logits rows, in order.
        ``reserved``: admitted earlier by :meth:`reserve` (else admitted here)."""
        if reserved:
            self.release(len(tensors))
            if self._closing:
                raise ShuttingDown("the gateway is shutting down; retry on another replica")
        else:
            self.reserve(len(tensors), deadline)
            self.release(len(tensors))
        loop = asyncio.get_running_loop()
        items = [_Item(t, deadline, loop.create_future()) for t in tensors]
        self._pending.extend(items)
        self._metrics.queue_depth.labels(self.model).set(len(self._pending))
        self._wakeup.set()
        submitted = time.perf_counter()
        futures = [it.future for it in items]
        try:
            done, pending = await asyncio.wait(
                futures,
                timeout=max(0.0, deadline - submitted),
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for fut in done:
                if (exc := fut.exception()) is not None:
                    raise exc
            if pending:
                raise DeadlineExceeded("request deadline exceeded before inference finished")
        finally:
            for fut in futures:  # drop what is still queued (deadline, or a client gone)
                if not fut.done():
                    fut.cancel()
                elif not fut.cancelled():
                    fut.exception()  # retrieved: one failure answers the request once
        rows = [fut.result() for fut in futures]
        started = min(it.started for it in items)
        return Batched(rows, started - submitted, max(it.finished for it in items) - started)

    async def _loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._fill()
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _fill(self) -> None:
        """Wait until a full batch is queued or the oldest image has waited max_delay."""
        until = self._pending[0].enqueued + self.max_delay_s
        while len(self._pending) < self.max_batch and not self._closing:
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        now = time.perf_counter()
        while self._pending and len(batch) < self.max_batch:
            it = self._pending.popleft()
            if it.future.done():
                continue  # cancelled: its request has already been answered
            if it.deadline <= now:
                it.future.set_exception(DeadlineExceeded("request deadline exceeded in queue"))
                continue
            batch.append(it)
        self._metrics.queue_depth.labels(self.model).set(len(self._pending))
        return batch

    async def _run(self, batch: list[_Item]) -> None:
        try:
            start = time.perf_counter()
            for it in batch:
                it.started = start
                self._metrics.queue_wait.labels(self.model).observe(start - it.enqueued)
            x = np.stack([it.tensor for it in batch])
            timeout = max(it.deadline for it in batch) - start
            try:
                logits = await self._infer(x, timeout)
            except ServiceError as exc:
                self._metrics.backend_errors.labels(self.model, self._backend, exc.code).inc()
                self._fail(batch, exc)
                return
            except Exception:
                log.exception("backend call for %s failed", self.model)
                self._metrics.backend_errors.labels(self.model, self._backend, "internal").inc()
                self._fail(batch, InternalError())
                return
            finished = time.perf_counter()
            elapsed = finished - start
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
            self._metrics.inference.labels(self.model, self._backend).observe(elapsed)
            self._metrics.batch_size.labels(self.model).observe(len(batch))
            for it, row in zip(batch, logits, strict=True):
                it.finished = finished
                if not it.future.done():
                    it.future.set_result(row)
        finally:
            self._slots.release()

    @staticmethod
    def _fail(batch: list[_Item], exc: ServiceError) -> None:
        for it in batch:
            if not it.future.done():
                it.future.set_exception(exc)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Stop taking requests, run what is queued, then stop."""
        self._closing = True
        self._wakeup.set()
        if self._worker is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._worker), timeout_s)
                if self._running:
                    await asyncio.wait_for(asyncio.gather(*self._running), timeout_s)
            except TimeoutError:
                log.warning("batcher %s: drain timed out", self.model)
                self._worker.cancel()
        while self._pending:  # only after a timeout: answer, never strand
            it = self._pending.popleft()
            if not it.future.done():
                it.future.set_exception(ShuttingDown("the gateway shut down before this ran"))
