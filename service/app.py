"""The gateway application: ``create_app(settings) -> FastAPI``.

Nothing heavy happens at import time. The lifespan opens the backend, the preprocessing
pool and the batchers, and closes them in its ``finally``; routes find them on
``app.state``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from service import __version__
from service.api.kserve import v2, v2_models
from service.api.middleware import BodyLimit, Observe
from service.api.routes import api, ops
from service.auth import hash_keys
from service.backends import Backend, make_backend
from service.classifier import Classifier
from service.errors import InternalError, ServiceError
from service.metrics import Metrics
from service.model_store import RepositoryError, load_repository
from service.settings import Settings

log = logging.getLogger(__name__)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status, headers=headers)


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """One envelope for every error; 5xx bodies never carry internals."""

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        metrics.rejected(exc.code, exc.http_status)
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(int(exc.retry_after))
        return _error(exc.http_status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(
                str(p) for p in err.get("loc", ()) if p not in ("query", "header", "path")
            )
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        metrics.rejected("validation_failed", 422)
        return _error(422, "validation_failed", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        err = InternalError()
        return _error(500, err.code, err.message)


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> FastAPI:
    """Build the gateway. ``backend`` overrides the one ``settings`` names (tests)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        be = backend or make_backend(settings)
        try:
            specs = load_repository(settings.repository, settings.models or None)
            await be.start(specs)
            clf = Classifier(specs, be, settings, metrics)
        except (RepositoryError, ValueError) as exc:
            app.state.startup_error = str(exc)
            await be.close()
            raise
        clf.start()
        for spec in specs:
            metrics.model_info.labels(
                spec.name, spec.version, spec.precision, spec.contract.arch, be.name
            ).set(1)
        app.state.classifier = clf
        app.state.draining = False
        grpc_server = None
        if settings.grpc_port is not None:
            from service.grpc.server import GrpcServer

            grpc_server = GrpcServer(clf, metrics, app.state, settings.grpc_max_message_bytes)
            try:
                app.state.grpc_port = await grpc_server.start(settings.host, settings.grpc_port)
            except (OSError, RuntimeError) as exc:
                app.state.startup_error = (
                    f"cannot serve gRPC on {settings.host}:{settings.grpc_port} ({exc})"
                )
                await clf.close()
                await be.close()
                raise
        log.info(
            "serving %s with %s (default model %s)",
            ", ".join(f"{s.name} v{s.version}" for s in specs),
            be.name,
            clf.default_model,
        )
        try:
            yield
        finally:
            app.state.draining = True
            if grpc_server is not None:
                await grpc_server.stop(grace_s=settings.request_timeout_s)
            await clf.close()
            await be.close()
            log.info("gateway stopped")

    app = FastAPI(
        title="resnet-serving gateway",
        version=__version__,
        description="Image classification with ResNet models: REST, Prometheus metrics, "
        'health and readiness. Errors: `{"error": {"code", "message"}}`.',
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.classifier = None
    app.state.draining = False
    app.state.startup_error = None
    app.state.api_key_hashes = hash_keys(settings.api_keys)
    install_error_handlers(app, metrics)
    app.include_router(api)
    app.include_router(ops)
    app.include_router(v2)
    app.include_router(v2_models)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(Observe, metrics=metrics)
    return app
