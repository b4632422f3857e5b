"""Time in tests without sleep-and-hope: waiting on a state, an event loop on a virtual
clock, the fastest of a few runs (the bound a timed check derives from)."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    pass


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
