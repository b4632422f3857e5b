"""OpenTelemetry tracing: off unless the standard ``OTEL_*`` variables turn it on.

``OTEL_TRACES_EXPORTER=otlp`` (over gRPC, or HTTP with ``OTEL_EXPORTER_OTLP_PROTOCOL=
http/protobuf``; ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``,
headers, timeouts as the SDK reads them) or ``console``; ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_SERVICE_NAME`` (default ``resnet-serving``),
``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_BSP_*`` as the SDK defines them;
``OTEL_SDK_DISABLED=true`` turns it off again. Unset, or ``none``: no tracer at all, and
every place that would make a span tests one attribute instead.

What a request's trace holds (docs/operations.md, Tracing): a server span per request (its
parent from a W3C ``traceparent`` the client sent, over HTTP headers or gRPC metadata)
with children for reading the body, each image's decode + preprocess, the queue wait,
top-k; and per batch a ``batch`` span, a child of the request that opened it and linked
from every other request in it (one batch serves many traces), whose ``infer`` child is
the backend call. With the Triton backend that call carries ``traceparent``, so Triton's
own OpenTelemetry trace (``--trace-config mode=opentelemetry``) joins the request's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service import __version__

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

W3C = TraceContextTextMapPropagator()
EXPORTERS = ("otlp", "console")
# OTLP's transports, by OTEL_EXPORTER_OTLP_PROTOCOL: the Python SDK has no http/json exporter.
OTLP_PROTOCOLS = ("grpc", "http/protobuf")


class TracingError(ValueError):
    """The OTEL_* variables ask for something this gateway cannot do."""


def provider_from_env(env: Mapping[str, str]) -> TracerProvider | None:
    """The tracer provider the environment asks for, or None (tracing off)."""
    exporter = env.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter in ("", "none"):
        return None
    if exporter not in EXPORTERS:
        raise TracingError(
            f"OTEL_TRACES_EXPORTER={exporter}: this gateway exports traces with "
            f"{' or '.join(EXPORTERS)} (or none)"
        )
    protocol = env.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    ).strip()
    if exporter == "otlp" and protocol not in OTLP_PROTOCOLS:
        raise TracingError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: this gateway exports OTLP over "
            f"{' or '.join(OTLP_PROTOCOLS)}"
        )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; what is passed
    # here would override them, so the default name is passed only when neither names one.
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    resource = Resource.create({} if named else {"service.name": "resnet-serving"})
    provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
    span_exporter: SpanExporter
    if exporter == "otlp" and protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as OTLPHttpSpanExporter,
        )

        span_exporter = OTLPHttpSpanExporter()  # POSTs to <endpoint>/v1/traces
    else:
        span_exporter = ConsoleSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    return provider


def tracer_of(provider: TracerProvider | None) -> trace.Tracer | None:
    return provider.get_tracer("resnet-serving", __version__) if provider is not None else None


def parent_from(carrier: Mapping[str, str]) -> Context | None:
    """The caller's trace context from W3C ``traceparent``/``tracestate`` (HTTP headers or
    gRPC metadata, lower-case names), None if it sent none."""
    if "traceparent" not in carrier:
        return None
    return W3C.extract(carrier)


def inject() -> dict[str, str]:
    """``traceparent`` (and ``tracestate``) of the current span, for an outgoing call; empty
    when tracing is off or nothing is being traced."""
    carrier: dict[str, str] = {}
    W3C.inject(carrier)
    return carrier


def epoch_ns(perf: float) -> int:
    """A ``time.perf_counter()`` reading as the epoch nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.perf_counter() - perf) * 1e9)


def trace_id(span: trace.Span) -> str:
    return trace.format_trace_id(span.get_span_context().trace_id)
