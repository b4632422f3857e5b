"""How one version's batches are planned: what each batch size costs, the largest batch,
when a partial batch stops waiting for company, which size the next batch takes, and how
long a new request would wait.

Each batch's size is chosen, not taken: from the queue (earliest deadline first), the cost
model and the deadlines, the policy spreads the queue over the batch slots free now (one
slot: the largest batch, which clears a queue soonest on a CPU or a GPU), and takes a
smaller one where that keeps more deadlines: the size whose predicted schedule misses the
fewest deadlines that some batch could keep, the largest on a tie. With a latency target
(``target_s``) a request's deadline for that choice is its arrival plus the target, and no
batch costs more than half the target (a request that arrives as a batch starts waits for
it, then runs in the next).

Pure planning: every time is passed in (``time.perf_counter()`` values), nothing here
waits or reads a clock; the batcher (:mod:`service.dataplane.batching`) does both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Load:
    """A version's batcher at one moment, as every prediction reads it."""

    #: Images ahead of a new request: queued, and admitted but still decoding.
    waiting: int
    #: ``(start, size)`` of each batch in the backend now.
    running: tuple[tuple[float, int], ...] = ()


class BatchPolicy:
    """The plan of one version's batches (see the module): at most ``max_batch`` images a
    batch, ``max_inflight`` batches in the backend at once, a partial batch waits at most
    ``max_delay_s`` for company, and with ``target_s`` no batch costs more than half of it."""

    def __init__(
        self,
        costs: CostModel,
        *,
        max_batch: int,
        max_delay_s: float,
        max_inflight: int = 1,
        target_s: float | None = None,
    ) -> None:
        self.costs = costs
        self.max_batch = max_batch
        self.max_delay_s = max_delay_s
        self.max_inflight = max_inflight
        self.target_s = target_s

    @property
    def cap(self) -> int:
        """The largest batch started: ``max_batch``, or with a latency target the largest
        whose predicted cost is at most half of it (never below 1)."""
        if self.target_s is None:
            return self.max_batch
        fits = [n for n in range(1, self.max_batch + 1) if self.costs.cost(n) <= self.target_s / 2]
        return max(fits, default=1)

    def due(self, deadline: float, arrived: float) -> float:
        """The deadline a batch size is chosen for: the request's, or with a latency target
        its arrival plus the target where that is sooner."""
        if self.target_s is None:
            return deadline
        return min(deadline, arrived + self.target_s)

    def start_by(self, oldest: float, decoding: bool) -> float:
        """When a partial batch whose oldest image was queued at ``oldest`` stops waiting
        for company: ``max_delay_s`` after it. While admitted images are still decoding (a
        burst), up to a quarter of what a full batch costs if that is later: started
        without them, they would wait for a whole batch."""
        until = oldest + self.max_delay_s
        if not decoding:
            return until
        return max(until, oldest + self.costs.cost(self.cap) / 4)

    def wait_s(self, load: Load, images: int, now: float) -> float:
        """Predicted time until ``images`` more images (after those waiting) are done: the
        rest of the batches running now, then full batches, then the batch holding the last
        of them: full as well if it must wait (later arrivals fill it up meanwhile), only
        as large as it is if it can start at once."""
        running = max((self.costs.cost(n) - (now - t) for t, n in load.running), default=0.0)
        cap = self.cap
        full, rest = divmod(load.waiting + images, cap)
        last = 0.0
        if rest:
            waits = bool(load.running) or full > 0
            last = self.costs.cost(cap if waits else rest)
        ahead = (full * self.costs.cost(cap) + last) / self.max_inflight
        return max(0.0, running) + ahead

    def expected_wait_s(self, load: Load, images: int, now: float) -> float:
        """What ``images`` queued now should wait for their results: :meth:`wait_s`, and
        where no batch runs and theirs would be partial, the company it waits for first."""
        wait = self.wait_s(load, images, now)
        if not load.running and load.waiting + images < self.cap:
            wait += self.max_delay_s
        return wait

    def size(self, dues: Sequence[float], running: int, now: float) -> int:
        """How many images the next batch takes, given the queue's ``dues`` (earliest
        deadline first; :meth:`due` of each) and ``running`` batches in the backend. At most
        the queue spread over the batch slots free now (one slot: a full batch, which clears
        a queue soonest when a batch of n costs less than n batches of one); of those sizes,
        the one whose predicted schedule over the next two batches' worth of the queue (this
        batch, then full batches on the free slots) misses the fewest deadlines that some
        batch could keep; on a tie the largest. A size that keeps one tight deadline by
        delaying the rest past theirs is not better: under overload that trade cascades into
        504s for requests admission promised a place."""
        if not dues:
            return 0
        cap = self.cap
        head = dues[: 2 * cap]
        free = max(1, self.max_inflight - running)
        full = self.costs.cost(cap)
        keepable = now + self.costs.cost(1)
        best, fewest = 1, math.inf
        for n in range(1, min(cap, len(head), math.ceil(len(dues) / free)) + 1):
            slots = [now] * free
            slots[0] = now + self.costs.cost(n)
            misses = sum(slots[0] > due >= keepable for due in head[:n])
            for start in range(n, len(head), cap):
                k = slots.index(min(slots))
                slots[k] += full
                misses += sum(slots[k] > due >= keepable for due in head[start : start + cap])
            if misses <= fewest:
                best, fewest = n, misses
        return best
