"""The production backend: NVIDIA Triton over gRPC (tritonclient's asyncio client).

One long-lived channel; binary tensors; the request's remaining deadline becomes the RPC
deadline. Transient failures (UNAVAILABLE, RESOURCE_EXHAUSTED) are retried a bounded number
of times with jittered exponential backoff, and never past the deadline. Triton's own
dynamic batcher batches across gateway replicas; the gateway still coalesces what it sees
and keeps a few batches in flight per model.

Readiness follows Triton: a health loop asks Triton (server and every model) once a
second. While Triton is down requests fail at once with 503 (no hang), and when it is back
the gateway recovers by itself. At start, each model's metadata from Triton must agree with
its contract (tensor names, shapes, datatype, classes), or the model is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from typing import Any

import numpy as np
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc.aio import InferenceServerClient
from tritonclient.utils import InferenceServerException

from service import tracing
from service.backends.base import Backend
from service.errors import BackendUnavailable, DeadlineExceeded, InternalError, Overloaded
from service.repository import ModelSpec, RepositoryError, TensorSig, tensor_problems

log = logging.getLogger(__name__)

TRANSIENT = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
_MB = 1024 * 1024


def _code(exc: InferenceServerException) -> str:
    """'StatusCode.UNAVAILABLE' -> 'UNAVAILABLE' (empty if the client raised it itself)."""
    return str(exc.status() or "").rsplit(".", 1)[-1]


def metadata_problems(spec: ModelSpec, meta: dict[str, Any], max_batch: int) -> list[str]:
    """How Triton's model metadata disagrees with the model's contract."""

    def sigs(tensors: list[dict[str, Any]]) -> list[TensorSig]:
        return [
            TensorSig(t["name"], t["datatype"], tuple(int(d) for d in t["shape"])) for t in tensors
        ]

    problems = ["Triton's config has max_batch_size 0 (no batch axis)"] if max_batch < 1 else []
    return problems + tensor_problems(
        spec.contract, sigs(meta.get("inputs", [])), sigs(meta.get("outputs", [])), "Triton"
    )


class TritonBackend(Backend):
    name = "triton"
    max_inflight_batches = 4

    def __init__(
        self,
        url: str,
        *,
        max_retries: int = 2,
        backoff_s: float = 0.05,
        health_interval_s: float = 1.0,
        max_message_bytes: int = 64 * _MB,
    ) -> None:
        self.url = url
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.health_interval_s = health_interval_s
        self._channel_args = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            # Spread calls over every address the target resolves to: with a headless
            # Service (dns:///triton-headless:8001, as the Helm chart sets it) that is every
            # Triton pod. One long-lived channel behind a ClusterIP would pin each gateway to
            # one Triton. A plain host:port resolves to one address: nothing changes.
            ("grpc.lb_policy_name", "round_robin"),
            # Reconnect quickly once Triton is back.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self._client_: InferenceServerClient | None = None
        self._specs: dict[str, ModelSpec] = {}
        self._verified: set[str] = set()
        self._ready = False
        self._health: asyncio.Task[None] | None = None

    async def _verify(self, spec: ModelSpec) -> None:
        meta = await self._client.get_model_metadata(spec.name, as_json=True, client_timeout=5)
        cfg = (await self._client.get_model_config(spec.name, as_json=True, client_timeout=5))[
            "config"
        ]
        problems = metadata_problems(spec, meta, int(cfg.get("max_batch_size", 0)))
        if problems:
            raise RepositoryError(
                f"model {spec.name!r}: Triton at {self.url} serves something else than "
                f"its contract describes: " + "; ".join(problems)
            )
        self._verified.add(spec.name)
        log.info("triton: %s verified against its contract", spec.name)

    @property
    def _client(self) -> InferenceServerClient:
        """The channel, opened on first use: on the event loop that serves (grpc.aio
        binds a channel to the loop it was made on)."""
        if self._client_ is None:
            self._client_ = InferenceServerClient(self.url, channel_args=self._channel_args)
        return self._client_

    async def start(self, specs: list[ModelSpec]) -> None:
        self._specs = {s.name: s for s in specs}
        try:
            for spec in specs:
                await self._verify(spec)
            await self._check()
        except InferenceServerException as exc:
            if _code(exc) in (
                "NOT_FOUND",
                "INVALID_ARGUMENT",
            ) or "Request for unknown model" in str(exc):
                raise RepositoryError(
                    f"Triton at {self.url} does not serve the models: {exc.message()}"
                ) from exc
            log.warning(
                "triton at %s not reachable yet (%s); not ready until it is", self.url, _code(exc)
            )
        self._health = asyncio.create_task(self._health_loop(), name="triton-health")

    async def _check(self) -> None:
        ready = await self._client.is_server_ready(client_timeout=2)
        for name in self._specs:
            if not ready:
                break
            if name not in self._verified:
                await self._verify(self._specs[name])
            ready = await self._client.is_model_ready(name, client_timeout=2)
        if ready != self._ready:
            log.warning("triton at %s is %s", self.url, "ready" if ready else "NOT ready")
        self._ready = ready

    async def _health_loop(self) -> None:
        while True:
            try:
                await self._check()
            except (InferenceServerException, RepositoryError) as exc:
                if self._ready:
                    log.warning("triton at %s is NOT ready: %s", self.url, exc)
                self._ready = False
            await asyncio.sleep(self.health_interval_s)

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        if not self._ready:
            raise BackendUnavailable("the inference server is not ready; retry later")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        c = spec.contract
        inp = InferInput(c.input_name, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        out = InferRequestedOutput(c.output_name)
        attempt = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeadlineExceeded("request deadline exceeded waiting for the inference server")
            try:
                result = await self._client.infer(
                    spec.name,
                    [inp],
                    outputs=[out],
                    client_timeout=remaining,
                    headers=tracing.inject() or None,  # traceparent: Triton's trace joins ours
                )
                logits = result.as_numpy(c.output_name)
                if logits is None:
                    raise InternalError()
                return logits
            except InferenceServerException as exc:
                code = _code(exc)
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
                        self._ready = False  # fail the next requests fast; health loop restores
                        raise BackendUnavailable(
                            "the inference server is unavailable; retry later"
                        ) from exc
                    raise Overloaded(
                        "the inference server is overloaded; retry later", retry_after=1
                    ) from exc
                attempt += 1
                await asyncio.sleep(backoff)

    def is_ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._ready = False
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        if self._client_ is not None:
            await self._client_.close()
