"""One batch through Triton: its request and response, and the retry policy.

One long-lived channel; binary tensors, or with a Triton on this host a region of system
shared memory (the RPC then carries only the request); the request's remaining deadline
becomes the RPC deadline. Transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried a
bounded number of times with jittered exponential backoff, and never past the deadline.
Triton's own dynamic batcher batches across gateway replicas; the gateway still coalesces
what it sees and keeps a few batches in flight per model.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from service.backends.triton.channels import status_code
from service.backends.triton.shared_memory import SharedMemoryPool
from service.errors import BackendUnavailable, DeadlineExceeded, InternalError, Overloaded
from service.model.repository import ModelSpec
from service.observability import tracing

log = logging.getLogger(__name__)

TRANSIENT = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")


def tensor_input(name: str, batch: np.ndarray, datatype: str) -> InferInput:
    """``batch`` as a binary tensor of the request."""
    inp = InferInput(name, list(batch.shape), datatype)
    inp.set_data_from_numpy(batch)
    return inp


class Inference:
    """Batches through Triton on the serving channel, balanced over every Triton behind
    ``url``. ``unavailable`` is called when Triton stayed unavailable through every retry:
    the backend then fails the next requests fast, until its health loop finds Triton
    back."""

    def __init__(
        self,
        url: str,
        channel_args: list[tuple[str, Any]],
        *,
        max_retries: int,
        backoff_s: float,
        unavailable: Callable[[], None],
    ) -> None:
        self.url = url
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._channel_args = channel_args
        self._unavailable = unavailable
        self._client_: InferenceServerClient | None = None

    @property
    def client(self) -> InferenceServerClient:
        """The channel, opened on first use: on the event loop that serves (grpc.aio
        binds a channel to the loop it was made on)."""
        if self._client_ is None:
            self._client_ = InferenceServerClient(self.url, channel_args=self._channel_args)
        return self._client_

    async def logits(
        self, spec: ModelSpec, batch: np.ndarray, timeout_s: float, pool: SharedMemoryPool | None
    ) -> np.ndarray:
        """The logits of ``batch``, through a region of ``pool`` where it fits, else over
        gRPC."""
        c = spec.contract
        out = InferRequestedOutput(c.output_name)
        shape = (len(batch), c.num_classes)
        out_bytes = shape[0] * shape[1] * 4  # FP32 logits (config.pbtxt's output)
        if pool is None or batch.nbytes + out_bytes > pool.byte_size:
            inp = tensor_input(c.input_name, batch, c.datatype)
            result = await self._call(spec, inp, out, timeout_s)
            logits = result.as_numpy(c.output_name)
            if logits is None:
                raise InternalError()
            return logits
        # Shared memory: the batch, then the logits, in one region of this host's memory
        # that Triton maps too; the RPC carries only the request.
        region = await pool.acquire()
        try:
            region.view(batch.dtype, batch.shape)[:] = batch
            inp = InferInput(c.input_name, list(batch.shape), c.datatype)
            inp.set_shared_memory(region.name, batch.nbytes)
            out.set_shared_memory(region.name, out_bytes, offset=batch.nbytes)
            await self._call(spec, inp, out, timeout_s)
            return region.view(np.float32, shape, offset=batch.nbytes).copy()
        finally:
            pool.release(region)

    async def once(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> object:
        """One batch over gRPC, not retried (what warm-up times)."""
        c = spec.contract
        return await self.client.infer(
            spec.name,
            [tensor_input(c.input_name, batch, c.datatype)],
            model_version=spec.version,
            outputs=[InferRequestedOutput(c.output_name)],
            client_timeout=timeout_s,
        )

    async def _call(
        self, spec: ModelSpec, inp: InferInput, out: InferRequestedOutput, timeout_s: float
    ) -> Any:
        """One batch through Triton, retried on transient failures within the deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded("request deadline exceeded waiting for the inference server")
            try:
                result = await self.client.infer(
                    spec.name,
                    [inp],
                    model_version=spec.version,
                    outputs=[out],
                    client_timeout=remaining,
                    headers=tracing.inject() or None,  # traceparent: Triton's trace joins ours
                )
                return result
            except InferenceServerException as exc:
                code = status_code(exc)
                if code == "DEADLINE_EXCEEDED":
                    raise DeadlineExceeded("the inference server did not answer in time") from exc
                if code not in TRANSIENT:
                    log.error("triton refused a batch of %s: %s %s", spec.name, code, exc.message())
                    raise BackendUnavailable(
                        f"the inference server failed the request ({code or 'error'})"
                    ) from exc
                backoff = self.backoff_s * (2**attempt) * random.uniform(0.5, 1.5)
                if attempt >= self.max_retries or loop.time() + backoff >= deadline:
                    if code == "UNAVAILABLE":
                        self._unavailable()
                        raise BackendUnavailable(
                            "the inference server is unavailable; retry later"
                        ) from exc
                    raise Overloaded(
                        "the inference server is overloaded; retry later", retry_after=1
                    ) from exc
                attempt += 1
                await asyncio.sleep(backoff)

    async def close(self) -> None:
        if self._client_ is not None:
            await self._client_.close()
