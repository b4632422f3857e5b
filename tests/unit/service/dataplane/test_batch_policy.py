"""The batch plan, called directly: costs, the largest batch, when a partial batch starts,
predicted waits, and which size each batch takes. Times are plain numbers: no clock, no
event loop (how the batcher acts on these answers is test_batching's)."""

from __future__ import annotations

import ast
import math
import random

import pytest

from service.dataplane.batch_policy import BatchPolicy, CostModel, Load
from tests.helpers.paths import ROOT

#: 0.05 s a batch and 0.05 s an image: a batch of 8 costs 0.45.
LINEAR = {n: 0.05 + 0.05 * n for n in range(1, 9)}


def policy(costs: dict[int, float] | None = None, **kw) -> BatchPolicy:
    opts = {"max_batch": 8, "max_delay_s": 0.02, **kw}
    return BatchPolicy(CostModel(LINEAR if costs is None else costs), **opts)


def test_the_plan_is_pure():
    """Nothing here may wait or read a clock: every time is an argument."""
    for module in ("batch_policy", "admission"):
        path = ROOT / "service" / "dataplane" / f"{module}.py"
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert not imported & {"asyncio", "time", "threading"}, (module, imported)


def test_cost_model_learns_per_batch_size_and_interpolates():
    costs = CostModel({1: 0.02, 8: 0.09})  # the backend's warm-up
    assert costs.cost(1) == 0.02 and costs.cost(8) == 0.09
    assert costs.cost(4) == pytest.approx(0.02 + 0.07 * 3 / 7)  # between what was seen
    assert costs.work_s(19, 8) == pytest.approx(2 * 0.09 + costs.cost(3))  # full batches first
    costs.observe(8, 0.19)  # live batches are slower than warm-up (decoding competes)
    assert 0.09 < costs.cost(8) < 0.19  # moves toward them, not all the way at once
    fresh = CostModel()
    assert fresh.cost(4) == 0.05  # a prior until something is measured
    fresh.observe(2, 0.3)
    assert fresh.cost(2) == 0.3 and fresh.cost(4) == pytest.approx(0.6)  # proportional


def test_a_latency_target_caps_batches_at_half_of_it():
    assert policy().cap == 8  # no target: the largest batch
    assert policy(target_s=0.52).cap == 4  # 0.25 <= 0.26 < 0.30
    assert policy(target_s=0.05).cap == 1  # not even one image fits: never below one


def test_a_latency_target_is_a_deadline_for_the_size_choice():
    assert policy().due(deadline=10.0, arrived=1.0) == 10.0
    assert policy(target_s=0.5).due(deadline=10.0, arrived=1.0) == 1.5
    assert policy(target_s=0.5).due(deadline=1.2, arrived=1.0) == 1.2  # the sooner one


def test_a_partial_batch_waits_for_company_longer_during_a_burst():
    plan = policy(max_delay_s=0.02)
    assert plan.start_by(oldest=5.0, decoding=False) == pytest.approx(5.02)
    # Images admitted and still decoding: up to a quarter of a full batch (0.45 / 4).
    assert plan.start_by(oldest=5.0, decoding=True) == pytest.approx(5.1125)
    slow_company = policy(max_delay_s=0.5)
    assert slow_company.start_by(oldest=5.0, decoding=True) == pytest.approx(5.5)


def test_the_predicted_wait():
    costs = {1: 0.06, 2: 0.1}
    plan = policy(costs, max_batch=2)
    # Idle: a batch as large as the request starts at once.
    assert plan.wait_s(Load(0), 1, now=0.0) == pytest.approx(0.06)
    # Behind one waiting image: a full batch.
    assert plan.wait_s(Load(1), 1, now=0.0) == pytest.approx(0.1)
    # Behind 6 waiting and a batch started 0.04 ago: its rest, then 4 full batches.
    busy = Load(6, running=((10.0, 2),))
    assert plan.wait_s(busy, 2, now=10.04) == pytest.approx(0.06 + 4 * 0.1)
    # A last partial batch that must wait is planned full (later arrivals fill it).
    assert plan.wait_s(Load(0, running=((10.0, 2),)), 1, now=10.1) == pytest.approx(0.1)
    # Batches side by side share the work.
    wide = policy(costs, max_batch=2, max_inflight=2)
    assert wide.wait_s(Load(6), 2, now=0.0) == pytest.approx(4 * 0.1 / 2)


