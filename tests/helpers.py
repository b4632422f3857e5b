"""Test doubles and measurements for the tests: a backend made slow on purpose, a gateway's
metrics read back, the fastest of a few runs (the bound a timed check derives from), a
process's memory, waiting on a state (never sleep-and-hope), an event loop on a virtual
clock. The gateway's process helpers are :mod:`service.host.processes`."""

from __future__ import annotations

import asyncio
import heapq
import re
import threading
import time
from collections.abc import Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from service.backends.base import Backend
from service.model.repository import ModelSpec

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

T = TypeVar("T")


def fastest_of(work: Callable[[], object], runs: int = 3) -> float:
    """Seconds the fastest of ``runs`` calls of ``work`` took. A test that bounds a time
    derives the bound from this, measured on the same machine in the same run: a constant
    tuned to one CPU fails on a slower one (machines here differ by 2-3x)."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best


async def until(check: Callable[[], object], timeout_s: float = 10.0) -> None:
    """Poll ``check`` on the event loop until it is true. The generous timeout is only
    there to end a test whose state is never reached; a verdict never depends on it."""
    deadline = time.perf_counter() + timeout_s
    while not check():
        assert time.perf_counter() < deadline, "state not reached"
        await asyncio.sleep(0.001)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock moves only when nothing is ready to run: then it jumps to
    the next timer instead of waiting for it (asyncio's own tests use such a loop). Code
    that reads the loop's clock (``loop.time()``) and sleeps on it sees exactly the times
    a test scripts, on any machine and under any load; :meth:`advance` is a stall (the
    loop blocked for that long). No I/O: nothing but timers and tasks may be waited on."""

    def __init__(self) -> None:
        super().__init__()
        self._now = 0.0

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def _run_once(self) -> None:
        if not self._ready:  # type: ignore[attr-defined]
            timers = self._scheduled  # type: ignore[attr-defined]
            while timers and timers[0]._cancelled:
                heapq.heappop(timers)._scheduled = False
                self._timer_cancelled_count -= 1  # type: ignore[attr-defined]
            if timers:
                self._now = max(self._now, timers[0]._when)
        super()._run_once()  # type: ignore[misc]


def on_virtual_clock(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a :class:`VirtualClockLoop`."""
    with asyncio.Runner(loop_factory=VirtualClockLoop) as runner:
        return runner.run(main)


class ThreadWorkers:
    """Decoding workers that are threads running callables (``service.dataplane.decode_scheduler.Workers``):
    the pool's scheduling (turns, deadlines, CPUs) tested with jobs that take what a test
    says, apart from the decoding processes."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._executor = ThreadPoolExecutor(count)

    def start(self) -> None: ...

    def submit(self, job: Callable[[], object]) -> asyncio.Future[object]:
        return asyncio.wrap_future(self._executor.submit(job))

    async def close(self) -> None:
        await asyncio.to_thread(self._executor.shutdown, wait=True)


class SlowBackend(Backend):
    """Another backend with ``delay_s`` added to every batch, and each batch's size
    recorded: queues fill and deadlines pass on cue. While ``hold`` (an event, set to begin
    with) is cleared, a batch stays in the backend until it is set again: a test releases
    it once it has seen what it waits for (requests queued behind it)."""

    def __init__(self, inner: Backend, delay_s: float) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.max_inflight_batches = inner.max_inflight_batches
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.hold = threading.Event()
        self.hold.set()

    async def start(self, specs: list[ModelSpec]) -> None:
        await self.inner.start(specs)

    async def load(self, spec: ModelSpec) -> None:
        await self.inner.load(spec)

    async def unload(self, spec: ModelSpec) -> None:
        await self.inner.unload(spec)

    def warm_costs(self, spec: ModelSpec) -> dict[int, float]:
        return {n: t + self.delay_s for n, t in self.inner.warm_costs(spec).items()}

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        self.batches.append(len(batch))
        await asyncio.sleep(self.delay_s)
        while not self.hold.is_set():  # set from the test's thread
            await asyncio.sleep(0.002)
        return await self.inner.infer(spec, batch, timeout_s)

    def is_ready(self) -> bool:
        return self.inner.is_ready()

    async def close(self) -> None:
        await self.inner.close()


def scrape(url: str, name: str, **labels: str) -> float:
    """The sum of a gateway's /metrics samples ``name`` whose labels include ``labels``
    (``scrape(url, "resnet_serve_requests_total", outcome="overloaded")``), 0 if none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return _sum(text_string_to_metric_families(httpx.get(url + "/metrics").text), name, labels)


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """:func:`scrape` on an in-process registry (a gateway run by a test client)."""
    return _sum(registry.collect(), name, labels)


def _sum(families: Iterable[Metric], name: str, labels: dict[str, str]) -> float:
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def doc_sections(root: Path) -> set[str]:
    """``docs/<page>.md`` and ``docs/<page>.md#<anchor>`` for every page of the site and
    every heading in it (anchors as mkdocs makes them: Python-Markdown's toc slugify)."""
    from markdown.extensions.toc import slugify

    found = set()
    for page in sorted((root / "docs").glob("*.md")):
        name = f"docs/{page.name}"
        found.add(name)
        fenced = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and (m := re.match(r"#+ (.+)", line)):
                found.add(f"{name}#{slugify(m.group(1), '-')}")
    return found
