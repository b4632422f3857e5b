"""The ideal server: what latency queueing alone costs under a given arrival schedule.

Under Poisson arrivals some requests wait even on a server that costs nothing beyond its
model: they arrive while a batch is running. :func:`ideal_latencies_s` replays an arrival
schedule (the one :func:`service.tools.bench.loops.poisson_schedule` gives the open loop
for a seed) through such a server, a batching queue with deterministic service times from
the bare model's measured batch costs. A gateway's p99 under the very same arrivals, set
against the ideal's, says how much of the tail the serving adds and how much any server
with this model on this machine would have: ``make bench``'s tail phase reports that
ratio.
"""

from __future__ import annotations

from collections.abc import Callable


def ideal_latencies_s(
    arrivals: list[float], cost: Callable[[int], float], max_batch: int
) -> list[float]:
    """Each request's latency on an ideal server under the same ``arrivals``: no overhead
    at all, first come first served, and whenever it is free it takes up to ``max_batch``
    of the requests that have arrived, each batch of n costing ``cost(n)`` (the bare
    model's, measured in the same run)."""
    latencies: list[float] = []
    free_at, i = 0.0, 0
    while i < len(arrivals):
        start = max(free_at, arrivals[i])
        j = i + 1
        while j < len(arrivals) and j - i < max_batch and arrivals[j] <= start:
            j += 1
        free_at = start + cost(j - i)
        latencies += [free_at - at for at in arrivals[i:j]]
        i = j
    return latencies