def test_the_predicted_wait_plans_with_the_latency_targets_cap():
    plan = policy(target_s=0.52)
    assert plan.wait_s(Load(0), 8, now=0.0) == pytest.approx(2 * LINEAR[4])  # not one of 8
    assert LINEAR[8] != pytest.approx(2 * LINEAR[4])


def test_the_expected_wait_of_a_queued_request_counts_the_company_it_waits_for():
    plan = policy(max_delay_s=0.02)
    alone = plan.wait_s(Load(0), 2, now=0.0)
    assert plan.expected_wait_s(Load(0), 2, now=0.0) == pytest.approx(alone + 0.02)
    # A full batch, or a batch running (then it fills up meanwhile), does not wait for it.
    assert plan.expected_wait_s(Load(6), 2, now=0.0) == plan.wait_s(Load(6), 2, now=0.0)
    running = Load(0, running=((0.0, 8),))
    assert plan.expected_wait_s(running, 2, now=0.0) == plan.wait_s(running, 2, now=0.0)


def test_no_batch_breaks_a_deadline_a_smaller_batch_keeps():
    # One of eight queued images must be answered within 0.33: one full batch (0.45) would
    # clear the queue soonest but answer it late; the largest batch that keeps it is 5.
    assert policy().size([0.33] + [100.0] * 7, running=0, now=0.0) == 5


def test_a_deadline_no_batch_keeps_does_not_shrink_batches():
    # Its deadline is sooner than even a batch of one (0.1): it counts for nothing.
    assert policy().size([0.05] + [100.0] * 7, running=0, now=0.0) == 8


def test_parallel_slots_split_a_small_queue():
    # Single-threaded batches, one per core, cost in proportion to their size: two waiting
    # images finish soonest as two batches of one side by side, not one batch of two.
    proportional = {n: 0.1 * n for n in range(1, 9)}
    assert policy(proportional, max_inflight=2).size([100.0] * 2, running=0, now=0.0) == 1
    # With one of the two slots busy, the free one takes both.
    assert policy(proportional, max_inflight=2).size([100.0] * 2, running=1, now=0.0) == 2
    assert policy().size([], running=0, now=0.0) == 0  # nothing queued, no batch


def test_size_choice_matches_its_definition():
    """The choice against a brute-force reading of its rule, over random queues and cost
    curves: of the sizes up to the queue spread over the free slots, the one whose schedule
    (that batch, then full batches, each on the slot free first) misses the fewest deadlines
    some batch could keep; the largest on a tie."""
    rng = random.Random(7)
    for _ in range(2000):
        max_batch = rng.randint(1, 12)
        fixed, per_image = rng.uniform(0, 0.1), rng.uniform(0.001, 0.05)
        slots = rng.randint(1, 3)
        plan = policy(
            {n: fixed + per_image * n for n in range(1, max_batch + 1)},
            max_batch=max_batch,
            max_inflight=slots,
        )
        queued = rng.randint(1, 30)
        now = 100.0
        dues = sorted(now + rng.uniform(0, 1) for _ in range(queued))
        head = dues[: 2 * max_batch]
        sizes = range(1, min(max_batch, len(head), math.ceil(queued / slots)) + 1)
        missed = {n: _misses(n, head, max_batch, slots, now, plan.costs.cost) for n in sizes}
        fewest = min(missed.values())
        chosen = plan.size(dues, running=0, now=now)
        assert chosen == max(n for n in sizes if missed[n] == fewest)


def _misses(n, head, max_batch, slots, now, cost) -> int:
    """Deadlines some batch could keep that a first batch of ``n`` and then full batches,
    each on the slot free first, would miss."""
    batches = [head[:n]] + [head[i : i + max_batch] for i in range(n, len(head), max_batch)]
    free_at = [now] * slots
    missed = 0
    for k, batch in enumerate(batches):
        slot = min(range(slots), key=lambda j: (free_at[j], j))
        free_at[slot] += cost(n if k == 0 else max_batch)
        missed += sum(free_at[slot] > due >= now + cost(1) for due in batch)
    return missed
