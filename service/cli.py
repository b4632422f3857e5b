"""``resnet-serve``: run the gateway (and, for tests and local work, a real Triton)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="resnet-serve",
    help="Serve ResNet classifiers from a model repository (REST, gRPC, Prometheus).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Serve ResNet classifiers from a model repository (REST, gRPC, Prometheus)."""


def _fail(message: str) -> typer.Exit:
    typer.echo(f"resnet-serve: error: {message}", err=True)
    return typer.Exit(1)


class _DrainingServer:
    """uvicorn.Server whose SIGTERM first marks the app not-ready for ``drain_seconds``
    (load balancers stop routing to it), then shuts down gracefully: the listening socket
    closes, in-flight requests finish, the lifespan drains the batchers."""

    def __init__(self, config: Any, fastapi_app: Any, drain_seconds: float) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            def handle_exit(inner, sig: int, frame: FrameType | None) -> None:  # noqa: N805
                fastapi_app.state.draining = True
                if drain_seconds > 0 and not inner.should_exit and sig == signal.SIGTERM:
                    logging.getLogger("service").info(
                        "SIGTERM: not ready; draining for %.1fs before shutdown", drain_seconds
                    )
                    asyncio.get_event_loop().call_later(
                        drain_seconds, lambda: setattr(inner, "should_exit", True)
                    )
                    return
                super().handle_exit(sig, frame)

        self.server = Server(config)

    def run(self) -> None:
        self.server.run()


@app.command()
def serve(
    repository: Annotated[
        Path, typer.Option("--repository", "-r", help="Model repository (resnet-export output).")
    ] = Path("model_repository"),
    backend: Annotated[
        str, typer.Option(help="onnxruntime (embedded, default) or triton.")
    ] = "onnxruntime",
    triton_url: Annotated[
        str | None, typer.Option(help="Triton gRPC endpoint HOST:PORT (backend triton).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="REST bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="REST port (default 8000).")] = None,
    grpc_port: Annotated[
        int | None, typer.Option(help="Also serve the gRPC API on this port.")
    ] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated models to serve (default: all).")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
) -> None:
    """Serve every model of the repository. All other settings: RESNET_SERVE_* (README)."""
    from pydantic import ValidationError

    from service.contract import describe_validation_error
    from service.model_store import RepositoryError, load_repository
    from service.settings import Settings

    overrides: dict[str, Any] = {"repository": repository, "backend": backend}
    for key, value in (
        ("triton_url", triton_url),
        ("host", host),
        ("port", port),
        ("grpc_port", grpc_port),
        ("models", models),
        ("log_level", log_level),
    ):
        if value is not None:
            overrides[key] = value
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        raise _fail(f"invalid settings: {describe_validation_error(exc)}") from None
    try:
        specs = load_repository(settings.repository, settings.models or None)
    except RepositoryError as exc:
        raise _fail(str(exc)) from None
    if settings.default_model and settings.default_model not in {s.name for s in specs}:
        raise _fail(f"default model {settings.default_model!r} is not among the served models")

    import uvicorn

    from service.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    fastapi_app = create_app(settings)
    config = uvicorn.Config(
        fastapi_app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        loop="uvloop",
        http="httptools",
    )
    typer.echo(
        f"resnet-serve: {', '.join(s.name for s in specs)} on http://{settings.host}:{settings.port} "
        f"(backend {settings.backend}; docs at /docs)"
    )
    _DrainingServer(config, fastapi_app, settings.drain_seconds).run()
    if getattr(fastapi_app.state, "startup_failed", False):
        raise typer.Exit(1)


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app(prog_name="resnet-serve")


if __name__ == "__main__":  # pragma: no cover
    main()
