"""HTTP's one error mapping: every failure on any HTTP route becomes a response here.

Two dialects, chosen by the path: KServe v2 routes (``/v2...``) answer in the protocol's
shape, ``{"error": "message", "code": "..."}``; everything else in the gateway's envelope,
``{"error": {"code": "...", "message": "..."}}``. Both carry the same status and code for
the same fault. This is also the one place that sets Retry-After, makes the code the
request's outcome (``resnet_serve_requests_total{outcome=code}``, the log line) and turns
anything unexpected into a generic 500 (logged, never echoed).

Error bodies are ASCII: what a message echoes of the request (a model name in any script)
goes out as JSON escapes (``\u00f1``), so every client reads back the characters it sent,
whatever charset it assumes for ``application/json`` (one that assumed Latin-1 showed a
UTF-8 name as mojibake).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse

from service.errors import (
    ClientClosed,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTimeout,
    ServiceError,
    ValidationFailed,
    as_service_error,
)
from service.observability import observe
from service.transports.http.schemas import ErrorEnvelope, KServeError

KSERVE_PREFIX = "/v2"


def is_kserve(path: str) -> bool:
    return path == KSERVE_PREFIX or path.startswith(KSERVE_PREFIX + "/")


def error_response(
    exc: BaseException, path: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The response for ``exc`` on ``path``; its code becomes the request's outcome."""
    err = as_service_error(exc, f"HTTP {path[:200]}")
    if (record := observe.current()) is not None:
        record.outcome = err.code
    headers = dict(headers or {})
    if (retry_after := err.retry_after_header()) is not None:
        headers["Retry-After"] = retry_after
    return ErrorJSON(error_body(err, path), err.http_status, headers=headers)


def error_body(err: ServiceError, path: str) -> dict[str, Any]:
    """``err`` in the dialect of ``path``."""
    if is_kserve(path):
        return {"error": err.message, "code": err.code}
    return {"error": {"code": err.code, "message": err.message}}


class ErrorJSON(JSONResponse):
    """An error body: JSON, in ASCII (the module's docstring says why)."""

    def render(self, content: Any) -> bytes:
        return error_json(content)


def error_json(body: dict[str, Any]) -> bytes:
    """An error body's bytes: compact JSON, ASCII (the module's docstring says why)."""
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode("ascii")


def _as_service_error(exc: Exception, request: Request) -> BaseException:
    """Starlette's and FastAPI's own exceptions as ours."""
    if isinstance(exc, RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(
                str(p) for p in err.get("loc", ()) if p not in ("query", "header", "path", "body")
            )
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg", ""))
        return ValidationFailed("; ".join(parts) or "invalid request")
    if isinstance(exc, ClientDisconnect):
        if getattr(request.state, "body_timed_out", False):  # see service.transports.http.guard
            return RequestTimeout("request body not received in time")
        if (malformed := getattr(request.state, "malformed", None)) is not None:
            return malformed  # a body the HTTP parser refused (service.transports.http.guard)
        return ClientClosed("the client closed the connection before the request was read")
    if isinstance(exc, StarletteHTTPException):
        if exc.status_code == 404:
            return NotFound("no such route; see /docs")
        if exc.status_code == 405:
            return MethodNotAllowed("method not allowed on this route")
        if exc.status_code < 500:
            return InvalidRequest(str(exc.detail))
    return exc


#: What a route's handler answers itself (:func:`handle`). Anything else escapes the routes
#: and is answered by the Observe middleware, through error_response too (a handler for
#: Exception would also re-raise it to the server).
HANDLED = (ServiceError, RequestValidationError, StarletteHTTPException, ClientDisconnect)


async def handle(request: Request, exc: Exception) -> JSONResponse:
    """The answer to one of :data:`HANDLED` raised while serving ``request``."""
    headers = getattr(exc, "headers", None)  # a 405's Allow
    return error_response(_as_service_error(exc, request), request.url.path, headers)


def install_error_handlers(app: FastAPI) -> None:
    for cls in HANDLED:
        app.add_exception_handler(cls, handle)


_DESCRIPTIONS = {
    400: "Malformed request, or an image that does not decode",
    401: "Missing or wrong API key",
    403: "The admin API is off (no admin key configured)",
    404: "Unknown model or version",
    409: "A version the repository asks for cannot be served (the versions serving go on)",
    413: "Body, image or image count over its limit",
    415: "Not an image format (or content type) the gateway takes",
    422: "A parameter out of range (top_k, class_count, timeout) or a body field of the wrong type",
    503: "Queue full (Retry-After), backend unavailable, not ready, or shutting down",
    504: "The request's deadline passed",
}


def responses(*statuses: int, kserve: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses a route really answers."""
    model = KServeError if kserve else ErrorEnvelope
    return {s: {"model": model, "description": _DESCRIPTIONS[s]} for s in statuses}
