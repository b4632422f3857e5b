"""The decode scheduler: decoding workers handed out fairly and never past a deadline,
and (with ``EXCLUSIVE_CPUS``) the process's CPUs shared between decoding and inference.

One set of workers (decoding is CPU work: more workers than cores only adds contention;
they are processes, ``service.dataplane.decode_workers``), but not one FIFO queue: each model has
its own queue of waiting images, and a free worker goes to the next model in turn that has
one. A flood of large images for one model therefore delays another model's image by at
most the decodes already running, never by the whole flood. An image whose request's
deadline has passed is never decoded; a request waiting for a worker gives up at its
deadline.

With ``EXCLUSIVE_CPUS`` the pool also counts the CPUs the process may use, and inference
holds its share while a batch runs (:meth:`DecodePool.cores`: as many as the batch's
intra-op threads). A decode holds one; together they never hold more than there are: an
ONNX Runtime batch split over several threads waits for its slowest thread, and a decoding
worker taking one of its cores stalls the whole batch. A waiting batch goes before waiting
decodes: its images are decoded already, and finishing them is what empties the queue. The
price is that decoding no longer overlaps a batch on all cores; measured on 2 cores it
costs more p99 than the stalls it saves (docs/data-plane.md, Batching and bounds), so it is off by
default and a candidate of ``resnet-serve tune``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from service.errors import DeadlineExceeded


class Workers(Protocol):
    """What does the work the pool schedules: ``count`` workers, each one job at a time."""

    count: int

    def start(self) -> None:
        """Start the workers (on the running loop; they may get ready after)."""
        ...

    def submit(self, job: Any) -> asyncio.Future[Any]:
        """Start ``job`` on an idle worker (the pool never asks for more than ``count`` at
        once); the future ends with the work, and the worker is idle again then."""
        ...

    async def close(self) -> None: ...


class DecodePool:
    def __init__(self, workers: Workers, cpus: int | None = None) -> None:
        """``workers`` (decoding processes); ``cpus`` the CPUs they share with inference
        (default: as many as the workers)."""
        self._workers = workers
        self.workers = workers.count
        self.cpus = cpus or self.workers
        self._free = self.workers
        self._free_cpus = self.cpus
        #: Batches waiting for CPUs, first come first served: (CPUs, grant).
        self._holds: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._queues: dict[str, collections.deque[asyncio.Future[None]]] = {}
        self._turn: collections.deque[str] = collections.deque()  # round-robin order

    def waiting(self, key: str) -> int:
        """Images of ``key`` waiting for a worker."""
        return sum(not f.done() for f in self._queues.get(key, ()))

    @property
    def backlog(self) -> int:
        """Images decoding or waiting to, for every model."""
        return self.workers - self._free + sum(map(self.waiting, self._queues))

    async def run(self, key: str, deadline: float, job: Any) -> Any:
        """Do ``job`` on a worker when ``key``'s turn comes; DeadlineExceeded at
        ``deadline``, whether waiting for a worker or decoding (the worker then finishes
        the work before it is handed on)."""
        loop = asyncio.get_running_loop()
        if self._free > 0 and self._free_cpus > 0 and not self._holds:
            # A worker and a CPU are free, so nothing waits for them (_dispatch would have
            # handed them on): take them without queueing for a turn.
            self._free -= 1
            self._free_cpus -= 1
        else:
            await self._wait_turn(key, deadline)
        if time.perf_counter() >= deadline:
            self._release()
            raise DeadlineExceeded("request deadline exceeded before decoding")
        try:
            work = self._workers.submit(job)
        except BaseException:
            self._release()
            raise
        result: asyncio.Future[Any] = loop.create_future()
        work.add_done_callback(lambda work: self._finished(work, result))
        timer = loop.call_later(deadline - time.perf_counter(), _expire, result)
        try:
            return await result
        finally:
            timer.cancel()

    async def _wait_turn(self, key: str, deadline: float) -> None:
        """Wait for ``key``'s turn at a worker (fair between keys), until ``deadline``."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if key not in self._queues:
            self._queues[key] = collections.deque()
            self._turn.append(key)
        self._queues[key].append(turn)
        self._dispatch()
        granted = False
        try:
            await asyncio.wait_for(turn, max(0.0, deadline - time.perf_counter()))
            granted = True
        except TimeoutError:
            raise DeadlineExceeded("request deadline exceeded waiting to be decoded") from None
        finally:
            if not granted:
                if turn.done() and not turn.cancelled():
                    self._release()  # granted as we left: hand the worker on
                else:
                    turn.cancel()
                    with contextlib.suppress(ValueError):
                        self._queues[key].remove(turn)

    @contextlib.asynccontextmanager
    async def cores(self, n: int) -> AsyncIterator[None]:
        """Hold ``n`` of the CPUs (at most all of them) while the body runs: a batch whose
        inference uses ``n`` threads of this process (0: it runs elsewhere, holds none)."""
        n = min(n, self.cpus)
        if n <= 0:
            yield
            return
        grant: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._holds.append((n, grant))
        self._dispatch()
        try:
            await grant
        except BaseException:
            if grant.done() and not grant.cancelled():
                self._give_back(n)  # granted as its caller left
            else:
                grant.cancel()
                self._dispatch()  # a decode may have been held back for it
            raise
        try:
            yield
        finally:
            self._give_back(n)

    def _give_back(self, n: int) -> None:
        self._free_cpus += n
        self._dispatch()

    def _finished(self, work: asyncio.Future[Any], result: asyncio.Future[Any]) -> None:
        """The worker is free when the work is done, not when its caller stops waiting for
        it (a request past its deadline answers 504 at once; its decode still runs out)."""
        self._release()
        if work.cancelled():
            result.cancel()
            return
        exc = work.exception()  # retrieved even when its caller gave up (result done)
        if result.done():
            return
        if exc is not None:
            result.set_exception(exc)
        else:
            result.set_result(work.result())

    def _release(self) -> None:
        self._free += 1
        self._free_cpus += 1
        self._dispatch()

    def _dispatch(self) -> None:
        """Give free CPUs to waiting batches, in order; then, unless a batch still waits
        for CPUs (it would never find enough free at once), free workers to the waiting
        models in turn."""
        while self._holds:
            n, grant = self._holds[0]
            if grant.done():  # its caller gave up
                self._holds.popleft()
            elif n <= self._free_cpus:
                self._holds.popleft()
                self._free_cpus -= n
                grant.set_result(None)
            else:
                return
        while self._free > 0 and self._free_cpus > 0:
            for _ in range(len(self._turn)):
                key = self._turn[0]
                self._turn.rotate(-1)
                queue = self._queues[key]
                while queue and queue[0].done():  # gave up waiting
                    queue.popleft()
                if queue:
                    self._free -= 1
                    self._free_cpus -= 1
                    queue.popleft().set_result(None)
                    break
            else:
                return

    def start(self) -> None:
        self._workers.start()

    async def close(self) -> None:
        await self._workers.close()


def _expire(result: asyncio.Future[Any]) -> None:
    if not result.done():
        result.set_exception(DeadlineExceeded("request deadline exceeded while decoding"))
