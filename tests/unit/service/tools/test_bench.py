"""The load tool's own logic, where a scripted target makes the expected answer exact: the
open loop's Poisson schedule, latency from the scheduled time (coordinated omission),
warm-up excluded, the bounds, and the SLO search's bracketing. The loops run on a virtual
clock (``tests.helpers.timing.VirtualClockLoop``): the target's costs and stalls take exactly the
time they script, on any machine. Real gateways: tests/e2e."""

from __future__ import annotations

import asyncio

import pytest

from service.tools.bench import BenchError
from service.tools.bench.gateway_metrics import breakdown, parse
from service.tools.bench.loops import Bounds, Step, closed_loop, open_loop, poisson_schedule
from service.tools.bench.queueing import ideal_latencies_s
from service.tools.bench.slo import passes, search
from service.tools.bench.targets import Answer, Target
from tests.helpers.timing import on_virtual_clock


class Scripted(Target):
    """Answers after ``cost_s`` (one at a time when ``serial``); records when each call came."""

    protocol = "rest"

    def __init__(self, cost_s: float = 0.0, serial: bool = False, stall_at: int | None = None):
        super().__init__("http://127.0.0.1:1", "m", [[b"x"]])
        self.cost_s = cost_s
        self.lock = asyncio.Lock() if serial else None
        self.stall_at = stall_at
        self.calls: list[float] = []

    def encode(self, images):
        return images

    async def send(self, i: int) -> Answer:
        loop = asyncio.get_running_loop()
        self.calls.append(loop.time())
        if i == self.stall_at:
            loop.advance(0.3)  # the client's own event loop blocked: every arrival is late
        if self.lock:
            async with self.lock:
                await asyncio.sleep(self.cost_s)
        else:
            await asyncio.sleep(self.cost_s)
        return Answer("200", True)


def test_open_loop_sends_the_seeded_poisson_schedule():
    target = Scripted()
    step = on_virtual_clock(open_loop(target, 200, Bounds(1.0), seed=7))
    schedule = poisson_schedule(200, 1.0, 7)
    assert step.requests == step.ok == len(schedule)
    # Each request sent at its time in the schedule, from the window's opening.
    assert [t - target.calls[0] for t in target.calls] == pytest.approx(schedule, abs=1e-9)
    gaps = [b - a for a, b in zip(target.calls, target.calls[1:], strict=False)]
    mean_gap = sum(gaps) / len(gaps)
    assert 1 / 200 * 0.75 < mean_gap < 1 / 200 * 1.25
    # Exponential gaps: their standard deviation is about their mean (not a fixed pace).
    sd = (sum((g - mean_gap) ** 2 for g in gaps) / len(gaps)) ** 0.5
    assert 0.6 < sd / mean_gap < 1.4


def test_open_loop_latency_counts_from_the_scheduled_time():
    """A client that falls behind (here: its loop blocked 0.3 s) must not hide it: the
    requests that were due meanwhile are measured from when they were due."""
    step = on_virtual_clock(open_loop(Scripted(stall_at=20), 100, Bounds(1.0), seed=1))
    assert step.requests == len(poisson_schedule(100, 1.0, 1))  # none dropped
    assert step.latency_ms(100) >= 250  # the stalled request's successors waited
    assert step.latency_ms(50) < 250


def test_open_loop_past_capacity_shows_the_queue():
    # 50/s offered to a server that takes 40 ms each, one at a time (25/s): latency grows.
    step = on_virtual_clock(open_loop(Scripted(0.04, serial=True), 50, Bounds(1.0), seed=3))
    assert step.latency_ms(99) > 300


def test_warmup_is_sent_but_not_recorded():
    target = Scripted(0.005)
    step = on_virtual_clock(closed_loop(target, 2, Bounds(0.3, warmup_s=0.3)))
    assert 0 < step.requests < len(target.calls)
    # The window alone, up to the last answer that was in flight as it closed (5 ms each).
    assert 0.3 <= step.duration_s <= 0.3 + 0.005


def test_max_requests_bounds_a_step():
    step = on_virtual_clock(closed_loop(Scripted(0.001), 3, Bounds(30.0, max_requests=50)))
    assert step.requests == 50 and step.duration_s < 5


def test_retry_after_is_honoured_with_jitter():
    retry_after = 0.2

    class Refusing(Scripted):
        async def send(self, i):
            self.calls.append(asyncio.get_running_loop().time())
            return Answer("503", False, retry_after=retry_after)

    target = Refusing()
    step = on_virtual_clock(closed_loop(target, 1, Bounds(0.5), honor_retry_after=True))
    assert 2 <= step.requests <= 6  # 0.1-0.3 s apart, not a tight loop
    assert step.errors == {"503": step.requests} and step.ok == 0
    # A refusal's latency is its answer's, without the wait after it (at least 0.1 s).
    assert step.latency_ms(50, "503") < 1000 * 0.5 * retry_after
    assert step.latency_ms(50) != step.latency_ms(50)  # NaN: nothing succeeded


