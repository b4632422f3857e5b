"""One request's account, the same on every transport: its id, its outcome, what it asked of
which model, and where its time went. The transports open it (REST and KServe HTTP in
``service.transports.http.middleware.Observe``, both gRPC services in ``service.transports.grpc.rpc.unary``), the
data plane and the error mappings fill it in, and :meth:`Record.finish` turns it into the
request metrics and the one log line per request.

The log line carries the request id (taken from ``X-Request-ID`` or gRPC metadata
``x-request-id`` when the client sends one, else generated; returned either way), the trace
id when tracing is on, model, version, image count, outcome and stage timings; never image
bytes, keys or bodies. ``RESNET_SERVE_LOG_FORMAT=json`` writes every log record as one JSON
object (python-json-logger); text stays the default for people reading a terminal.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace

from service.observability import tracing
from service.observability.metrics import Metrics

log = logging.getLogger("service.access")

#: Outcome of a request answered normally (an error's outcome is its code: overloaded...).
OK = "ok"
#: Routes that probes and scrapers poll: metrics yes, log lines no.
QUIET_ROUTES = frozenset(
    {
        "/metrics",
        "/healthz",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "inference.GRPCInferenceService/ServerLive",
        "inference.GRPCInferenceService/ServerReady",
    }
)
#: Outcomes that are the service's own failure (logged as warnings; the rest is the
#: client's doing or the load's).
FAULTS = frozenset({"internal", "backend_unavailable"})
_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,64}")


#: New request ids: 32 hex digits, this process's random 20 then a count (unique without a
#: random draw per request: uuid4 reads the kernel's random source every time).
_ID_PREFIX = os.urandom(10).hex()
_ID_COUNT = itertools.count(int.from_bytes(os.urandom(4), "big"))


def request_id(given: str | None) -> str:
    """The client's request id if it is a sane token (at most 64 printable characters of a
    conservative set, so it cannot forge log fields), else a new one."""
    if given and _ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ID_COUNT) % 16**12:012x}"


@dataclass
class Record:
    transport: str  # "http" or "grpc"
    route: str  # a route template or a gRPC method: bounded, never a raw path
    request_id: str
    start: float = field(default_factory=time.perf_counter)
    model: str | None = None
    version: str | None = None
    images: int = 0
    outcome: str = OK
    #: The transport's own status: "200", "UNAVAILABLE".
    status: str = ""
    trace_id: str | None = None
    #: The gateway's tracer when tracing is on (service.observability.tracing), else None.
    tracer: trace.Tracer | None = None
    #: Seconds per stage (read, preprocess, queue, infer); summed over a request's images.
    stages: dict[str, float] = field(default_factory=dict)
    #: The caller's client key (X-Client-ID / x-client-id): a canary sends the same key to
    #: the same version. Only hashed, never logged.
    client: str | None = None

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def finish(self, metrics: Metrics) -> None:
        """Count the request and write its log line (once, when it has been answered)."""
        elapsed = time.perf_counter() - self.start
        metrics.child(metrics.requests, self.transport, self.route, self.outcome).inc()
        exemplar = {"trace_id": self.trace_id} if self.trace_id else None
        metrics.child(metrics.latency, self.transport, self.route).observe(elapsed, exemplar)
        level = logging.WARNING if self.outcome in FAULTS else logging.INFO
        if self.route in QUIET_ROUTES or not log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "transport": self.transport,
            "route": self.route,
            "status": self.status,
            "outcome": self.outcome,
            "duration_ms": round(elapsed * 1000, 2),
        }
        if self.trace_id:
            fields["trace_id"] = self.trace_id
        if self.model:
            fields.update(model=self.model, version=self.version, images=self.images)
        if self.stages:
            fields["stages_ms"] = {k: round(v * 1000, 2) for k, v in self.stages.items()}
        log.log(
            level,
            "%s %s %s %s %.1fms id=%s",
            self.transport,
            self.route,
            self.status,
            self.outcome,
            elapsed * 1000,
            self.request_id,
            extra=fields,
        )


_current: ContextVar[Record | None] = ContextVar("resnet_serve_request", default=None)


def current() -> Record | None:
    """The record of the request being handled in this task (None outside a request)."""
    return _current.get()


@contextlib.contextmanager
def handling(record: Record, metrics: Metrics, carrier: Mapping[str, str]) -> Iterator[Record]:
    """Handle a request under ``record``: current for the task; with tracing on, inside a
    server span whose parent is the caller's ``traceparent`` in ``carrier`` (headers or
    metadata). On exit (the transport has set route, status and outcome by then) the
    request is counted and logged, and its span ends with its attributes."""
    _current.set(record)
    span, token = None, None
    if record.tracer is not None:
        span = record.tracer.start_span(
            record.route, context=tracing.parent_from(carrier), kind=trace.SpanKind.SERVER
        )
        record.trace_id = tracing.trace_id(span)
        token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield record
    finally:
        record.finish(metrics)
        if span is not None and token is not None:
            span.update_name(record.route)
            attributes: dict[str, Any] = (
                {"rpc.system": "grpc", "rpc.method": record.route}
                if record.transport == "grpc"
                else {"http.route": record.route}
            )
            attributes.update(
                {
                    "resnet_serve.transport": record.transport,
                    "resnet_serve.request_id": record.request_id,
                    "resnet_serve.outcome": record.outcome,
                    "resnet_serve.status": record.status,
                    "resnet_serve.images": record.images,
                }
            )
            if record.model:
                attributes.update(
                    {"resnet_serve.model": record.model, "resnet_serve.version": record.version}
                )
            span.set_attributes(attributes)
            if record.outcome in FAULTS:
                span.set_status(trace.StatusCode.ERROR, record.outcome)
            otel_context.detach(token)
            span.end()


def span(name: str, **attributes: Any) -> AbstractContextManager[Any]:
    """A child span of the current request's, when tracing is on (else nothing at all)."""
    record = _current.get()
    if record is None or record.tracer is None:
        return contextlib.nullcontext()
    return record.tracer.start_as_current_span(name, attributes=attributes)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """A stage of the current request: its time on the log line, and a child span."""
    start = time.perf_counter()
    with span(name):
        try:
            yield
        finally:
            stage(name, time.perf_counter() - start)


