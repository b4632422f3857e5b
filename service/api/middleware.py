"""Pure ASGI middleware: admission before work, body-size limit, request ids, per-route
metrics, the last resort for errors (all answered through ``service.api.errors``)."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import error_response
from service.errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
)
from service.metrics import Metrics
from service.runtime import Runtime

log = logging.getLogger("service.access")


class BodyLimit:
    """413 before the body is read: from Content-Length, or as soon as a chunked body
    passes the limit (the receive wrapper raises, the app's handler answers 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name != b"content-length":
                continue
            try:
                length = int(value)
            except ValueError:
                error: Exception | None = InvalidRequest("bad Content-Length header")
            else:
                error = None
                if length > self.max_bytes:
                    error = PayloadTooLarge(
                        f"request body is {length} bytes; the limit is {self.max_bytes}"
                    )
            if error is not None:
                # The body is never read: the connection cannot be reused.
                response = error_response(
                    error, scope["path"], self.metrics, {"connection": "close"}
                )
                await response(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(
                        f"request body exceeds the limit of {self.max_bytes} bytes"
                    )
            return message

        await self.app(scope, limited, send)


class Admission:
    """A classification the model cannot take is refused here, before its body is read or
    its route's parameters are parsed: the same admission check the data plane makes
    (``DataPlane.shed``, for one image), but a refusal under overload costs tens of
    microseconds instead of the whole request path (about 0.5 ms measured), which is what
    keeps an overloaded replica's CPU for the requests it accepted. Anything the check
    cannot decide (unknown model, bad timeout header) goes on to the route, which answers it.
    """

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], runtime: Runtime) -> None:
        self.app = app
        self.routes = routes
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plane = self.runtime.plane
        if scope["type"] == "http" and scope["method"] == "POST" and plane is not None:
            for route in self.routes:
                match, child = route.matches(scope)
                if match is not Match.FULL:
                    continue
                try:
                    plane.shed(child["path_params"].get("model"), _timeout_header(scope))
                except (Overloaded, DeadlineExceeded) as exc:
                    scope["route"] = route  # labels the metrics as routing would
                    response = error_response(exc, scope["path"], self.runtime.metrics)
                    await response(scope, receive, send)
                    return
                except ServiceError:
                    pass  # the route answers it (404, 422...)
                break
        await self.app(scope, receive, send)


def _timeout_header(scope: Scope) -> float | None:
    for name, value in scope["headers"]:
        if name == b"x-request-timeout":
            try:
                return float(value)
            except ValueError:
                return None
    return None


class Observe:
    """Request ids (X-Request-ID in and out), status/latency metrics by route template,
    the access log line, and a response for anything the routes let escape."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = (
            next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
            or uuid.uuid4().hex
        )
        request_id = request_id[:64]
        scope.setdefault("state", {})["request_id"] = request_id
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if status:  # the response has begun: nothing left to answer with
                raise
            await error_response(exc, scope["path"], self.metrics)(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            route = _route_template(scope)
            elapsed = time.perf_counter() - start
            method = scope["method"]
            self.metrics.requests.labels(route, method, str(status or 500)).inc()
            self.metrics.latency.labels(route, method).observe(elapsed)
            if route not in ("/metrics", "/healthz", "/readyz"):
                log.info(
                    "%s %s %s %d %.1fms id=%s",
                    method,
                    route,
                    scope["path"][:200],
                    status,
                    elapsed * 1000,
                    request_id,
                )


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
