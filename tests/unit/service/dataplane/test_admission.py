"""Admission, called directly: the queue bound, refusals by deadline, the slack, and the
places held while images decode. Times are plain numbers: no clock, no event loop (the
batcher asking it before queuing is test_batching's)."""

from __future__ import annotations

import pytest

from service.dataplane.admission import ADMISSION_SLACK, Admission
from service.dataplane.batch_policy import BatchPolicy, CostModel, Load
from service.errors import DeadlineExceeded, Overloaded

#: 0.1 s a batch of one or two: the queue ahead of a request is worked off in waves.
WAVE = 0.1


def admission(max_queue: int = 100) -> Admission:
    plan = BatchPolicy(CostModel({1: WAVE, 2: WAVE}), max_batch=2, max_delay_s=0.0)
    return Admission("m", max_queue, plan)


#: Six images waiting and a batch started at 10.0, looked at from 10.04: its rest (0.06),
#: then three waves, and a fourth for the two images of the request.
BUSY = Load(6, running=((10.0, 2),))
NOW = 10.04
WAIT = 0.06 + 4 * WAVE
#: Just more and just less time than the wait with the slack.
ENOUGH, SHORT = WAIT * ADMISSION_SLACK * 1.01, WAIT * ADMISSION_SLACK * 0.99


def test_a_full_queue_refuses_at_once_with_retry_after():
    gate = admission(max_queue=7)
    with pytest.raises(Overloaded, match=r"6 images waiting \(limit 7\)") as info:
        gate.check(BUSY, 2, deadline=NOW + 100, now=NOW)
    # Retry once the queue ahead has been worked off: the running batch's rest, 3 waves.
    assert info.value.retry_after == pytest.approx(0.06 + 3 * WAVE)
    gate.check(BUSY, 1, deadline=NOW + 100, now=NOW)  # one more still fits


def test_a_request_is_admitted_only_if_the_queue_ahead_leaves_time_with_slack():
    gate = admission()
    gate.check(BUSY, 2, deadline=NOW + ENOUGH, now=NOW)
    with pytest.raises(Overloaded, match="after its deadline") as info:
        gate.check(BUSY, 2, deadline=NOW + SHORT, now=NOW)
    assert info.value.retry_after == pytest.approx(WAIT)


def test_the_requests_own_work_before_the_queue_counts():
    gate = admission()
    gate.check(BUSY, 2, deadline=NOW + ENOUGH, now=NOW)
    with pytest.raises(Overloaded, match="after its deadline"):  # decoding first, 5% of the wait
        gate.check(BUSY, 2, deadline=NOW + ENOUGH, now=NOW, extra_s=0.05 * WAIT)


def test_a_deadline_not_even_an_idle_model_makes_is_504_at_once():
    gate = admission()
    # Two images need one wave (0.1) even on an idle model: 0.12 is less than 0.1 with slack.
    with pytest.raises(DeadlineExceeded, match=r"needs \(about 100 ms\)"):
        gate.check(BUSY, 2, deadline=NOW + 0.12, now=NOW)
    with pytest.raises(DeadlineExceeded):
        gate.check(Load(0), 2, deadline=NOW + 0.12, now=NOW)
    gate.check(Load(0), 2, deadline=NOW + 0.13, now=NOW)  # idle, and time enough


def test_the_slack_grows_where_queued_images_waited_longer_than_predicted():
    gate = admission()
    assert gate.lateness == 1.0  # nothing learned yet: as predicted
    gate.learn(predicted=0.5, waited=1.0)
    assert gate.lateness == pytest.approx(2.0)
    with pytest.raises(Overloaded, match="after its deadline"):  # admitted before
        gate.check(BUSY, 2, deadline=NOW + ENOUGH, now=NOW)
    gate.check(BUSY, 2, deadline=NOW + 2 * ENOUGH, now=NOW)


def test_waits_shorter_than_predicted_never_shrink_the_slack():
    gate = admission()
    gate.learn(predicted=1.0, waited=0.5)
    assert gate.lateness == pytest.approx(0.5)
    with pytest.raises(Overloaded):  # still the fixed slack at least
        gate.check(BUSY, 2, deadline=NOW + SHORT, now=NOW)


def test_an_admitted_request_holds_its_place_until_released():
    gate = admission()
    gate.reserve(Load(0), 2, deadline=NOW + 100, now=NOW)
    assert gate.reserved == 2
    with pytest.raises(DeadlineExceeded):  # refused: holds nothing
        gate.reserve(Load(2), 2, deadline=NOW + 0.01, now=NOW)
    assert gate.reserved == 2
    gate.release(2)  # its images were queued, or will never come
    assert gate.reserved == 0
