"""How the gateway is served: uvicorn configured one way (the guarded HTTP protocol, the
process's logging, graceful shutdown), SIGTERM through the runtime's drain, start-up
failures in one line; and the same server on a thread of this process. ``resnet-serve
serve`` runs it; ``resnet-serve tune``, the benchmarks and the tests start gateways with it
or as processes (:mod:`service.host.processes`)."""

from __future__ import annotations

import asyncio
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from service.host.processes import free_port, wait_until

if TYPE_CHECKING:
    from service.backends.base import Backend
    from service.runtime.core import Runtime
    from service.settings import Settings


class OneLineStartupErrors:
    """ASGI wrapper: when the lifespan fails with a known cause (app.state.startup_error),
    uvicorn reports that one line instead of a traceback, and the process exits 1."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def quiet_send(message: Any) -> None:
            reason = getattr(self.app.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and reason:
                message = {**message, "message": f"resnet-serve: error: {reason}"}
            await send(message)

        try:
            await self.app(scope, receive, quiet_send)
        except BaseException:
            if getattr(self.app.state, "startup_error", None):
                return  # already reported in one line
            raise


class DrainingServer:
    """uvicorn.Server whose SIGTERM goes through the runtime's shutdown: not ready (but
    still serving, on every transport) for ``drain_seconds`` so load balancers stop
    routing to it; then every transport refuses new calls, in-flight ones finish, the
    batchers drain. A second signal, or SIGINT, skips the drain."""

    def __init__(self, config: Any, runtime: Any, drain_seconds: float) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            draining: asyncio.Task[None] | None = None

            def handle_exit(inner, sig: int, frame: FrameType | None) -> None:  # noqa: N805
                loop = asyncio.get_running_loop()
                if sig == signal.SIGTERM and inner.draining is None and not inner.should_exit:
                    inner.draining = loop.create_task(inner.drain_then_exit())
                    return
                loop.call_soon(runtime.stop_accepting)
                super().handle_exit(sig, frame)

            async def drain_then_exit(inner) -> None:  # noqa: N805
                await runtime.shutdown(drain_seconds)
                inner.should_exit = True

        self.server = Server(config)

    def run(self) -> bool:
        """Serve until shutdown; False if the app never started."""
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits 3 when the lifespan fails; we exit 1
            return False
        return bool(self.server.started)


def uvicorn_config(asgi: Any, fastapi_app: Any, settings: Any) -> Any:
    """uvicorn's configuration for the gateway: the one way it is served (by ``serve``, and
    by the tests and benchmarks that run it in a thread)."""
    import uvicorn

    from service.transports.http.guard import ConnectionLimits, Guard, guarded_protocol

    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_idle_timeout_s=settings.body_idle_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_headers=settings.max_headers,
        max_connections=settings.max_connections,
    )
    return uvicorn.Config(
        asgi,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # the process's logging (service.observability.observe), JSON or text
        access_log=False,
        server_header=False,  # no "server: uvicorn": what runs here is nobody's business
        lifespan="on",
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        timeout_keep_alive=settings.keep_alive_timeout_s,
        loop="uvloop",
        http=guarded_protocol(
            Guard(
                limits, fastapi_app.state.runtime.metrics, fastapi_app.state.admission.refuse_early
            )
        ),
    )


class ThreadedGateway:
    """The gateway served by uvicorn on a thread of this process, configured exactly as
    ``resnet-serve serve`` configures it, for a backend the caller chooses: real sockets,
    scripted costs. A context manager; ready when entered."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        import uvicorn

        from service.transports.http.app import create_app

        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
        self.app = create_app(self.settings, backend)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.app, self.settings))
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)
        self.url = f"http://127.0.0.1:{self.settings.port}"

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        wait_until(
            lambda: self.server.started,
            60,
            "gateway not started",
            alive=lambda: None if self.thread.is_alive() else "the server thread ended",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