def test_slo_search_brackets_the_highest_passing_rate():
    """A stand-in target whose p99 is over budget above 37/s: the search finds 37."""

    def fake(load: float, mode: str) -> Step:
        step = Step(mode, load, 1, duration_s=1.0)
        rps = load if mode == "open" else min(100.0, load * 20)
        over = mode == "open" and load > 37
        for _ in range(int(rps)):
            step.record(Answer("200", True), 0.5 if over else 0.05)
        return step

    async def closed(c):
        return fake(c, "closed")

    async def open_(r):
        return fake(r, "open")

    result = on_virtual_clock(search(closed, open_, budget_ms=100, tolerance=0.02, max_probes=12))
    assert result.best is not None and 36 <= result.best.load <= 37
    assert "highest passing rate" in result.reason
    summary = result.summary()
    assert summary["requests"] == result.best.requests
    assert summary["confidence"].startswith("low")  # ~37 requests: the p99 is their max


def test_slo_search_says_when_no_rate_fits():
    async def slow(c):
        step = Step("closed", c, 1, duration_s=1.0)
        step.record(Answer("200", True), 0.5)
        return step

    result = on_virtual_clock(search(slow, slow, budget_ms=100))
    assert result.best is None and "one request at a time already has p99 500" in result.reason
    assert not passes(Step("open", 1, 1), 100)  # nothing answered: never a pass


EXPOSITION = """\
# TYPE resnet_serve_requests_total counter
resnet_serve_requests_total{transport="http",route="/v1/models/{model}/classify",outcome="ok"} 3.0
resnet_serve_requests_total{transport="http",route="/v1/models/{model}/classify",outcome="overloaded"} 4.0
resnet_serve_requests_total{transport="http",route="/metrics",outcome="ok"} 3.0
resnet_serve_requests_total{transport="grpc",route="resnet.v1.Classifier/Classify",outcome="ok"} 2.0
resnet_serve_requests_total{transport="grpc",route="resnet.v1.Classifier/ListModels",outcome="ok"} 5.0
# TYPE resnet_serve_images_total counter
resnet_serve_images_total{model="m"} 9.0
resnet_serve_images_total{model="other"} 100.0
# TYPE resnet_serve_batch_size histogram
resnet_serve_batch_size_sum{model="m"} 9.0
resnet_serve_batch_size_count{model="m"} 3.0
# TYPE resnet_serve_preprocess_seconds histogram
resnet_serve_preprocess_seconds_sum{model="m"} 0.018
resnet_serve_preprocess_seconds_count{model="m"} 9.0
"""


def test_server_breakdown_is_the_difference_of_two_scrapes():
    after = parse(EXPOSITION, "m")
    assert after["requests"] == 9  # classifying routes and RPCs, not scrapes or listings
    assert after["images"] == 9  # this model only
    d = breakdown({}, after)
    assert d["mean_batch_size"] == 3.0 and d["batches"] == 3
    assert d["preprocess_ms_per_image"] == 2.0
    assert d["rejected"] == {"overloaded": 4}
    assert breakdown(after, after)["requests"] == 0


def test_bad_numbers_are_refused_before_anything_runs(tmp_path):
    from service.tools.bench.run import BenchConfig

    base = {"url": "http://127.0.0.1:1", "model": "m", "images": tmp_path, "output": tmp_path}
    for bad, message in (
        ({"duration_s": 0}, "--duration"),
        ({"concurrency": [0]}, "--concurrency"),
        ({"rates": [-1.0]}, "--rate"),
        ({"slo_p99_ms": 100, "rates": [1.0]}, "chooses its own steps"),
        ({"concurrency": [1], "rates": [1.0]}, "not both"),
        ({"images_per_request": 0}, "--images-per-request"),
    ):
        with pytest.raises(BenchError, match=message):
            BenchConfig(**base, **bad).check()


def test_the_ideal_server_batches_what_has_arrived_when_it_is_free():
    """make bench's tail reference: FIFO, no overhead, up to max_batch of what is waiting."""
    got = ideal_latencies_s([0.0, 0.0, 0.0, 1.0], lambda n: 0.1 * n, max_batch=2)
    # Two at once (0.2 s), the third after them alone (0.1 s), the fourth on an idle server.
    assert got == pytest.approx([0.2, 0.2, 0.3, 0.1])
    assert ideal_latencies_s([], lambda n: 1.0, 8) == []
