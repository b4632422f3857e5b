"""The highest arrival rate a target sustains within a p99 budget, with no errors (MLPerf's
Server scenario asks the same question of a system under test).

1. One client, closed loop: the unloaded latency. If its p99 is already over the budget,
   no rate will do, and the search says so.
2. A closed loop at a high concurrency: the throughput ceiling, an upper bound for any rate.
3. Bisection on the rate between what passed and what failed, each probe an open-loop step
   (Poisson arrivals), until the bracket is within ``tolerance`` of the answer or the
   probes run out.

A p99 resting on few requests is a guess: the result says how many requests the best
step's p99 rests on, and how many of them lay above it.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from service.tools.bench.loops import Step

#: Fewer than this many requests above the p99 (i.e. under 1,000 requests in all) and the
#: p99 is flagged as a rough estimate.
CONFIDENT_TAIL = 10


def passes(step: Step, budget_ms: float) -> bool:
    return step.ok > 0 and not step.errors and step.latency_ms(99) <= budget_ms


@dataclass
class SloResult:
    budget_ms: float
    best: Step | None
    probes: list[Step]
    reason: str

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"p99_budget_ms": self.budget_ms, "reason": self.reason}
        if self.best is None:
            out["max_rate_per_s"] = 0.0
            return out
        b = self.best
        tail = b.ok - math.ceil(b.ok * 0.99)
        out.update(
            {
                "max_rate_per_s": round(b.load, 2),
                "images_per_s": round(b.images_per_s, 2),
                "p99_ms": round(b.latency_ms(99), 2),
                "requests": b.requests,
                "requests_above_p99": tail,
                "confidence": "ok"
                if tail >= CONFIDENT_TAIL
                else f"low (fewer than {CONFIDENT_TAIL} requests above the p99: run longer)",
            }
        )
        return out


async def search(
    closed: Callable[[int], Awaitable[Step]],
    open_: Callable[[float], Awaitable[Step]],
    budget_ms: float,
    tolerance: float = 0.05,
    max_probes: int = 8,
    ceiling_clients: int = 16,
) -> SloResult:
    """``closed(clients)`` and ``open_(rate)`` each run one step and return it."""
    unloaded = await closed(1)
    probes = [unloaded]
    if not passes(unloaded, budget_ms):
        why = (
            f"errors {unloaded.errors}"
            if unloaded.errors or not unloaded.ok
            else f"one request at a time already has p99 {unloaded.latency_ms(99):.1f} ms"
        )
        return SloResult(budget_ms, None, probes, f"no rate meets the budget: {why}")
    ceiling = await closed(ceiling_clients)
    probes.append(ceiling)
    # Bracket: `lo` passed (0: nothing yet), `hi` failed or is beyond what the target can
    # serve (the ceiling plus 10 %). First probe just under the ceiling; halve while nothing
    # has passed (a tight budget may allow a small fraction of it); then bisect.
    capacity = max(ceiling.requests_per_s, unloaded.requests_per_s)
    good: Step | None = None
    lo, hi = 0.0, capacity * 1.1
    rate = round(capacity * 0.9, 2)
    for _ in range(max_probes):
        step = await open_(rate)
        probes.append(step)
        if passes(step, budget_ms):
            good, lo = step, rate
        else:
            hi = rate
        if good and hi - lo <= tolerance * lo:
            break
        # Two decimals: a rate a person can read back and rerun.
        rate = round((lo + hi) / 2 if good else hi / 2, 2)
    if good is None:
        return SloResult(
            budget_ms, None, probes, f"no probed rate down to {hi:.2f}/s met the budget"
        )
    return SloResult(
        budget_ms,
        good,
        probes,
        f"highest passing rate; the next failed at {hi:.2f}/s"
        if hi - lo <= tolerance * lo
        else f"probes used up with the bracket at {lo:.2f}-{hi:.2f}/s",
    )
