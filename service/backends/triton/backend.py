"""The Triton backend the gateway holds: start, load and unload versions, run a batch,
readiness, and the health loop; the work is done by the parts it composes (inference,
model control, shared memory).

Versions are served side by side: everything is per (model, version), and each request
names its version. Readiness follows Triton: a health loop asks Triton (is it live, is every
version served ready) once a second. While Triton is down requests fail at once with 503 (no
hang), and when it is back the gateway recovers by itself. Each version's metadata from
Triton must agree with its contract (tensor names, shapes, datatype, classes), or the
version is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
from tritonclient.utils import InferenceServerException

from service.backends.base import Backend
from service.backends.triton.channels import admin_headers, channel_args, reason, status_code
from service.backends.triton.inference import Inference
from service.backends.triton.model_control import ModelControl
from service.backends.triton.shared_memory import SharedMemoryPool, shared_memory_bytes
from service.errors import BackendUnavailable, brief
from service.model.repository import ModelSpec, RepositoryError

log = logging.getLogger(__name__)

_MB = 1024 * 1024


class TritonBackend(Backend):
    name = "triton"
    max_inflight_batches = 4
    kernels = "triton"  # whatever Triton's node runs on; its own metrics say

    def __init__(
        self,
        url: str,
        *,
        max_retries: int = 2,
        backoff_s: float = 0.05,
        health_interval_s: float = 1.0,
        max_message_bytes: int = 64 * _MB,
        load_timeout_s: float = 600.0,
        admin_key: str | None = None,
        shared_memory: bool = False,
    ) -> None:
        """``load_timeout_s``: how long a load or unload request may take (Triton starts
        every version of the model's new set, warm-up included). ``admin_key``: the key of
        Triton's restricted ``model-repository`` protocol (``--grpc-restricted-protocol=
        model-repository:triton-admin-key=KEY``), sent with load and unload requests, and
        with the shared-memory ones. ``shared_memory``: batches go through system shared
        memory (:class:`SharedMemoryPool`; Triton on this host, one server)."""
        super().__init__()
        self.url = url
        self.load_timeout_s = load_timeout_s
        self.health_interval_s = health_interval_s
        self.shared_memory = shared_memory
        self._admin = admin_headers(admin_key)
        args = channel_args(max_message_bytes)
        self._inference = Inference(
            url, args, max_retries=max_retries, backoff_s=backoff_s, unavailable=self._not_ready
        )
        self._control = ModelControl(
            url, args, load_timeout_s=load_timeout_s, headers=self._admin, lost=self._not_ready
        )
        self._shm: SharedMemoryPool | None = None
        self._ready = False
        self._health: asyncio.Task[None] | None = None

    def _not_ready(self) -> None:
        """Fail the next requests fast; the health loop makes the backend ready again."""
        self._ready = False

    async def start(self, specs: list[ModelSpec]) -> None:
        self._control.adopt(specs)
        if self.shared_memory:
            if self.url.startswith(("dns:", "ipv4:", "ipv6:")) or not specs:
                raise RepositoryError(
                    f"shared memory needs one Triton on this host (host:port), not {self.url}"
                )
            self._shm = SharedMemoryPool(self.max_inflight_batches, shared_memory_bytes(specs))
        try:
            await self._check()
        except InferenceServerException as exc:
            if status_code(exc) in (
                "NOT_FOUND",
                "INVALID_ARGUMENT",
            ) or "Request for unknown model" in str(exc):
                raise RepositoryError(
                    f"Triton at {self.url} does not serve the models: {reason(exc)}"
                ) from exc
            log.warning(
                "triton at %s not reachable yet (%s); not ready until it is",
                self.url,
                status_code(exc),
            )
        else:
            for spec in specs if self._ready else []:
                try:
                    await self._warm_up(spec, serving=False)
                except InferenceServerException as exc:
                    log.warning(
                        "triton: %s version %s could not be timed at warm-up (%s); its "
                        "batcher starts from a guess and learns from live batches",
                        spec.name,
                        spec.version,
                        reason(exc),
                    )
        self._health = asyncio.create_task(self._health_loop(), name="triton-health")

    async def _warm_up(self, spec: ModelSpec, serving: bool) -> None:
        """Time batches through Triton for the batcher's cost model (``Backend.warm_up``: its
        sizes; Triton's own ``model_warmup`` in config.pbtxt has run every size by now, so
        these time a warm model, the gRPC transfer included, as live batches are)."""

        async def run(batch: np.ndarray) -> object:
            return await self._inference.once(spec, batch, self.load_timeout_s)

        await self.warm_up(spec, run, serving)

    async def load(self, spec: ModelSpec) -> None:
        await self._control.load(spec, lambda: self._warm_up(spec, serving=True))

    async def unload(self, spec: ModelSpec) -> None:
        await self._control.unload(spec)

    async def _check(self) -> None:
        # Not Triton's own readiness: with --strict-readiness it is false while any version
        # unloads, and stays false after a failed load until that version loads (measured,
        # Triton 2.51). What the gateway needs is every Triton live and serving its versions.
        await self._control.resolve()
        # The serving channel too: its calls are what must work, and asking it makes a
        # channel in reconnect backoff (Triton restarted) connect now.
        ready = bool(self._control.pods) and await self._inference.client.is_server_live(
            client_timeout=2
        )
        ready = ready and await self._control.serving_everywhere()
        if ready and self._shm is not None:
            pod = self._control.pods[0]  # the one Triton on this host
            await self._shm.register(self._control.client(pod), pod, self._admin)
        if ready != self._ready:
            log.warning("triton at %s is %s", self.url, "ready" if ready else "NOT ready")
        self._ready = ready

    async def _health_loop(self) -> None:
        problem = ""  # logged once, not every second
        while True:
            try:
                await self._check()
                problem = ""
            except (InferenceServerException, RepositoryError) as exc:
                self._ready = False
                if str(exc) != problem:
                    problem = str(exc)
                    log.warning("triton at %s is NOT ready: %s", self.url, brief(exc, limit=500))
            await asyncio.sleep(self.health_interval_s)

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        if not self._control.serves(spec):
            raise BackendUnavailable(f"model {spec.name!r} version {spec.version} is not loaded")
        if not self._ready:
            raise BackendUnavailable("the inference server is not ready; retry later")
        return await self._inference.logits(spec, batch, timeout_s, self._shm)

    def is_ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._ready = False
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
        if self._shm is not None:
            if self._control.pods:
                pod = self._control.pods[0]
                await self._shm.unregister(self._control.client(pod), self._admin)
            self._shm.destroy()
            self._shm = None
        await self._inference.close()
        await self._control.close()
