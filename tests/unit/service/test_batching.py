"""The micro-batcher: coalescing, bounds, deadlines, and an answer for every request."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service.batching import Batched, Batcher
from service.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    InternalError,
    Overloaded,
    ShuttingDown,
)
from service.metrics import Metrics


class Recorder:
    """A backend call that records batch sizes and can be slowed down or made to fail."""

    def __init__(self, delay: float = 0.0, fail: Exception | None = None) -> None:
        self.sizes: list[int] = []
        self.delay = delay
        self.fail = fail

    async def __call__(self, x: np.ndarray, timeout: float) -> np.ndarray:
        self.sizes.append(len(x))
        if self.delay:
            await asyncio.sleep(self.delay)
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


async def until(check, timeout_s: float = 5.0) -> None:
    """Poll a state on the event loop (never sleep-and-hope)."""
    deadline = time.perf_counter() + timeout_s
    while not check():
        assert time.perf_counter() < deadline, "state not reached"
        await asyncio.sleep(0.001)


def queued(b: Batcher) -> float:
    return b._metrics.queue_depth.labels(b.model)._value.get()


async def test_two_concurrent_requests_become_one_batch():
    rec = Recorder()
    b = make(rec)
    r1, r2 = await asyncio.gather(b.submit([tensor(1)], far()), b.submit([tensor(2)], far()))
    assert rec.sizes == [2]
    assert r1.rows[0][0] == 2 and r2.rows[0][0] == 4  # each request got its own row back
    await b.close()


async def test_results_keep_request_order_across_batches():
    rec = Recorder()
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
    t0 = time.perf_counter()
    await b.submit([tensor(1)], far())
    assert time.perf_counter() - t0 < 0.5
    assert rec.sizes == [1]
    await b.close()


async def test_full_queue_rejects_at_once_with_retry_after():
    rec = Recorder(delay=0.3)
    b = make(rec, max_batch=1, max_queue=2, max_delay_s=0)
    first = asyncio.create_task(b.submit([tensor(1)], far()))
    await until(lambda: rec.sizes == [1])  # first is running; the queue is empty again
    waiting = [asyncio.create_task(b.submit([tensor(i)], far())) for i in range(2)]
    await until(lambda: queued(b) == 2)
    t0 = time.perf_counter()
    with pytest.raises(Overloaded) as info:
        await b.submit([tensor(9)], far())
    assert time.perf_counter() - t0 < 0.05  # refused, not queued
    assert int(info.value.retry_after_header() or 0) >= 1
    await asyncio.gather(first, *waiting)  # the accepted ones still get answers
    await b.close()


async def test_request_larger_than_queue_is_refused():
    b = make(Recorder(), max_queue=3)
    with pytest.raises(Overloaded):
        await b.submit([tensor(i) for i in range(4)], far())
    await b.close()


async def test_deadline_is_504_and_expired_work_is_skipped():
    rec = Recorder(delay=0.2)
    b = make(rec, max_batch=1, max_delay_s=0)
    slow = asyncio.create_task(b.submit([tensor(1)], far()))
    await until(lambda: rec.sizes == [1])
    with pytest.raises(DeadlineExceeded):  # admitted (a batch was thought to take 0.05 s)
        await b.submit([tensor(2)], time.perf_counter() + 0.15)
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
    rec = Recorder(delay=0.1)
    b = make(rec, max_batch=1, max_delay_s=0, max_inflight=4)
    t0 = time.perf_counter()
    await asyncio.gather(*(b.submit([tensor(i)], far()) for i in range(4)))
    assert time.perf_counter() - t0 < 0.3  # four 0.1 s calls overlapped
    await b.close()


async def test_where_a_request_spent_its_time():
    rec = Recorder(delay=0.1)
    b = make(rec, max_batch=1, max_delay_s=0)
    first, second = await asyncio.gather(b.submit([tensor(1)], far()), b.submit([tensor(2)], far()))
    assert first.queued_s < 0.05 and 0.09 < first.computed_s < 0.5
    assert second.queued_s >= 0.09  # waited for the first batch
    split = await b.submit([tensor(1), tensor(2)], far())  # two batches: both counted
    assert split.computed_s >= 0.19
    await b.close()


async def test_admission_refuses_what_cannot_finish_before_its_deadline():
    rec = Recorder(delay=0.1)
    b = make(rec, max_batch=2, max_delay_s=0, max_queue=100)
    await b.submit([tensor(0), tensor(1)], far())  # learns that a batch of 2 takes ~0.1 s
    running = asyncio.create_task(b.submit([tensor(i) for i in range(8)], far()))
    await until(lambda: b.waiting == 6)  # one batch running, three waves queued
    t0 = time.perf_counter()
    with pytest.raises(Overloaded, match="after its deadline") as info:
        b.reserve(2, time.perf_counter() + 0.3)  # the running batch's rest + 4 x 0.1 s
    assert time.perf_counter() - t0 < 0.01  # refused without waiting
    assert 0.4 <= (info.value.retry_after or 0) <= 0.55
    b.reserve(2, time.perf_counter() + 1.0)  # 0.4 s fits in 1 s: admitted, place held
    assert b.waiting == 8
    with pytest.raises(Overloaded, match="after its deadline"):
        b.reserve(2, time.perf_counter() + 0.45)  # the held place counts: 5 waves now
    out = await b.submit([tensor(8), tensor(9)], far(), reserved=True)
    assert len(out.rows) == 2 and b.waiting == 0
    await running
    b.reserve(1, far())
    b.release(1)  # e.g. its image did not decode
    assert b.waiting == 0
    await b.close()


def test_cost_model_learns_per_batch_size_and_interpolates():
    from service.batching import CostModel

    costs = CostModel(8, {1: 0.02, 8: 0.09})  # the backend's warm-up
    assert costs.cost(1) == 0.02 and costs.cost(8) == 0.09
    assert costs.cost(4) == pytest.approx(0.02 + 0.07 * 3 / 7)  # between what was seen
    assert costs.work_s(19) == pytest.approx(2 * 0.09 + costs.cost(3))  # full batches first
    costs.observe(8, 0.19)  # live batches are slower than warm-up (decoding competes)
    assert 0.09 < costs.cost(8) < 0.19  # moves toward them, not all the way at once
    fresh = CostModel(4)
    assert fresh.cost(4) == 0.05  # a prior until something is measured
    fresh.observe(2, 0.3)
    assert fresh.cost(2) == 0.3 and fresh.cost(4) == pytest.approx(0.6)  # proportional
