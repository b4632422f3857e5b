"""The decoding processes: real worker processes give exactly the tensors preprocessing
gives in this process, answer a bad image with the same error, grow their shared memory
for a large image and give it back after, and a worker that dies fails its image (400)
and is replaced."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import numpy as np
import pytest

from service.dataplane.decode_scheduler import DecodePool
from service.dataplane.decode_workers import KEEP_REGION, DecoderProcesses, PreprocessJob
from service.dataplane.preprocess import DEFAULT_LIMITS, DecodeLimits, preprocess
from service.errors import InvalidImage, PayloadTooLarge, UnsupportedMediaType
from service.model.contract import input_fields
from tests.helpers.images import image_bytes, photos
from tests.helpers.models import GREY, RGB, contract

pytestmark = pytest.mark.external  # every test starts worker processes

FAR = 60.0


def job(c, data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> PreprocessJob:
    return PreprocessJob(c, limits, data, np.empty(c.input_shape, c.dtype))


async def test_workers_give_the_tensors_preprocessing_gives_here():
    """Photos and a PNG, float planes and uint8 pixels, RGB and grey, interleaved on two
    workers: every tensor equal, bit for bit, to ``preprocess`` in this process."""
    workers = DecoderProcesses(2)
    workers.start()
    pool = DecodePool(workers)
    cases = [
        (c, data)
        for c in (RGB, RGB.model_copy(update=input_fields("uint8")), GREY, contract())
        for data in (*photos(), image_bytes("PNG", (300, 200)), image_bytes("JPEG", (64, 48)))
    ]
    jobs = [job(c, data) for c, data in cases]
    try:
        seconds = await asyncio.gather(*(pool.run("m", time.perf_counter() + FAR, j) for j in jobs))
    finally:
        await pool.close()
    assert all(s > 0 for s in seconds)  # each worker's own time, for the metrics
    for j, (c, data) in zip(jobs, cases, strict=True):
        np.testing.assert_array_equal(j.out, preprocess(data, c))


@pytest.mark.parametrize(
    ("data", "limits", "error"),
    [
        (image_bytes("PNG")[:40], DEFAULT_LIMITS, InvalidImage),
        (b"%PDF-1.4 not an image", DEFAULT_LIMITS, UnsupportedMediaType),
        (image_bytes("PNG", (100, 100)), DecodeLimits(max_pixels=9_999), PayloadTooLarge),
    ],
)
async def test_a_bad_image_gets_the_error_it_gets_here(data, limits, error):
    with pytest.raises(error) as here:
        preprocess(data, RGB, limits)
    workers = DecoderProcesses(1)
    try:
        with pytest.raises(error) as there:
            await workers.submit(job(RGB, data, limits))
        assert there.value.message == here.value.message
        # And the worker goes on.
        ok = job(RGB, photos()[0])
        await workers.submit(ok)
        np.testing.assert_array_equal(ok.out, preprocess(photos()[0], RGB))
    finally:
        await workers.close()


async def test_shared_memory_grows_for_a_large_image_and_is_given_back():
    """A PNG larger than what a region keeps, and a tensor larger than it (a 2048 x 2048
    crop): each region grows for its job and is back to what it keeps after."""
    big = contract(resize=2048, crop=2048)
    data = image_bytes("PNG", (2100, 2048))
    assert len(data) > KEEP_REGION and big.input_shape[0] * 2048 * 2048 * 4 > KEEP_REGION
    workers = DecoderProcesses(1)
    try:
        done = job(big, data)
        await workers.submit(done)
        np.testing.assert_array_equal(done.out, preprocess(data, big))
        (worker,) = workers._idle
        assert worker._in.size == worker._out.size == KEEP_REGION
        small = job(RGB, photos()[1])
        await workers.submit(small)  # the worker maps the regions at their new size
        np.testing.assert_array_equal(small.out, preprocess(photos()[1], RGB))
    finally:
        await workers.close()


async def test_a_worker_that_dies_fails_its_image_and_is_replaced():
    big = image_bytes("PNG", (3000, 3000))  # long enough a decode to be killed during it
    workers = DecoderProcesses(1)
    try:
        warm = job(RGB, photos()[0])
        await workers.submit(warm)  # ready: a death from now on is the image's
        (worker,) = workers._idle
        decoding = workers.submit(job(RGB, big))
        os.kill(worker.proc.pid, signal.SIGKILL)
        with pytest.raises(InvalidImage, match="its decoder failed on it"):
            await decoding
        (replacement,) = workers._idle
        assert replacement is not worker
        # The killed process is reaped by its close task: its socket's end (what failed the
        # image) comes while the kernel is still tearing it down, so wait for its exit.
        assert await asyncio.to_thread(worker.proc.wait, 30) == -signal.SIGKILL
        after = job(RGB, photos()[1])
        await workers.submit(after)
        np.testing.assert_array_equal(after.out, preprocess(photos()[1], RGB))
    finally:
        await workers.close()
    assert replacement.proc.poll() is not None  # closed: the process has exited
