"""CPU time, not wall time: what a server's process tree spent (from /proc) and what one
piece of work costs this thread. The machines are shared; CPU seconds are what a noisy
neighbour or a busy load generator changes least."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deploy.benchmarks.common import NAME
from service.tools.bench.loops import Bounds, Step, closed_loop
from service.tools.bench.targets import make_target


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every process under it, from /proc: what
    the server itself spent, whatever the wall clock or the load generator did."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


def cpu_ms_of(work: Callable[[], Any], runs: int) -> float:
    """This thread's CPU milliseconds for one ``work()``, the fastest of ``runs``."""
    best = float("inf")
    for _ in range(runs):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
    return best * 1000


def server_cpu_per_request(
    pid: int, url: str, body: bytes, seconds: float, model: str = NAME
) -> dict[str, Any]:
    """16 closed-loop REST clients (``service.tools.bench``) for ``seconds`` after 2 s of warm-up:
    the server's CPU milliseconds per answered request, from /proc, and its throughput."""

    async def step() -> tuple[Step, float]:
        target = make_target("rest", url, model, [[body]])
        await target.open()
        cpu: list[float] = []

        async def window_opens() -> None:
            cpu.append(process_cpu_s(pid))

        try:
            result = await closed_loop(target, 16, Bounds(seconds, 2.0), before_window=window_opens)
        finally:
            await target.close()
        return result, process_cpu_s(pid) - cpu[0]

    result, cpu_s = asyncio.run(step())
    return {
        "cpu_ms_per_request": round(cpu_s * 1000 / max(result.ok, 1), 2),
        "requests_per_s": round(result.ok / result.duration_s, 1),
        "statuses": result.statuses,
    }
