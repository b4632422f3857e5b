"""The decoding pool's scheduling: fair between models, never past a deadline, no worker
lost, never more CPUs held than there are (workers here: threads running scripted jobs,
``tests.helpers.doubles.ThreadWorkers``; the decoding processes are test_decode_workers')."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.dataplane.decode_scheduler import DecodePool
from service.errors import DeadlineExceeded
from tests.helpers.doubles import ThreadWorkers
from tests.helpers.timing import until


def far() -> float:
    return time.perf_counter() + 10


def job(log: list[str], name: str, seconds: float = 0.05, until: threading.Event | None = None):
    """A decode that logs its start, then takes ``seconds``, or runs until ``until`` is set
    (by the test, once it has checked what happens meanwhile)."""

    def run() -> str:
        log.append(name)
        if until is None:
            time.sleep(seconds)
        else:
            assert until.wait(30), "never released"
        return name

    return run


async def test_a_flood_for_one_model_does_not_starve_another():
    pool = DecodePool(ThreadWorkers(1))
    log: list[str] = []
    flood = [asyncio.create_task(pool.run("a", far(), job(log, f"a{i}"))) for i in range(6)]
    await asyncio.sleep(0)  # the flood is queued first
    other = asyncio.create_task(pool.run("b", far(), job(log, "b")))
    assert await other == "b"
    assert log.index("b") <= 2, log  # behind at most the decode running and one turn
    await asyncio.gather(*flood)
    await pool.close()


async def test_nothing_is_decoded_past_its_deadline():
    pool = DecodePool(ThreadWorkers(1))
    log: list[str] = []
    release = threading.Event()
    busy = asyncio.create_task(pool.run("a", far(), job(log, "busy", until=release)))
    await until(lambda: log == ["busy"])  # the one worker is decoding
    with pytest.raises(DeadlineExceeded):
        await pool.run("a", time.perf_counter() + 0.1, job(log, "late"))
    # Answered at its deadline, not after the wait: the decode ahead of it still runs.
    assert not busy.done() and log == ["busy"]
    with pytest.raises(DeadlineExceeded):
        await pool.run("a", time.perf_counter() - 1, job(log, "expired"))
    release.set()
    await busy
    assert await pool.run("a", far(), job(log, "next")) == "next"  # no worker was lost
    assert log == ["busy", "next"]
    await pool.close()


async def test_a_caller_that_goes_away_frees_its_turn_and_its_worker():
    pool = DecodePool(ThreadWorkers(1))
    log: list[str] = []
    release = threading.Event()
    running = asyncio.create_task(pool.run("a", far(), job(log, "running", until=release)))
    waiting = asyncio.create_task(pool.run("a", far(), job(log, "waiting")))
    await until(lambda: log == ["running"] and pool.waiting("a") == 1)
    running.cancel()  # the worker still finishes its image; then the slot is free again
    waiting.cancel()
    await asyncio.gather(running, waiting, return_exceptions=True)  # both callers gone
    assert pool.waiting("a") == 0
    after = asyncio.create_task(pool.run("a", far(), job(log, "after")))
    await until(lambda: pool.waiting("a") == 1)  # "after" waits for the worker...
    assert log == ["running"]  # ...not started before the running decode ends
    release.set()
    assert await after == "after"
    assert log == ["running", "after"]
    assert pool.waiting("a") == 0
    await pool.close()


class CancellingWorkers:
    """One worker whose every job is cancelled (a worker stopped under it)."""

    count = 1

    def start(self) -> None: ...

    def submit(self, job: object) -> asyncio.Future[object]:
        work = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(work.cancel)
        return work

    async def close(self) -> None: ...


async def test_work_cancelled_under_a_caller_cancels_it_and_frees_the_worker():
    pool = DecodePool(CancellingWorkers())
    for _ in range(2):  # the second finds the worker free again
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(pool.run("a", far(), "job"), 1)
    assert pool.waiting("a") == 0


async def test_decodes_and_batches_never_hold_more_cpus_than_there_are():
    """Two CPUs, two decoding workers: a batch on both CPUs waits for the decode running,
    goes before the decode queued behind it, and that decode waits for the batch."""
    pool = DecodePool(ThreadWorkers(2), cpus=2)
    log: list[str] = []

    async def batch() -> None:
        async with pool.cores(2):
            log.append("batch")
            await asyncio.sleep(0.1)
            log.append("batch done")

    release = threading.Event()
    first = asyncio.create_task(pool.run("a", far(), job(log, "first", until=release)))
    await until(lambda: log == ["first"])  # decoding on one CPU
    running = asyncio.create_task(batch())
    later = asyncio.create_task(pool.run("a", far(), job(log, "later", 0.01)))
    await until(lambda: len(pool._holds) == 1 and pool.waiting("a") == 1)  # both waiting
    assert log == ["first"]  # a CPU and a worker are free, but the batch needs two and goes first
    release.set()
    await asyncio.gather(first, running, later)
    assert log == ["first", "batch", "batch done", "later"]
    async with pool.cores(5):  # more than there are: all of them
        assert pool._free_cpus == 0
    assert pool._free_cpus == 2
    await pool.close()


async def test_a_batch_that_stops_waiting_for_cpus_loses_none():
    pool = DecodePool(ThreadWorkers(1), cpus=1)
    log: list[str] = []
    release = threading.Event()
    busy = asyncio.create_task(pool.run("a", far(), job(log, "busy", until=release)))
    await until(lambda: log == ["busy"])

    async def batch() -> None:
        async with pool.cores(1):
            log.append("never")

    waiting = asyncio.create_task(batch())
    await until(lambda: len(pool._holds) == 1)  # waiting for the CPU the decode holds
    waiting.cancel()  # e.g. its requests were all answered 504
    await asyncio.gather(waiting, return_exceptions=True)
    queued = asyncio.create_task(pool.run("a", far(), job(log, "next", 0.01)))
    await until(lambda: pool.waiting("a") == 1)
    release.set()
    await asyncio.gather(busy, queued)
    assert log == ["busy", "next"] and pool._free_cpus == 1
    async with pool.cores(0):  # a batch that runs elsewhere holds nothing
        assert pool._free_cpus == 1
    await pool.close()
