"""The loops and what one step of a load test measured.

Closed loop: N clients, each sending its next request when the last one is answered
(throughput at a concurrency). Open loop: requests sent at Poisson-distributed times at a
rate, whatever the server's speed; each latency is measured from the request's *scheduled*
send time, so a client that falls behind (or a server that makes it fall behind) cannot
hide the queueing from the percentiles (coordinated omission).

Each step has a warm-up (its requests are sent and answered, never recorded), then the
measured window; the step waits for every request it sent, so what the server counted and
what the report counts are the same requests. Latencies go into an HDR histogram (1 µs to
10 min, 3 significant digits).

Every time is read from the event loop's clock (:func:`now`), the one its sleeps are
scheduled on: a loop on a virtual clock (the tests') runs a schedule exactly.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from service.tools.bench.targets import Answer, Target

#: Open loop: most requests in flight at once. Past it a request is not sent but counted
#: as "client_overload" (an error): the server is far past what it can take.
MAX_IN_FLIGHT = 4096
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def now() -> float:
    """Seconds on the running event loop's clock (monotonic; what ``asyncio.sleep`` waits on)."""
    return asyncio.get_running_loop().time()


@dataclass
class Step:
    """What one step measured."""

    mode: str  # "closed" or "open"
    load: float  # clients (closed) or requests/s (open)
    images_per_request: int
    duration_s: float = 0.0
    #: Latencies by answer (microseconds): the successful ones make the percentiles; a
    #: fast refusal must not flatter them, and is measured on its own (service.tools.bench
    #: callers ask for a status's percentile).
    histograms: dict[str, HdrHistogram] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    ok: int = 0
    #: Seconds of CPU this process used during the window, per second of the window
    #: (1.0 = one core busy): the client's own cost.
    client_cpu: float = 0.0
    #: The gateway's own account of the window (service.tools.bench.gateway_metrics), if it was scraped.
    server: dict[str, Any] = field(default_factory=dict)

    def record(self, answer: Answer, latency_s: float) -> None:
        self.statuses[answer.status] = self.statuses.get(answer.status, 0) + 1
        self.ok += answer.ok
        hist = self.histograms.get(answer.status)
        if hist is None:  # 1 µs to 10 min, 3 significant digits
            hist = self.histograms[answer.status] = HdrHistogram(1, 600_000_000, 3)
        hist.record_value(min(600_000_000, max(1, round(latency_s * 1e6))))

    @property
    def histogram(self) -> HdrHistogram | None:
        """The successful requests' latencies."""
        return self.histograms.get("200") or self.histograms.get("OK")

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def errors(self) -> dict[str, int]:
        return {s: n for s, n in self.statuses.items() if s not in ("200", "OK")}

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.duration_s if self.duration_s else 0.0

    @property
    def images_per_s(self) -> float:
        return self.requests_per_s * self.images_per_request

    def latency_ms(self, percentile: float, status: str | None = None) -> float:
        """Latency at ``percentile`` of the successful requests (or of the answers with
        ``status``); NaN if there were none."""
        hist = self.histograms.get(status) if status else self.histogram
        if hist is None or not hist.get_total_count():
            return float("nan")
        return float(hist.get_value_at_percentile(percentile)) / 1000

    def summary(self) -> dict[str, Any]:
        lat = {f"p{p:g}": round(self.latency_ms(p), 2) for p in PERCENTILES}
        if self.histogram:
            lat["mean"] = round(self.histogram.get_mean_value() / 1000, 2)
            lat["max"] = round(self.histogram.get_max_value() / 1000, 2)
        return {
            "mode": self.mode,
            ("concurrency" if self.mode == "closed" else "rate_per_s"): self.load,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            # How fast each kind of error came back (a 503 should be instant).
            "error_p50_ms": {e: round(self.latency_ms(50, e), 2) for e in self.errors},
            "requests_per_s": round(self.requests_per_s, 2),
            "images_per_s": round(self.images_per_s, 2),
            "latency_ms": lat,
            "client_cpu": round(self.client_cpu, 3),
            "server": self.server,
        }


@dataclass(frozen=True)
class Bounds:
    duration_s: float
    warmup_s: float = 0.0
    #: At most this many requests in the measured window (the warm-up's come on top).
    max_requests: int = 1_000_000


Progress = Callable[[Step, float, int], None]  # (step, seconds into the window, sent)


