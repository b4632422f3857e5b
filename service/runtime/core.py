"""What every transport shares: the data plane, the lifecycle, readiness, API keys.

One :class:`Runtime` per gateway, handed to the HTTP app and to the gRPC server alike, so
"ready", "draining" and "who may call" mean the same on every port. Its phases:

* ``starting``: loading the repository and warming the backend; not ready.
* ``serving``: ready (if the backend is).
* ``draining``: readiness says no (HTTP ``/readyz`` and the gRPC health service), so load
  balancers stop sending, but every call that still arrives is served as usual.
* ``stopping``: new calls are refused (503 ``shutting_down`` / ``UNAVAILABLE``) on every
  transport; calls already accepted finish; then the batchers drain and the backend closes.
* ``stopped``.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from service.backends import Backend, start_backend
from service.dataplane.plane import DataPlane
from service.errors import Forbidden, NotReady, ShuttingDown
from service.host.cpus import cpu_budget
from service.model.repository import RepositoryError, load_repository
from service.observability.metrics import Metrics
from service.runtime.auth import check_key, hash_keys
from service.runtime.lifecycle import Lifecycle
from service.runtime.shadow import Shadows
from service.settings import ENV_PREFIX, Settings

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"


def freeze_heap() -> None:
    """Move everything alive now (modules, sessions, the repository's models) out of the
    cyclic garbage collector's reach. A full collection scans every tracked object and
    stops every thread meanwhile: with the gateway's start-up heap (90 k objects) one took
    44-50 ms here, 200-250 ms in a test process with torch loaded; a tail-latency spike
    and, for requests admitted at the edge of their deadline, a 504. Reference counting
    still frees frozen objects; only cycles among them are never collected."""
    gc.collect()
    gc.freeze()


class StartupError(RuntimeError):
    """The gateway cannot start; the message says why, in one line."""


class Runtime:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        backend: Backend | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        """``backend`` overrides the one ``settings`` names (tests); ``tracer``: tracing on
        (service.observability.tracing), None: off."""
        self.settings = settings
        self.metrics = metrics
        self.backend = backend
        self.tracer = tracer
        self.plane: DataPlane | None = None
        self.shadows: Shadows | None = None
        self.lifecycle: Lifecycle | None = None
        self.phase = Phase.STARTING
        self._key_hashes = hash_keys(settings.api_keys)
        self._admin_hashes = hash_keys(settings.admin_keys)
        self._stoppers: list[Callable[[], Awaitable[None]]] = []
        self._stopping: asyncio.Future[list[None]] | None = None

    async def start(self) -> None:
        """Load the repository, start the backend and the data plane, or raise StartupError
        (then :meth:`close` releases what was started)."""
        budget = cpu_budget()
        log.info("sizing threads for %s", budget.describe())
        try:
            specs = load_repository(self.settings.repository, self.settings.models or None)
            if self.backend is None:
                self.backend = await start_backend(self.settings, specs)
            else:
                await self.backend.start(specs)
            backend = self.backend
            plane = DataPlane(specs, backend, self.settings, self.metrics, self.tracer)
        except (RepositoryError, ValueError) as exc:
            raise StartupError(str(exc)) from exc
        # Shadow versions get copies of the unpinned batches the plane answers.
        self.shadows = Shadows(
            self.metrics,
            plane.models.get,
            lambda: plane.decoder.backlog,
            self.settings.request_timeout_s,
        )
        plane.attach(self.shadows)
        plane.start()
        self.plane = plane  # closed with the runtime from here on
        lifecycle = Lifecycle(self.settings, plane, backend, self.metrics)
        try:
            lifecycle.start()
        except RepositoryError as exc:
            raise StartupError(str(exc)) from exc
        self.lifecycle = lifecycle
        freeze_heap()
        self.phase = Phase.SERVING
        log.info(
            "serving %s with %s (default model %s)",
            ", ".join(f"{s.name} v{s.version}" for s in specs),
            backend.name,
            plane.default_model,
        )

    # --- per call ---------------------------------------------------------------------------

    def admit(self) -> DataPlane:
        """The data plane for a new call, or the error that refuses it."""
        if self.phase in (Phase.STOPPING, Phase.STOPPED):
            raise ShuttingDown("the gateway is shutting down; retry on another replica")
        if self.plane is None:
            raise NotReady("the gateway is starting")
        return self.plane

    def authorize(self, key: str | None, how: str) -> None:
        """Raise Unauthorized unless ``key`` is a configured key (none configured: open)."""
        check_key(key, self._key_hashes, how)

    def authorize_admin(self, key: str | None, how: str) -> None:
        """Raise unless ``key`` is an admin key: Forbidden while none is configured (the
        admin API is off by default), Unauthorized for any other key."""
        if not self._admin_hashes:
            raise Forbidden(f"the admin API is off; set {ENV_PREFIX}ADMIN_KEYS to turn it on")
        check_key(key, self._admin_hashes, how)

    def manage(self) -> Lifecycle:
        """The model lifecycle (reloads, version states), refused as :meth:`admit` refuses."""
        self.admit()
        assert self.lifecycle is not None  # set with the data plane, in one step
        return self.lifecycle

    def not_ready_reason(self) -> str | None:
        """Why the gateway should get no traffic (None when it is ready): the one definition
        behind /readyz, /v2/health/ready, gRPC health, ServerReady and the ready metric."""
        if self.phase is not Phase.SERVING:
            return {Phase.STARTING: "starting", Phase.DRAINING: "draining"}.get(
                self.phase, "shutting down"
            )
        if self.backend is None or not self.backend.is_ready():
            return "backend not ready"
        return None

    # --- shutting down ----------------------------------------------------------------------

    def on_stop(self, stop: Callable[[], Awaitable[None]]) -> None:
        """Call ``stop`` when new calls must be refused (a transport's own graceful stop)."""
        self._stoppers.append(stop)

    def drain(self) -> None:
        """Report not ready, keep serving."""
        if self.phase is Phase.SERVING:
            self.phase = Phase.DRAINING

    def stop_accepting(self) -> None:
        """Refuse new calls on every transport; calls already accepted go on."""
        if self._stopping is None:
            self.phase = Phase.STOPPING
            self._stopping = asyncio.gather(*(stop() for stop in self._stoppers))

    async def shutdown(self, drain_s: float) -> None:
        """SIGTERM: drain for ``drain_s`` seconds, then stop accepting."""
        self.drain()
        if drain_s > 0:
            log.info("draining for %.1fs: not ready, still serving", drain_s)
            await asyncio.sleep(drain_s)
        self.stop_accepting()

    async def close(self) -> None:
        """Stop accepting (if not yet), let the transports finish, drain and close the rest."""
        self.stop_accepting()
        assert self._stopping is not None
        await self._stopping
        if self.lifecycle is not None:
            await self.lifecycle.close()
        if self.plane is not None:
            await self.plane.close()
        if self.backend is not None:
            await self.backend.close()
        self.phase = Phase.STOPPED
        log.info("gateway stopped")
