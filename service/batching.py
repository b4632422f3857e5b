"""Bounded micro-batching: concurrent requests for one model become one backend call.

Per model: at most ``max_batch`` images per call, a partial batch waits at most
``max_delay_s`` for company, at most ``max_queue`` images wait at all, and every image
carries its request's deadline (504 at it; an expired image is dropped before it costs
any compute).

Each batch's size is chosen, not taken: from the queue (earliest deadline first), the cost
model and the deadlines, the batcher spreads the queue over the batch slots free now (one
slot: the largest batch, which clears a queue soonest on a CPU or a GPU), and takes a
smaller one where that keeps more deadlines: the size whose predicted schedule misses the
fewest deadlines that some batch could keep, the largest on a tie. With a
latency target (``target_s``) a request's deadline for that choice is its
arrival plus the target, and no batch costs more than half the target (a request that
arrives as a batch starts waits for it, then runs in the next).

Admission comes before any work: :meth:`Batcher.reserve` refuses a request at once (503 +
Retry-After) when the queue is full or when the queue ahead of it could not be worked off
before its deadline, and holds its place while its images are decoded. The prediction is
checked against what happens: where queued images wait longer than predicted (batches
start late on a busy event loop, a shared CPU), admission's slack grows by that ratio.

Every accepted request gets exactly one answer: a result, or the error of its batch, or
``ShuttingDown`` if the gateway is closing before its batch could run (``close`` first
drains what was queued).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
from opentelemetry import trace
from opentelemetry.trace import SpanContext, Tracer

from service.errors import DeadlineExceeded, InternalError, Overloaded, ServiceError, ShuttingDown
from service.metrics import Metrics

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray, float], Awaitable[np.ndarray]]
ADMISSION_SLACK = 1.25


class CostModel:
    """What a batch of n images costs the backend: measured at warm-up where the backend
    can (its timed runs), then learned from live batches (an EWMA per batch size); a size
    never seen is interpolated between the nearest seen ones (linear in n, which is how a
    CPU's batch cost grows)."""

    def __init__(self, warm: dict[int, float] | None = None) -> None:
        self._seconds: dict[int, float] = dict(warm or {})

    def observe(self, size: int, seconds: float) -> float:
        """Learn from a batch of ``size`` that took ``seconds``; the size's new estimate."""
        if size in self._seconds:
            self._seconds[size] += 0.2 * (seconds - self._seconds[size])
        else:
            self._seconds[size] = seconds
        return self._seconds[size]

    @property
    def measured(self) -> dict[int, float]:
        """Seconds per batch size, for the sizes measured so far."""
        return dict(sorted(self._seconds.items()))

    def cost(self, size: int) -> float:
        """Predicted seconds for a batch of ``size`` (0.05 per batch before any is seen)."""
        if size in self._seconds:
            return self._seconds[size]
        if not self._seconds:
            return 0.05
        below = [n for n in self._seconds if n < size]
        above = [n for n in self._seconds if n > size]
        if below and above:
            lo, hi = max(below), min(above)
            t_lo, t_hi = self._seconds[lo], self._seconds[hi]
            return t_lo + (t_hi - t_lo) * (size - lo) / (hi - lo)
        near = max(below) if below else min(above)
        return self._seconds[near] * size / near  # proportional beyond what was seen

    def work_s(self, images: int, batch: int) -> float:
        """Seconds of backend time for ``images`` images in full batches of ``batch`` (the
        rest last)."""
        full, rest = divmod(images, batch)
        return full * self.cost(batch) + (self.cost(rest) if rest else 0.0)


@dataclass(eq=False)
class _Item:
    tensor: np.ndarray
    deadline: float
    #: The deadline a batch size is chosen for: the request's, or sooner with a target.
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
        warm_costs: dict[int, float] | None = None,
        target_s: float | None = None,
        version: str = "",
        tracer: Tracer | None = None,
    ) -> None:
        self.model = model
        self.version = version
        ids = (model, version)  # every metric's first labels: per version, for canaries
        self._infer = infer
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.target_s = target_s
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
        self._inference = metrics.inference.labels(*ids, backend_name)
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
        self._max_inflight = max_inflight
        self._reserved = 0  # images admitted, still being decoded
        # Averages of the seconds queued images waited for their results, and of what
        # wait_s predicted for them when they were queued: their ratio is the lateness.
        self._waited = self._predicted = 0.0
        self._lateness.set(1.0)
        self.costs = CostModel(warm_costs)
        for size, seconds in self.costs.measured.items():
            metrics.batch_cost.labels(*ids, str(size)).set(seconds)

    def start(self) -> None:
        self._worker = asyncio.create_task(self._loop(), name=f"batcher-{self.model}")

    @property
    def cap(self) -> int:
        """The largest batch the batcher starts: ``max_batch``, or with a latency target the
        largest whose predicted cost is at most half of it (never below 1)."""
        if self.target_s is None:
            return self.max_batch
        fits = [n for n in range(1, self.max_batch + 1) if self.costs.cost(n) <= self.target_s / 2]
        return max(fits, default=1)

    @property
    def running(self) -> int:
        """Batches in the backend now."""
        return len(self._started)

    @property
    def waiting(self) -> int:
        """Images ahead of a new request: queued, and admitted but still decoding."""
        return len(self._pending) + self._reserved

    def wait_s(self, images: int) -> float:
        """Predicted time until ``images`` more images (after those waiting) are done: the
        rest of the batches running now, then full batches, then the batch holding the last
        of them: full as well if it must wait (later arrivals fill it up meanwhile), only
        as large as it is if it can start at once."""
        now = time.perf_counter()
        running = max(
            (self.costs.cost(n) - (now - t) for t, n in self._started.values()), default=0.0
        )
        cap = self.cap
        full, rest = divmod(self.waiting + images, cap)
        last = 0.0
        if rest:
            waits = bool(self._started) or full > 0
            last = self.costs.cost(cap if waits else rest)
        ahead = (full * self.costs.cost(cap) + last) / self._max_inflight
        return max(0.0, running) + ahead

    @property
    def lateness(self) -> float:
        """How much longer queued images waited than predicted (1: as predicted)."""
        return self._waited / self._predicted if self._predicted > 0 else 1.0

    def _learn_wait(self, predicted: float, waited: float) -> None:
        self._predicted += 0.1 * (predicted - self._predicted)
        self._waited += 0.1 * (waited - self._waited)
        self._lateness.set(self.lateness)

    def admissible(self, images: int, deadline: float, extra_s: float = 0.0) -> None:
        """Raise unless a request of ``images`` images could be taken now: Overloaded (503 +
        Retry-After) if the queue is full or what waits ahead of it (plus ``extra_s`` of its
        own work before the queue) cannot be done by ``deadline``; DeadlineExceeded (504,
        at once) if not even an idle model could make the deadline."""
        if self._closing:
            raise ShuttingDown("the gateway is shutting down; retry on another replica")
        if self.waiting + images > self.max_queue:
            raise Overloaded(
                f"model {self.model!r} has {self.waiting} images waiting (limit "
                f"{self.max_queue}); retry later",
                retry_after=self.wait_s(0),
            )
        wait = self.wait_s(images) + extra_s
        # 25% of slack: the prediction is an average, a request admitted at the limit of its
        # deadline would be answered 504 by any batch that runs a little late; more where
        # queued images have been waiting longer than predicted (never less: a pessimistic
        # prediction only refuses early).
        left = deadline - time.perf_counter()
        if wait * ADMISSION_SLACK * max(1.0, self.lateness) <= left:
            return
        alone = self.costs.work_s(images, self.cap) + extra_s
        if alone * ADMISSION_SLACK > left:  # not even an idle model: retrying cannot help
            raise DeadlineExceeded(
                f"the request's deadline ({max(left, 0) * 1000:.0f} ms from now) is shorter "
                f"than model {self.model!r} needs (about {alone * 1000:.0f} ms)"
            )
        raise Overloaded(
            f"model {self.model!r} is busy: this request would be answered in about "
            f"{wait:.1f}s, after its deadline; retry later",
            retry_after=wait,
        )

    def reserve(self, images: int, deadline: float, extra_s: float = 0.0) -> None:
        """Admit a request (see :meth:`admissible`) before any work is done for it, and
        hold its place until :meth:`submit` (or :meth:`release`)."""
        self.admissible(images, deadline, extra_s)
        self._reserved += images

    def release(self, images: int) -> None:
        """Give back a reservation (its images will never come, or are being submitted)."""
        self._reserved -= images
        self._wakeup.set()

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
            if self._closing:
                raise ShuttingDown("the gateway is shutting down; retry on another replica")
        else:
            self.reserve(len(tensors), deadline)
            self.release(len(tensors))
        loop = asyncio.get_running_loop()
        due = deadline
        if self.target_s is not None:
            due = min(deadline, (arrived or time.perf_counter()) + self.target_s)
        span = trace.get_current_span().get_span_context() if self._tracer else None
        items = [_Item(t, deadline, due, loop.create_future(), span) for t in tensors]
        predicted = self.wait_s(len(items))
        if not self._started and self.waiting + len(items) < self.cap:
            predicted += self.max_delay_s  # a partial batch waits for company first
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
            self._learn_wait(predicted, time.perf_counter() - submitted)
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
        """Wait until a full batch is queued or the oldest image has waited max_delay. While
        admitted images are still decoding (a burst), wait for them up to a quarter of what
        a batch costs: started without them, they would wait for a whole batch."""
        oldest = min(it.enqueued for it in self._pending)
        until = oldest + self.max_delay_s
        cap = self.cap
        coming_until = oldest + self.costs.cost(cap) / 4
        while len(self._pending) < cap and not self._closing:
            remaining = (
                max(until, coming_until) if self._reserved else until
            ) - time.perf_counter()
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
        cap = self.cap
        size = self._size(live[: 2 * cap], len(live), cap, now) if live else 0
        batch, self._pending = live[:size], live[size:]
        self._depth.set(len(self._pending))
        return batch

    def _size(self, head: list[_Item], queued: int, cap: int, now: float) -> int:
        """How many of ``head`` (the next two batches' worth of the ``queued`` live images,
        earliest deadline first; ``cap``: :attr:`cap`) the next batch takes. At most the queue spread over the
        batch slots free now (one slot: a full batch, which clears a queue soonest when a
        batch of n costs less than n batches of one); of those sizes, the one whose
        predicted schedule (this batch, then full batches on the free slots) misses the
        fewest deadlines that some batch could keep; on a tie the largest. A size that
        keeps one tight deadline by delaying the rest past theirs is not better: under
        overload that trade cascades into 504s for requests admission promised a place."""
        free = max(1, self._max_inflight - len(self._started))
        full = self.costs.cost(cap)
        keepable = now + self.costs.cost(1)
        best, fewest = 1, math.inf
        for n in range(1, min(cap, len(head), math.ceil(queued / free)) + 1):
            slots = [now] * free
            slots[0] = now + self.costs.cost(n)
            misses = sum(slots[0] > it.due >= keepable for it in head[:n])
            for start in range(n, len(head), cap):
                k = slots.index(min(slots))
                slots[k] += full
                chunk = head[start : start + cap]
                misses += sum(slots[k] > it.due >= keepable for it in chunk)
            if misses <= fewest:
                best, fewest = n, misses
        return best

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
                with self._traced(batch):
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
            learned = self.costs.observe(len(batch), elapsed)
            self._metrics.batch_cost.labels(self.model, self.version, str(len(batch))).set(learned)
            self._inference.observe(elapsed)
            self._batch_size.observe(len(batch))
            for it, row in zip(batch, logits, strict=True):
                it.finished = finished
                if not it.future.done():
                    it.future.set_result(row)
        finally:
            self._slots.release()

    @contextlib.contextmanager
    def _traced(self, batch: list[_Item]) -> Iterator[None]:
        """With tracing on: a ``batch`` span, child of the first request in it and linked
        from the others (one batch serves many traces), around an ``infer`` span that is
        current while the backend runs (Triton's call carries it as ``traceparent``)."""
        if self._tracer is None:
            yield
            return
        spans = list(
            {it.span.span_id: it.span for it in batch if it.span and it.span.is_valid}.values()
        )
        parent = trace.set_span_in_context(trace.NonRecordingSpan(spans[0])) if spans else None
        attributes: dict[str, str | int] = {
            "resnet_serve.model": self.model,
            "resnet_serve.version": self.version,
            "resnet_serve.batch_size": len(batch),
        }
        with (
            self._tracer.start_as_current_span(
                "batch",
                context=parent,
                links=[trace.Link(s) for s in spans[1:]],
                attributes=attributes,
            ),
            self._tracer.start_as_current_span(
                "infer", attributes={"resnet_serve.backend": self._backend}
            ),
        ):
            yield

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
