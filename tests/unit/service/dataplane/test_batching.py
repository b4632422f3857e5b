"""The micro-batcher: coalescing, bounds, deadlines, and an answer for every request."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.dataplane.admission import ADMISSION_SLACK
from service.dataplane.batching import Batched, Batcher
from service.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InternalError,
    Overloaded,
    ShuttingDown,
)
from service.observability.metrics import Metrics
from tests.helpers.timing import until


class Recorder:
    """A backend call that records batch sizes and when each call ran, and can be slowed
    down, held until the test releases it (``hold``), or made to fail."""

    def __init__(
        self, delay: float = 0.0, fail: Exception | None = None, hold: asyncio.Event | None = None
    ) -> None:
        self.sizes: list[int] = []
        self.values: list[list[float]] = []  # each call's rows, by the value they were made of
        self.delay = delay
        self.fail = fail
        self.hold = hold
        self.active = 0  # calls in the backend now
        self.calls: list[tuple[float, float]] = []  # (start, end) of each call that returned

    async def __call__(self, x: np.ndarray, timeout: float) -> np.ndarray:
        self.sizes.append(len(x))
        self.values.append(x.reshape(len(x), -1)[:, 0].tolist())
        start = time.perf_counter()
        self.active += 1
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.hold:
                await self.hold.wait()
        finally:
            self.active -= 1
        self.calls.append((start, time.perf_counter()))
        if self.fail:
            raise self.fail
        return x.reshape(len(x), -1)[:, :3] * 2  # deterministic "logits" per row


def make(rec: Recorder, **kw) -> Batcher:
    opts = {"max_batch": 8, "max_delay_s": 0.05, "max_queue": 64, **kw}
    b = Batcher("m", rec, metrics=Metrics(), backend_name="test", **opts)
    b.start()
    return b


def tensor(v: float) -> np.ndarray:
    return np.full((1, 2, 2), v, dtype=np.float32)


def far() -> float:
    return time.perf_counter() + 10


def queued(b: Batcher) -> float:
    return b._metrics.queue_depth.labels(b.model, b.version)._value.get()


async def test_two_concurrent_requests_become_one_batch():
    rec = Recorder()
    b = make(rec)
    r1, r2 = await asyncio.gather(b.submit([tensor(1)], far()), b.submit([tensor(2)], far()))
    assert rec.sizes == [2]
    assert r1.rows[0][0] == 2 and r2.rows[0][0] == 4  # each request got its own row back
    await b.close()


async def test_results_keep_request_order_across_batches():
    rec = Recorder(delay=0.01)
    b = make(rec, max_batch=3)
    out = await b.submit([tensor(i) for i in range(7)], far())
    assert [float(r[0]) for r in out.rows] == [2 * i for i in range(7)]
    assert rec.sizes == [3, 3, 1]
    await b.close()


async def test_max_batch_is_never_exceeded():
    rec = Recorder(delay=0.01)
    b = make(rec, max_batch=4)
    await asyncio.gather(*(b.submit([tensor(i)], far()) for i in range(19)))
    assert max(rec.sizes) <= 4 and sum(rec.sizes) == 19
    await b.close()


async def test_lone_request_waits_at_most_max_delay():
    rec = Recorder()
    b = make(rec, max_delay_s=0.02)
    out = await b.submit([tensor(1)], far())
    # It waited for company (max_delay), then went alone: answered, not 504 at its deadline
    # (500 delays away), which is where a batcher waiting for a full batch would leave it.
    assert out.queued_s >= 0.9 * b.policy.max_delay_s
    assert rec.sizes == [1]
    await b.close()


async def test_full_queue_rejects_at_once_with_retry_after():
    hold = asyncio.Event()
    rec = Recorder(hold=hold)  # the running batch stays in the backend until released
    b = make(rec, max_batch=1, max_queue=2, max_delay_s=0)
    first = asyncio.create_task(b.submit([tensor(1)], far()))
    await until(lambda: rec.sizes == [1])  # first is running; the queue is empty again
    waiting = [asyncio.create_task(b.submit([tensor(i)], far())) for i in range(2)]
    await until(lambda: queued(b) == 2)
    with pytest.raises(Overloaded) as info:
        await b.submit([tensor(9)], far())
    # Refused, not queued: answered while the batch ahead of it is still held in the
    # backend and the two behind that still wait (queued, it would have waited for them
    # all, and for a batch that never ends until released).
    assert rec.active == 1 and queued(b) == 2 and rec.sizes == [1]
    assert int(info.value.retry_after_header() or 0) >= 1
    hold.set()
    await asyncio.gather(first, *waiting)  # the accepted ones still get answers
    await b.close()


async def test_request_larger_than_queue_is_refused():
    b = make(Recorder(), max_queue=3)
    with pytest.raises(Overloaded):
        await b.submit([tensor(i) for i in range(4)], far())
    await b.close()


async def test_deadline_is_504_and_expired_work_is_skipped():
    hold = asyncio.Event()
    rec = Recorder(hold=hold)  # the running batch ends when released, after the deadline
    b = make(rec, max_batch=1, max_delay_s=0)
    slow = asyncio.create_task(b.submit([tensor(1)], far()))
    await until(lambda: rec.sizes == [1])
    with pytest.raises(DeadlineExceeded):  # admitted (a batch was thought to take 0.05 s)
        await b.submit([tensor(2)], time.perf_counter() + 0.15)
    assert rec.active == 1  # answered at its deadline, the batch ahead still running
    hold.set()
    await slow
    await b.close()  # runs whatever is still queued
    assert rec.sizes == [1]  # the expired image never reached the backend


async def test_backend_errors_reach_every_request_of_the_batch():
    b = make(Recorder(fail=BackendUnavailable("triton is down")))
    results = await asyncio.gather(
        b.submit([tensor(1)], far()), b.submit([tensor(2)], far()), return_exceptions=True
    )
    assert all(isinstance(r, BackendUnavailable) for r in results)
    await b.close()


async def test_unexpected_backend_errors_become_generic_internal_errors():
    b = make(Recorder(fail=RuntimeError("secret internal path /opt/x")))
    with pytest.raises(InternalError) as info:
        await b.submit([tensor(1)], far())
    assert "secret" not in info.value.message
    await b.close()


async def test_close_drains_queued_work_then_refuses():
    rec = Recorder(delay=0.05)
    b = make(rec, max_batch=2, max_delay_s=0)
    tasks = [asyncio.create_task(b.submit([tensor(i)], far())) for i in range(6)]
    await until(lambda: rec.sizes)  # the first batch is running, the rest queued
    await b.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Batched) for r in results), results  # every accepted one answered
    with pytest.raises(ShuttingDown):
        await b.submit([tensor(1)], far())


async def test_inflight_limit_allows_parallel_batches():
    hold = asyncio.Event()
    rec = Recorder(hold=hold)  # each call stays in the backend until released
    b = make(rec, max_batch=1, max_delay_s=0, max_inflight=4)
    calls = asyncio.gather(*(b.submit([tensor(i)], far()) for i in range(4)))
    await until(lambda: rec.active == 4)  # four batches in the backend at once
    hold.set()
    await calls
    assert rec.sizes == [1, 1, 1, 1]
    await b.close()


async def test_where_a_request_spent_its_time():
    rec = Recorder(delay=0.1)
    b = make(rec, max_batch=1, max_delay_s=0)
    t0 = time.perf_counter()
    first, second = await asyncio.gather(b.submit([tensor(1)], far()), b.submit([tensor(2)], far()))
    done = time.perf_counter()
    # Each backend call, as the double timed it, is the unit: the first request waited for
    # none (its wait ended where the first call began) and was computed in that whole
    # call, over before the second began; the second waited for the whole first call, and
    # its computing time is its own call's, not that wait.
    (start1, end1), (start2, end2) = rec.calls
    assert first.queued_s <= start1 - t0
    assert end1 - start1 <= first.computed_s <= start2 - t0
    assert second.queued_s >= end1 - start1
    assert end2 - start2 <= second.computed_s <= done - end1
    split = await b.submit([tensor(1), tensor(2)], far())  # two batches: both counted
    (start3, end3), (start4, end4) = rec.calls[2:]
    assert split.computed_s >= end4 - start3 >= (end3 - start3) + (end4 - start4)
    await b.close()


async def test_admission_refuses_what_cannot_finish_before_its_deadline():
    hold = asyncio.Event()
    hold.set()
    rec = Recorder(delay=0.1, hold=hold)  # ~0.1 s a batch at any size: full batches clear soonest
    b = make(rec, max_batch=2, max_delay_s=0, max_queue=100, warm_costs={1: 0.1, 2: 0.1})
    await b.submit([tensor(0), tensor(1)], far())  # a batch measured here
    hold.clear()  # from now on a batch stays in the backend until released
    running = asyncio.create_task(b.submit([tensor(i) for i in range(8)], far()))
    await until(lambda: b.waiting == 6 and rec.active == 1)  # one batch running, three waves queued
    # In units of what a batch costs, as the batcher learned it here (c), and with the slack
    # it plans with: 2 more images wait for the running batch's rest (0..c) and 4 waves.
    c = b.policy.costs.cost(2)
    slack = ADMISSION_SLACK * max(1.0, b.admission.lateness)
    with pytest.raises(Overloaded, match="after its deadline") as info:
        b.reserve(2, time.perf_counter() + 4 * c)  # 4 waves at least, more with the slack
    # Refused without waiting for a batch: the one ahead is still held in the backend.
    assert rec.active == 1 and rec.sizes == [2, 2]
    assert 4 * c <= (info.value.retry_after or 0) <= 5 * c
    b.reserve(2, time.perf_counter() + 1.01 * 5 * c * slack)  # 5 waves at most: admitted, held
    assert b.waiting == 8
    with pytest.raises(Overloaded, match="after its deadline"):
        b.reserve(2, time.perf_counter() + 5 * c)  # the held place counts: 5 waves at least now
    hold.set()
    out = await b.submit([tensor(8), tensor(9)], far(), reserved=True)
    assert len(out.rows) == 2 and b.waiting == 0
    await running
    b.reserve(1, far())
    b.release(1)  # e.g. its image did not decode
    assert b.waiting == 0
    await b.close()


async def test_admission_slack_grows_where_queued_images_wait_longer_than_predicted():
    """Batches that start late (the event loop held between them: what a busy gateway or a
    shared CPU does) are not in the batch costs; admission learns it from the waits."""
    rec = Recorder(delay=0.02)

    async def late(x: np.ndarray, timeout: float) -> np.ndarray:
        out = await rec(x, timeout)
        # Blocking on purpose, once the batch is back: the next one starts late by one and a
        # half of what the batcher predicts a batch costs (whatever this machine's speed).
        asyncio.get_running_loop().call_soon(time.sleep, 1.5 * b.policy.costs.cost(len(x)))
        return out

    b = Batcher(
        "m", late, metrics=Metrics(), backend_name="test", max_batch=2, max_delay_s=0,
        max_queue=100, warm_costs={1: 0.02, 2: 0.02},
    )  # fmt: skip
    b.start()
    for _ in range(3):
        await asyncio.gather(*(b.submit([tensor(i), tensor(i)], far()) for i in range(5)))
    # Each wave costs what was predicted and starts 1.5 predicted batches late: ~2x.
    assert b.admission.lateness > 1.5, b.admission.lateness
    gauge = b._metrics.queue_lateness.labels(b.model, b.version)._value.get()
    assert gauge == b.admission.lateness
    running = asyncio.create_task(b.submit([tensor(i) for i in range(10)], far()))
    await until(lambda: b.waiting <= 8)
    wait = b.policy.wait_s(b.load(), 2, time.perf_counter())
    lateness = min(b.admission.lateness, 1.5)
    with pytest.raises(Overloaded, match="after its deadline"):
        # Admitted with the fixed slack alone; not after this lateness.
        b.reserve(2, time.perf_counter() + wait * 1.25 * lateness * 0.99 + 0.01)
    await running
    await b.close()


# --- choosing each batch's size ------------------------------------------------------------


#: The scripted costs below are the batcher's plan, in units of PLAN seconds: a size is chosen
#: from the clock and the deadlines when the batch starts, and a scale of seconds keeps that
#: choice the same on a machine that starts it a second late. The backend itself answers at
#: once (or when released): what it costs is not what these tests check.
PLAN = 50.0


def plan_far() -> float:
    return time.perf_counter() + 100 * PLAN


class Scripted(Recorder):
    """A batcher that plans with ``cost(n) * PLAN`` seconds for a batch of n (its warm-up
    measured that), and a backend that answers at once, or when ``hold`` is set."""

    def __init__(self, cost, hold: asyncio.Event | None = None) -> None:
        super().__init__(hold=hold)
        self.cost = cost

    def batcher(self, max_batch: int = 8, **kw) -> Batcher:
        warm = {n: PLAN * self.cost(n) for n in range(1, max_batch + 1)}
        return make(self, max_batch=max_batch, max_delay_s=0.02, warm_costs=warm, **kw)


async def test_no_batch_breaks_a_deadline_a_smaller_batch_keeps():
    # 0.05 + 0.05 an image (PLAN units). One request must be answered within 0.33; seven more
    # have time. One full batch (0.45) would clear the queue soonest but answer it late:
    # the largest batch that keeps it (5 images, 0.3) goes first, then the rest.
    rec = Scripted(lambda n: 0.05 + 0.05 * n)
    b = rec.batcher()
    t0 = time.perf_counter()
    tight = b.submit([tensor(0)], t0 + 0.33 * PLAN)
    rest = [b.submit([tensor(i)], plan_far()) for i in range(1, 8)]
    results = await asyncio.gather(tight, *rest)
    assert rec.sizes == [5, 3]
    # In the first batch, and answered by its deadline (else DeadlineExceeded).
    assert 0 in rec.values[0] and results[0].rows[0][0] == 0
    await b.close()


async def test_a_deadline_no_batch_keeps_does_not_shrink_batches():
    # Nothing can answer the first request in time (its deadline, 2 s away, is shorter than
    # a batch of one: 0.1 PLAN); it must not make the others run one by one. Admitted
    # directly into the queue, as a request whose deadline shrank while it was decoding.
    hold = asyncio.Event()
    rec = Scripted(lambda n: 0.05 + 0.05 * n, hold=hold)
    b = rec.batcher()
    hopeless = asyncio.create_task(b.submit([tensor(0)], time.perf_counter() + 2.0, reserved=True))
    b.admission.reserved += 1  # what reserve() did for it while its image decoded
    rest = [asyncio.create_task(b.submit([tensor(i)], plan_far())) for i in range(1, 8)]
    await until(lambda: rec.active == 1)
    assert rec.sizes == [8]  # all of them in one batch, the hopeless one too
    with pytest.raises(DeadlineExceeded):  # the batch is held in the backend past its deadline
        await hopeless
    hold.set()
    await asyncio.gather(*rest)
    await b.close()


async def test_latency_target_caps_batches_at_half_of_it():
    rec = Scripted(lambda n: 0.05 + 0.05 * n)
    b = rec.batcher(target_s=0.52 * PLAN)  # a batch may cost 0.26: 4 images
    assert b.policy.cap == 4
    await asyncio.gather(*(b.submit([tensor(i)], plan_far()) for i in range(8)))
    assert rec.sizes == [4, 4]
    await b.close()


async def test_latency_target_is_a_deadline_for_the_size_choice():
    # With a 0.52 target, batches may have 4 images (0.25); the request that arrived
    # 0.29 ago (as if it spent that decoding) has 0.23 left: the batch keeps it with 3.
    # Its 504 deadline is far away.
    rec = Scripted(lambda n: 0.05 + 0.05 * n)
    b = rec.batcher(target_s=0.52 * PLAN)
    t0 = time.perf_counter()
    early = b.submit([tensor(0)], plan_far(), arrived=t0 - 0.29 * PLAN)
    rest = [b.submit([tensor(i)], plan_far()) for i in range(1, 5)]
    await asyncio.gather(early, *rest)
    assert b.policy.cap == 4 and rec.sizes[0] == 3
    await b.close()


async def test_parallel_slots_split_a_small_queue():
    # Single-threaded batches, one per core, cost in proportion to their size: two waiting
    # images finish soonest as two batches of one side by side, not one batch of two.
    hold = asyncio.Event()
    rec = Scripted(lambda n: 0.1 * n, hold=hold)
    b = rec.batcher(max_inflight=2)
    both = asyncio.gather(b.submit([tensor(0)], plan_far()), b.submit([tensor(1)], plan_far()))
    await until(lambda: rec.active == 2)  # side by side: both in the backend at once
    hold.set()
    await both
    assert rec.sizes == [1, 1]
    await b.close()
