"""Bounded micro-batching: concurrent requests for one model version become one backend
call.

Per version: at most ``max_batch`` images per call, a partial batch waits at most
``max_delay_s`` for company, at most ``max_queue`` images wait at all, and every image
carries its request's deadline (504 at it; an expired image is dropped before it costs
any compute). The :class:`Batcher` holds the queue (earliest deadline first), runs its
loop and the backend calls, and keeps their metrics and traces; what it decides, it asks
two pure objects: its :class:`~service.dataplane.admission.Admission` whether a request
may join the queue (before any work is done for it), and its
:class:`~service.dataplane.batch_policy.BatchPolicy` when a partial batch starts and
which size each batch takes.

Every accepted request gets exactly one answer: a result, or the error of its batch, or
``ShuttingDown`` if the gateway is closing before its batch could run (``close`` first
drains what was queued).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanContext, Tracer

from service.dataplane.admission import Admission
from service.dataplane.batch_policy import BatchPolicy, CostModel, Load
from service.errors import DeadlineExceeded, InternalError, ServiceError, ShuttingDown
from service.observability.metrics import Metrics

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray, float], Awaitable[np.ndarray]]


@dataclass(eq=False)
class _Item:
    tensor: np.ndarray
    deadline: float
    #: The deadline a batch size is chosen for (BatchPolicy.due).
    due: float
    future: asyncio.Future[np.ndarray]
    #: The request's span, when tracing is on: its batch's span is linked to it.
    span: SpanContext | None = None
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


@contextlib.contextmanager
def _traced(
    tracer: Tracer | None, batch: list[_Item], model: str, version: str, backend: str
) -> Iterator[None]:
    """With tracing on: a ``batch`` span, child of the first request in it and linked from
    the others (one batch serves many traces), around an ``infer`` span that is current
    while the backend runs (Triton's call carries it as ``traceparent``)."""
    if tracer is None:
        yield
        return
    spans = list(
        {it.span.span_id: it.span for it in batch if it.span and it.span.is_valid}.values()
    )
    parent = trace.set_span_in_context(trace.NonRecordingSpan(spans[0])) if spans else None
    attributes: dict[str, str | int] = {
        "resnet_serve.model": model,
        "resnet_serve.version": version,
        "resnet_serve.batch_size": len(batch),
    }
    with (
        tracer.start_as_current_span(
            "batch", context=parent, links=[trace.Link(s) for s in spans[1:]], attributes=attributes
        ),
        tracer.start_as_current_span("infer", attributes={"resnet_serve.backend": backend}),
    ):
        yield


class Batcher:
    """One version's micro-batcher (see the module)."""

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
        served_precision: str = "",
        max_inflight: int = 1,
        warm_costs: dict[int, float] | None = None,
        target_s: float | None = None,
        version: str = "",
        tracer: Tracer | None = None,
    ) -> None:
        self.model = model
        self.version = version
        ids = (model, version)  # every metric's first labels: per version, for canaries
        self._infer = infer
        self.policy = BatchPolicy(
            CostModel(warm_costs),
            max_batch=max_batch,
            max_delay_s=max_delay_s,
            max_inflight=max_inflight,
            target_s=target_s,
        )
        self.admission = Admission(model, max_queue, self.policy)
        self._tracer = tracer
        self._metrics = metrics
        self._backend = backend_name
        metrics.queue_capacity.labels(*ids).set(max_queue)
        # This version's series, looked up once (labels() costs more than what is recorded,
        # several times per request); forget_metrics removes the gauges' from the registry.
        self._depth = metrics.queue_depth.labels(*ids)
        self._depth.set(0)
        self._lateness = metrics.queue_lateness.labels(*ids)
        self._queue_wait = metrics.queue_wait.labels(*ids)
        self._inference = metrics.inference.labels(*ids, backend_name, served_precision)
        self._batch_size = metrics.batch_size.labels(*ids)
        # Earliest deadline first: a request admitted with less time left is not pushed back
        # by one that finished decoding sooner (with one timeout for all, this is arrival
        # order). Requests' images stay together: one deadline each.
        self._pending: list[_Item] = []
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_inflight)
        self._running: set[asyncio.Task[None]] = set()
        # Running batch -> (its start, its size).
        self._started: dict[asyncio.Task[None], tuple[float, int]] = {}
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._lateness.set(1.0)
        for size, seconds in self.policy.costs.measured.items():
            metrics.batch_cost.labels(*ids, str(size)).set(seconds)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._loop(), name=f"batcher-{self.model}")

    @property
    def max_batch(self) -> int:
        """The most images one batch may hold."""
        return self.policy.max_batch

    @property
    def running(self) -> int:
        """Batches in the backend now."""
        return len(self._started)

    @property
    def waiting(self) -> int:
        """Images ahead of a new request: queued, and admitted but still decoding."""
        return len(self._pending) + self.admission.reserved

    def load(self) -> Load:
        """What the queue and the backend hold now, for a prediction."""
        return Load(self.waiting, tuple(self._started.values()))

    def admissible(self, images: int, deadline: float, extra_s: float = 0.0) -> None:
        """Raise unless a request of ``images`` images could be taken now
        (:meth:`Admission.check <service.dataplane.admission.Admission.check>`), or
        ShuttingDown once the batcher is closing."""
        self._refuse_if_closing()
        self.admission.check(self.load(), images, deadline, time.perf_counter(), extra_s)

    def reserve(self, images: int, deadline: float, extra_s: float = 0.0) -> None:
        """Admit a request (see :meth:`admissible`) before any work is done for it, and
        hold its place until :meth:`submit` (or :meth:`release`)."""
        self._refuse_if_closing()
        self.admission.reserve(self.load(), images, deadline, time.perf_counter(), extra_s)

    def release(self, images: int) -> None:
        """Give back a reservation (its images will never come, or are being submitted)."""
        self.admission.release(images)
        self._wakeup.set()

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise ShuttingDown("the gateway is shutting down; retry on another replica")

    async def submit(
        self,
        tensors: list[np.ndarray],
        deadline: float,
        reserved: bool = False,
        arrived: float | None = None,
    ) -> Batched:
        """Queue ``tensors`` (one per image); return their logits rows, in order.
        ``reserved``: admitted earlier by :meth:`reserve` (else admitted here). ``arrived``:
        when the request came (default: now), from which the latency target counts."""
        if reserved:
            self.release(len(tensors))
            self._refuse_if_closing()
        else:
            self.reserve(len(tensors), deadline)
            self.release(len(tensors))
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        due = self.policy.due(deadline, arrived or now)
        span = trace.get_current_span().get_span_context() if self._tracer else None
        items = [_Item(t, deadline, due, loop.create_future(), span) for t in tensors]
        predicted = self.policy.expected_wait_s(self.load(), len(items), now)
        at = bisect.bisect_right(self._pending, deadline, key=lambda it: it.deadline)
        self._pending[at:at] = items
        self._depth.set(len(self._pending))
        self._wakeup.set()
        submitted = time.perf_counter()
        futures = [it.future for it in items]
        try:
            done, pending = await asyncio.wait(
                futures,
                timeout=max(0.0, deadline - submitted),
                return_when=asyncio.FIRST_EXCEPTION,
            )
            # Answered or at its deadline (not a client gone, which cuts the wait short).
            self.admission.learn(predicted, time.perf_counter() - submitted)
            self._lateness.set(self.admission.lateness)
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
            self._started[task] = (time.perf_counter(), len(batch))
            task.add_done_callback(self._ran)

    async def _fill(self) -> None:
        """Wait until a full batch is queued or the partial one stops waiting for company
        (:meth:`BatchPolicy.start_by <service.dataplane.batch_policy.BatchPolicy.start_by>`:
        longer while admitted images are still decoding)."""
        oldest = min(it.enqueued for it in self._pending)
        until = self.policy.start_by(oldest, decoding=False)
        burst_until = self.policy.start_by(oldest, decoding=True)
        cap = self.policy.cap
        while len(self._pending) < cap and not self._closing:
            remaining = (burst_until if self.admission.reserved else until) - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        now = time.perf_counter()
        live: list[_Item] = []
        for it in self._pending:
            if it.future.done():
                continue  # cancelled: its request has already been answered
            if it.deadline <= now:
                it.future.set_exception(DeadlineExceeded("request deadline exceeded in queue"))
                continue
            live.append(it)
        size = self.policy.size([it.due for it in live], len(self._started), now)
        batch, self._pending = live[:size], live[size:]
        self._depth.set(len(self._pending))
        return batch

    def _ran(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._started.pop(task, None)

    async def _run(self, batch: list[_Item]) -> None:
        try:
            start = time.perf_counter()
            for it in batch:
                it.started = start
                self._queue_wait.observe(start - it.enqueued)
            x = np.stack([it.tensor for it in batch])
            timeout = max(it.deadline for it in batch) - start
            try:
                with _traced(self._tracer, batch, self.model, self.version, self._backend):
                    logits = await self._infer(x, timeout)
            except ServiceError as exc:
                self._metrics.backend_errors.labels(
                    self.model, self.version, self._backend, exc.code
                ).inc()
                self._fail(batch, exc)
                return
            except Exception:
                log.exception("backend call for %s failed", self.model)
                self._metrics.backend_errors.labels(
                    self.model, self.version, self._backend, "internal"
                ).inc()
                self._fail(batch, InternalError())
                return
            finished = time.perf_counter()
            elapsed = finished - start
            learned = self.policy.costs.observe(len(batch), elapsed)
            self._metrics.batch_cost.labels(self.model, self.version, str(len(batch))).set(learned)
            self._inference.observe(elapsed)
            self._batch_size.observe(len(batch))
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

    def forget_metrics(self) -> None:
        """Drop this version's gauge series (it is no longer served: a stale queue capacity
        or batch cost would read as a live one)."""
        ids = (self.model, self.version)
        for gauge in (
            self._metrics.queue_depth,
            self._metrics.queue_capacity,
            self._metrics.queue_lateness,
        ):
            with contextlib.suppress(KeyError):
                gauge.remove(*ids)
        for size in range(1, self.max_batch + 1):
            with contextlib.suppress(KeyError):
                self._metrics.batch_cost.remove(*ids, str(size))

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
            it = self._pending.pop()
            if not it.future.done():
                it.future.set_exception(ShuttingDown("the gateway shut down before this ran"))