def past_span(name: str, start: float, end: float, **attributes: Any) -> None:
    """A child span of the current request's for a stage already over (``perf_counter``
    readings), when tracing is on: the queue wait, known once the batch has run."""
    record = _current.get()
    if record is not None and record.tracer is not None:
        s = record.tracer.start_span(
            name, start_time=tracing.epoch_ns(start), attributes=attributes
        )
        s.end(end_time=tracing.epoch_ns(end))


def stage(name: str, seconds: float) -> None:
    """Add to the current request's time in a stage, if any."""
    if (record := _current.get()) is not None:
        record.add(name, seconds)


def images(n: int) -> None:
    """Set the current request's image count, if any."""
    if (record := _current.get()) is not None:
        record.images = n


def serving(model: str, version: str) -> None:
    """Name the model version answering the current request, if any."""
    if (record := _current.get()) is not None:
        record.model, record.version = model, version


class FloodFilter(logging.Filter):
    """At most ``burst`` lines per ``window_s`` for each kind of failure (route and
    outcome): a client hammering a bad request, or an overload refusing thousands, must not
    drown the log or cost the replica its CPU when it has least to spare. What is dropped
    is counted and said in the next line of that kind let through (and every failure is
    in ``requests_total`` regardless). Successes always pass: one line per request."""

    def __init__(self, burst: int = 20, window_s: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_s = window_s
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list[float]] = {}  # key -> [window start, n, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        outcome = getattr(record, "outcome", OK)
        if outcome == OK:
            return True
        key = (str(getattr(record, "route", "")), outcome)
        now = time.monotonic()
        with self._lock:
            start, n, dropped = self._seen.get(key, (now, 0, 0))
            if now - start >= self.window_s:
                start, n = now, 0
            n += 1
            if n > self.burst:
                self._seen[key] = [start, n, dropped + 1]
                return False
            self._seen[key] = [start, n, 0]
        if dropped:
            record.suppressed = int(dropped)
            record.msg = f"{record.msg} (and {int(dropped)} more like it, not logged)"
        return True


def configure_logging(level: str, fmt: str) -> None:
    """The process's logging: ``fmt`` "text" (for people) or "json" (one object per line,
    for log pipelines); uvicorn's loggers go through the same handler."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"levelname": "level", "name": "logger", "asctime": "time"},
                # uvicorn's copy of its message with terminal colours
                reserved_attrs=[*RESERVED_ATTRS, "color_message"],
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    log.filters[:] = [FloodFilter()]