class _Window:
    """The measured window's clock and counters, shared by the loops."""

    def __init__(self, step: Step, bounds: Bounds, progress: Progress | None) -> None:
        self.step = step
        self.bounds = bounds
        self.progress = progress
        self.sent = 0
        self.start = self.end = self.last_answer = 0.0
        self._cpu = 0.0
        self._ticker: asyncio.Task[None] | None = None

    def open(self) -> None:
        self.start = now()
        self.end = self.start + self.bounds.duration_s
        self._cpu = time.process_time()
        if self.progress:
            self._ticker = asyncio.create_task(self._tick())

    def more(self) -> bool:
        return now() < self.end and self.sent < self.bounds.max_requests

    def close(self, drained: bool = False) -> None:
        elapsed = now() - self.start
        if drained:
            # Closed loop: the requests still out when the window ends are answered and
            # counted, so the rate is over the time the server took for them all (over
            # the window alone it is high by clients / duration: +27 % at 16 clients and
            # 3 s). Up to the last answer: pauses for Retry-After after it are not work.
            self.step.duration_s = max(self.last_answer - self.start, 1e-9)
        else:
            # Open loop: the rate is the schedule's, over the window (a window cut short
            # by max_requests is as long as it really was).
            self.step.duration_s = min(elapsed, self.bounds.duration_s)
        self.step.client_cpu = (time.process_time() - self._cpu) / max(elapsed, 1e-9)
        if self._ticker:
            self._ticker.cancel()

    async def _tick(self) -> None:
        assert self.progress
        while True:
            await asyncio.sleep(1.0)
            self.progress(self.step, now() - self.start, self.sent)


async def closed_loop(
    target: Target,
    clients: int,
    bounds: Bounds,
    progress: Progress | None = None,
    honor_retry_after: bool = False,
    before_window: Callable[[], Any] | None = None,
) -> Step:
    """``clients`` concurrent clients. ``honor_retry_after``: after a refusal, a client
    waits what the server asked, jittered by ±50 % as retry policies do (clients refused
    together do not come back together)."""
    step = Step("closed", clients, target.images_per_request)
    rng = random.Random(0)

    async def client(index: int, until: Callable[[], bool], window: _Window | None) -> None:
        i = index
        while until():
            if window:
                window.sent += 1
            t0 = now()
            answer = await target.send(i)
            if window:
                window.last_answer = now()
                step.record(answer, window.last_answer - t0)
            i += clients
            if honor_retry_after and answer.retry_after:
                await asyncio.sleep(answer.retry_after * rng.uniform(0.5, 1.5))

    if bounds.warmup_s > 0:
        warm_end = now() + bounds.warmup_s
        await asyncio.gather(*(client(n, lambda: now() < warm_end, None) for n in range(clients)))
    if before_window:
        await before_window()
    window = _Window(step, bounds, progress)
    window.open()
    await asyncio.gather(*(client(n, window.more, window) for n in range(clients)))
    window.close(drained=True)
    return step


def poisson_schedule(rate_per_s: float, duration_s: float, seed: int = 0) -> list[float]:
    """The arrival times (seconds from the window's opening) :func:`open_loop` sends in a
    window of ``duration_s`` without warm-up, for ``seed``: what a simulation of another
    server under the same arrivals needs."""
    rng, at, times = random.Random(seed), 0.0, []
    while at < duration_s:
        times.append(at)
        at += rng.expovariate(rate_per_s)
    return times


async def open_loop(
    target: Target,
    rate_per_s: float,
    bounds: Bounds,
    progress: Progress | None = None,
    seed: int = 0,
    before_window: Callable[[], Any] | None = None,
) -> Step:
    """Poisson arrivals at ``rate_per_s`` (exponential gaps, seeded: the same schedule for
    the same seed), latency from each request's scheduled time."""
    step = Step("open", rate_per_s, target.images_per_request)
    rng = random.Random(seed)
    in_flight: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: float, window: _Window | None) -> None:
        answer = await target.send(i)
        if window:
            step.record(answer, now() - scheduled)

    async def arrivals(
        start: float, until: Callable[[float], bool], window: _Window | None
    ) -> None:
        """Send every arrival scheduled from ``start`` before ``until`` says stop (by its
        scheduled time, not the clock: the schedule is the seeded one, whatever the loop's
        delays; the window's starts when it opens, so its last arrival is never lost to
        the moment between opening it and reading the clock here)."""
        i = 0
        next_at = start
        while until(next_at):
            delay = next_at - now()
            if delay > 0:
                await asyncio.sleep(delay)
            if window:
                window.sent += 1
            if len(in_flight) >= MAX_IN_FLIGHT:
                if window:
                    step.record(Answer("client_overload", False), 0.0)
            else:
                task = asyncio.create_task(one(i, next_at, window))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            i += 1
            next_at += rng.expovariate(rate_per_s)
        if in_flight:
            await asyncio.gather(*in_flight)

    if bounds.warmup_s > 0:
        warm_start = now()
        warm_end = warm_start + bounds.warmup_s
        await arrivals(warm_start, lambda at: at < warm_end, None)
    if before_window:
        await before_window()
    window = _Window(step, bounds, progress)
    window.open()
    await arrivals(
        window.start, lambda at: at < window.end and window.sent < bounds.max_requests, window
    )
    window.close()
    return step


def print_progress(step: Step, elapsed: float, sent: int) -> None:
    """One line on stderr, rewritten in place: where the step is and how it is going."""
    load = f"{step.load:g} clients" if step.mode == "closed" else f"{step.load:g}/s"
    p99 = step.latency_ms(99)
    errors = sum(step.errors.values())
    sys.stderr.write(
        f"\r  {load}: {elapsed:5.1f}s  sent {sent}  ok {step.ok}  errors {errors}  "
        f"p99 {p99:.1f} ms   "
    )
    sys.stderr.flush()
