"""Test doubles: decoding workers that are threads, a backend made slow (or held) on
purpose."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from service.backends.base import Backend
from service.host.processes import wait_until
from service.model.repository import ModelSpec


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
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.hold = threading.Event()
        self.hold.set()

    @property  # type: ignore[override]
    def max_inflight_batches(self) -> int:
        """The inner backend's, read when asked: OpenVINO sizes itself as it starts."""
        return self.inner.max_inflight_batches

    async def start(self, specs: list[ModelSpec]) -> None:
        await self.inner.start(specs)

    async def load(self, spec: ModelSpec) -> None:
        await self.inner.load(spec)

    async def unload(self, spec: ModelSpec) -> None:
        await self.inner.unload(spec)

    def warm_costs(self, spec: ModelSpec) -> dict[int, float]:
        return {n: t + self.delay_s for n, t in self.inner.warm_costs(spec).items()}

    def served_precision(self, spec: ModelSpec) -> str:
        return self.inner.served_precision(spec)

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

    @contextmanager
    def holding(
        self, first: Callable[[], object], *behind: Callable[[], object]
    ) -> Iterator[list[Future[object]]]:
        """Call ``first`` (a request, from a thread) until its batch is in this backend,
        held there, then ``behind``: inside the block they meet the busy model however
        late their threads run (the test waits there on what it expects: requests queued,
        refusals answered), not within a batch delay a busy machine may miss. Leaving
        releases the batch and waits for every call, re-raising a call's failure."""
        started = len(self.batches)
        futures: list[Future[object]] = []
        self.hold.clear()
        with ThreadPoolExecutor(1 + len(behind)) as pool:
            try:
                futures.append(pool.submit(first))
                wait_until(lambda: len(self.batches) > started, 30, "the held batch never started")
                futures += [pool.submit(call) for call in behind]
                yield futures
            finally:
                self.hold.set()
        for future in futures:
            future.result()
