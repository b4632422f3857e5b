"""A request's encoded images into its model's input batch, by the served version's
contract: the request is admitted first (before a byte is decoded: a refusal costs
microseconds), then each image is decoded and preprocessed in a decoding process (the
shared, fair, deadline-aware pool of :mod:`service.dataplane.decode_scheduler`) straight
into its row of the batch."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np

from service.dataplane.decode_scheduler import DecodePool
from service.dataplane.decode_workers import PreprocessJob
from service.dataplane.preprocess import DecodeLimits
from service.dataplane.routing import Version
from service.errors import DeadlineExceeded, ServiceError
from service.observability import observe
from service.observability.metrics import Metrics


class RequestDecoder:
    """Decodes requests' images on ``pool`` within ``limits``; counts each image in its
    version's decode estimate and the preprocess metric."""

    def __init__(self, pool: DecodePool, limits: DecodeLimits, metrics: Metrics) -> None:
        self.pool = pool
        self.limits = limits
        self.metrics = metrics

    async def decode(self, served: Version, deadline: float, images: list[bytes]) -> np.ndarray:
        """Encoded images -> ``served``'s input batch; 504 at ``deadline``. Its place in the
        batcher's queue is reserved for the batch (released if decoding fails). The first
        bad image is the error (named by position when there are several)."""
        n = len(images)
        observe.images(n)
        # Its own decoding, behind what the pool already has (a burst of arrivals).
        decode_s = served.decode_s * math.ceil((self.pool.backlog + n) / self.pool.workers)
        served.batcher.reserve(n, deadline, extra_s=decode_s)
        start = time.perf_counter()
        # Each image is written into its row of the request's batch (no stacking copy).
        contract = served.spec.contract
        batch = np.empty((n, *contract.input_shape), dtype=contract.dtype)
        try:
            # Each decode ends at the deadline (DecodePool.run), so the request does too.
            if n == 1:
                await self._decode_one(served, deadline, 0, images[0], batch[0])
            else:
                jobs = [
                    self._decode_one(served, deadline, k, data, batch[k])
                    for k, data in enumerate(images)
                ]
                for k, res in enumerate(await asyncio.gather(*jobs, return_exceptions=True)):
                    if isinstance(res, ServiceError) and not isinstance(res, DeadlineExceeded):
                        res.message = f"image {k + 1}: {res.message}"
                    if isinstance(res, BaseException):
                        raise res
        except BaseException:
            served.batcher.release(n)
            served.stats.durations["fail"].add(time.perf_counter() - start)
            raise
        elapsed = time.perf_counter() - start
        served.stats.durations["compute_input"].add(elapsed)
        observe.stage("preprocess", elapsed)
        return batch

    async def _decode_one(
        self, served: Version, deadline: float, k: int, data: bytes, out: np.ndarray
    ) -> None:
        """Preprocess image ``k`` into ``out`` (its row of the request's batch)."""
        spec = served.spec
        with observe.span(
            "preprocess", **{"resnet_serve.image": k, "resnet_serve.bytes": len(data)}
        ):
            job = PreprocessJob(spec.contract, self.limits, data, out)
            elapsed = await self.pool.run(spec.name, deadline, job)
        served.decode_s += 0.1 * (elapsed - served.decode_s)
        self.metrics.child(self.metrics.preprocess, spec.name, spec.version).observe(elapsed)
