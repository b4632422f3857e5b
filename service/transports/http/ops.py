"""Operations routes: liveness, readiness, Prometheus. Open even when API keys are set."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

from service.errors import NotReady
from service.transports.http.deps import RuntimeDep
from service.transports.http.error_responses import responses
from service.transports.http.schemas import Health

ops = APIRouter(tags=["operations"])


@ops.get("/healthz", operation_id="healthz", summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@ops.get(
    "/readyz",
    operation_id="readyz",
    summary="Readiness: models loaded and warm, backend ready, not draining",
    responses=responses(503),
)
async def readyz(rt: RuntimeDep) -> Health:
    if reason := rt.not_ready_reason():
        raise NotReady(reason)
    return Health(status="ready")


@ops.get(
    "/metrics",
    operation_id="metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {}, "application/openmetrics-text": {}},
            "description": "Prometheus text format, or OpenMetrics (with exemplars) on request",
        }
    },
)
async def metrics(rt: RuntimeDep, accept: Annotated[str, Header()] = "") -> Response:
    rt.metrics.ready.set(0 if rt.not_ready_reason() else 1)
    if "application/openmetrics-text" in accept:
        # Prometheus asks for OpenMetrics when it stores exemplars: the latency histogram's
        # carry the trace id of a request in each bucket when tracing is on.
        body = openmetrics.generate_latest(rt.metrics.registry)
        return Response(body, media_type=openmetrics.CONTENT_TYPE_LATEST)
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)
