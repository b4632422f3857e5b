"""Pure ASGI middleware: admission before work, body-size limit, request ids, per-route
metrics, the last resort for errors (all answered through ``service.transports.http.error_responses``)."""

from __future__ import annotations

import contextvars
import re
from dataclasses import dataclass

from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.dataplane.plane import MIN_TIMEOUT_S
from service.errors import (
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    PayloadTooLarge,
    ServiceError,
)
from service.observability import observe
from service.runtime.core import Runtime
from service.transports.http.error_responses import error_response


class BodyLimit:
    """413 before the body is read: from Content-Length, or as soon as a chunked body
    passes the limit (the receive wrapper raises, the app's handler answers 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

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
                response = error_response(error, scope["path"], {"connection": "close"})
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
    """A classification the model cannot take is refused before its body is read or its
    route's parameters are parsed: the same admission check the data plane makes
    (``DataPlane.shed``, for one image), but a refusal under overload costs tens of
    microseconds instead of the whole request path. Anything the check cannot decide
    (unknown model, bad timeout header) goes on to the route, which answers it. What it
    found is left in the scope (:class:`Matched`), so that the direct path
    (``service.transports.http.rest_v1.DirectClassify``) neither matches the route nor reads the header again.

    The gateway's HTTP protocol runs it before the request reaches the app at all
    (:meth:`refuse_early`, ``service.transports.http.guard``); the middleware (:class:`Admit`) runs it
    for a request that did not come that way (an in-process client, such as an ASGI test
    transport)."""

    def __init__(self, routes: list[APIRoute], runtime: Runtime) -> None:
        self.routes = routes
        self.runtime = runtime
        # Their paths' last segments ("/classify", "/infer"): any other path is not theirs,
        # and is told so without trying each route's pattern on it.
        self._ends = tuple({"/" + r.path.rsplit("/", 1)[1] for r in routes})
        assert not any("{" in end for end in self._ends), self._ends

    def check(self, scope: Scope) -> ServiceError | None:
        """The refusal of a classify request its model cannot take now, if it is one (its
        route then labels it, as routing would); None to let it in. Leaves Matched."""
        if not scope["path"].endswith(self._ends):
            return None
        for route in self.routes:
            match, child = route.matches(scope)
            if match is not Match.FULL:
                continue
            found = scope[MATCHED] = Matched(route, child["path_params"], *_timeout(scope))
            if (plane := self.runtime.plane) is None:
                return None  # not started: the route answers 503
            try:
                plane.shed(found.model, found.timeout, found.version)
            except (Overloaded, DeadlineExceeded) as exc:
                scope["route"] = route
                return exc
            except ServiceError:
                pass  # the route answers it (404, 422...)
            return None
        return None

    def refuse_early(self, scope: Scope) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """For the protocol, before the app: the answer (status, headers, body) to a POST
        the check refuses, counted, logged and traced as Observe does; else None."""
        if scope["method"] != "POST" or (refusal := self.check(scope)) is None:
            return None
        record, headers = _record(scope, self.runtime)
        # In a context of its own: the request's record is current there, not in the loop's.
        response = contextvars.copy_context().run(
            _refused, refusal, record, self.runtime, headers, scope
        )
        extra = [(b"x-request-id", record.request_id.encode("latin-1"))]
        return response.status_code, [*response.raw_headers, *extra], bytes(response.body)


def _refused(
    refusal: ServiceError,
    record: observe.Record,
    runtime: Runtime,
    headers: dict[str, str],
    scope: Scope,
) -> Response:
    """``refusal``'s answer, with the request counted, logged and traced as Observe does."""
    with observe.handling(record, runtime.metrics, headers):
        response = error_response(refusal, scope["path"])  # the outcome: its code
        record.route, record.status = _route_template(scope), str(response.status_code)
    return response


class Admit:
    """ASGI middleware: :class:`Admission` for a request the protocol did not check."""

    def __init__(self, app: ASGIApp, admission: Admission) -> None:
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and MATCHED not in scope
            and (refusal := self.admission.check(scope)) is not None
        ):
            await error_response(refusal, scope["path"])(scope, receive, send)
            return
        await self.app(scope, receive, send)


MATCHED = "resnet_serving.matched"  # the scope key Admission leaves its Matched under


@dataclass(frozen=True, slots=True)
class Matched:
    """A classify request's route, path parameters and timeout header, as Admission read them."""

    route: BaseRoute
    path_params: dict[str, str]
    # x-request-timeout as float() reads it, for shedding; None when absent or unreadable.
    timeout: float | None
    # Absent, or once and spelled as plain decimal seconds of at least MIN_TIMEOUT_S: the
    # direct path may take it; any other spelling goes to the route, whose 422 words it.
    plain_timeout: bool

    @property
    def model(self) -> str | None:
        return self.path_params.get("model")

    @property
    def version(self) -> str | None:
        return self.path_params.get("version")


_SECONDS = re.compile(rb"[0-9]{1,6}(\.[0-9]{0,9})?")


def _timeout(scope: Scope) -> tuple[float | None, bool]:
    """(seconds, plain) of the x-request-timeout header: see :class:`Matched`."""
    values = [value for name, value in scope["headers"] if name == b"x-request-timeout"]
    if not values:
        return None, True
    try:
        seconds = float(values[0])
    except ValueError:
        return None, False
    plain = len(values) == 1 and bool(_SECONDS.fullmatch(values[0])) and seconds >= MIN_TIMEOUT_S
    return seconds, plain


class Observe:
    """Each HTTP request's record (``service.observability.observe``): its request id (X-Request-ID in and
    out), trace (W3C ``traceparent`` in), outcome, metrics and log line; and a response for
    anything the routes let escape."""

    def __init__(self, app: ASGIApp, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record, headers = _record(scope, self.runtime)
        scope.setdefault("state", {})["request_id"] = record.request_id
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", record.request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        metrics = self.runtime.metrics
        metrics.inflight.inc()
        with observe.handling(record, metrics, headers):
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception as exc:
                if status:  # the response has begun: nothing left to answer with
                    record.outcome = "internal"
                    raise
                await error_response(exc, scope["path"])(scope, receive, send_wrapper)
            finally:
                metrics.inflight.dec()
                record.route = _route_template(scope)
                record.status = str(status or 500)


def _record(scope: Scope, runtime: Runtime) -> tuple[observe.Record, dict[str, str]]:
    """A new HTTP request's record (its request id from X-Request-ID, or a new one), and
    its headers as text (the trace context's carrier)."""
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    record = observe.Record(
        "http",
        "unmatched",
        observe.request_id(headers.get("x-request-id")),
        tracer=runtime.tracer,
        client=headers.get("x-client-id"),
    )
    return record, headers


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
