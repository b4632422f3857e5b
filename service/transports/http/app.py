"""The gateway application: ``create_app(settings) -> FastAPI``.

Nothing heavy happens at import time. The lifespan starts the :class:`Runtime` (repository,
backend, data plane) and, if configured, the gRPC server beside it; both transports get
the same runtime. Routes find it on ``app.state.runtime``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic.json_schema import models_json_schema

from service import __version__
from service.backends import Backend
from service.observability import tracing
from service.observability.metrics import Metrics
from service.runtime.core import Runtime, StartupError
from service.settings import Settings
from service.transports.http import kserve_http, rest_v1
from service.transports.http.error_responses import install_error_handlers
from service.transports.http.kserve_http import v2, v2_models
from service.transports.http.middleware import Admission, Admit, BodyLimit, Observe
from service.transports.http.ops import ops
from service.transports.http.pages import pages_router
from service.transports.http.rest_v1 import admin, api

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)
#: Routes whose requests are admitted before anything else is done (service.transports.http.middleware).
#: In the order they are tried: the most called first.
SHEDDABLE = (
    "classify",
    "classify_default",
    "model_infer",
    "classify_version",
    "model_version_infer",
)

DESCRIPTION = (
    "Image classification with ResNet models. REST `/v1` (errors: "
    '`{"error": {"code", "message"}}`), KServe v2 / Open Inference Protocol under `/v2` '
    '(errors: `{"error", "code"}`), Prometheus metrics, health and readiness. '
    "The same API is served over gRPC (`resnet_serving.v1.Classifier` and "
    "`inference.GRPCInferenceService`) when a gRPC port is set."
)


def create_app(
    settings: Settings | None = None,
    backend: Backend | None = None,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    """Build the gateway. ``backend`` overrides the one ``settings`` names (tests); so does
    ``tracer_provider`` the one the OTEL_* variables ask for (service.observability.tracing; raises
    TracingError for one it cannot make)."""
    settings = settings or Settings()
    metrics = Metrics()
    provider = tracer_provider or tracing.provider_from_env(os.environ)
    runtime = Runtime(settings, metrics, backend, tracing.tracer_of(provider))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await runtime.start()
            if settings.grpc_port is not None:
                await _start_grpc(app, runtime, settings)
        except StartupError as exc:
            app.state.startup_error = str(exc)
            await runtime.close()
            raise
        try:
            yield
        finally:
            await runtime.close()
            if provider is not None:
                provider.shutdown()  # the spans still buffered are exported now

    app = FastAPI(
        title="resnet-serving gateway",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own /docs and /redoc load Swagger UI and ReDoc from a CDN: ours serve them
        # from the gateway (service.transports.http.pages), at the same paths.
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.startup_error = None
    install_error_handlers(app)
    for router in (api, admin, ops, v2, v2_models):
        app.include_router(router)
    app.include_router(pages_router(app.title, bool(settings.api_keys), settings.try_page))
    # By operation id (a renamed route fails here, at start).
    routes = {
        r.operation_id: r
        for router in (api, v2_models)
        for r in router.routes
        if isinstance(r, APIRoute) and r.operation_id
    }
    # Each added outside the one before: Observe, Admit, BodyLimit, DirectClassify, routes.
    app.add_middleware(
        rest_v1.DirectClassify, routes=[routes[op] for op in rest_v1.DIRECT], runtime=runtime
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    # One admission check: the HTTP protocol's before the app (service.transports.http.guard, through
    # app.state.admission), and the middleware's for requests that did not come that way.
    app.state.admission = Admission([routes[op] for op in SHEDDABLE], runtime)
    app.add_middleware(Admit, admission=app.state.admission)
    app.add_middleware(Observe, runtime=runtime)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _start_grpc(app: FastAPI, runtime: Runtime, settings: Settings) -> None:
    from service.transports.grpc.grpc_server import GrpcServer

    server = GrpcServer(runtime, settings.grpc_max_message_bytes)
    try:
        app.state.grpc_port = await server.start(settings.host, settings.grpc_port or 0)
    except (OSError, RuntimeError) as exc:
        raise StartupError(
            f"cannot serve gRPC on {settings.host}:{settings.grpc_port} ({exc})"
        ) from exc
    runtime.on_stop(lambda: server.stop(grace_s=settings.request_timeout_s))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the schemas the classify body refers to by hand."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        _, extra = models_json_schema(
            [(m, "validation") for m in (*rest_v1.EXTRA_SCHEMAS, *kserve_http.EXTRA_SCHEMAS)],
            ref_template="#/components/schemas/{model}",
        )
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(extra["$defs"])
        # FastAPI documents a 422 of its own shape on every route with parameters; ours are
        # declared where they happen (service.transports.http.error_responses.responses), the rest never do.
        for path in doc["paths"].values():
            for operation in path.values():
                answer = operation.get("responses", {}).get("422", {})
                if "HTTPValidationError" in str(answer):
                    del operation["responses"]["422"]
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        app.openapi_schema = doc
    return app.openapi_schema
