"""Tracing (OpenTelemetry), recorded by the SDK's in-memory exporter: the span tree of one
REST and one gRPC request continuing the caller's W3C trace, one batch span linked from two
concurrent requests, and the traceparent the gateway sends to a (scripted) Triton."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.backends.onnxruntime import OnnxRuntimeBackend
from service.dataplane.batching import Batcher
from service.host.processes import wait_until
from service.observability.metrics import Metrics
from service.observability.tracing import TracingError, provider_from_env
from service.settings import Settings
from service.transports.grpc import classifier_pb2 as cpb
from service.transports.http.app import create_app
from tests.helpers.doubles import SlowBackend
from tests.helpers.images import image_bytes
from tests.helpers.metrics import counted
from tests.helpers.triton import SPEC, started

TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE}-{CALLER}-01"
REQUEST_CHILDREN = {"preprocess", "queue", "batch", "top-k"}


def recorder() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


@pytest.fixture(scope="module")
def traced(tiny):
    provider, exporter = recorder()
    # A backend a test may hold a batch in, to queue requests together behind it.
    backend = SlowBackend(OnnxRuntimeBackend(), 0.0)
    settings = Settings(repository=tiny.repository, grpc_port=0)
    with TestClient(create_app(settings, backend, provider)) as client:
        yield client, exporter


def hexid(n: int, width: int = 16) -> str:
    return f"{n:0{width}x}"


def trace_of(exporter: InMemorySpanExporter, server_name: str) -> dict[str, ReadableSpan]:
    """The spans of the caller's trace once its server span has ended, by span id."""

    def spans() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if hexid(s.context.trace_id, 32) == TRACE]

    wait_until(lambda: any(s.name == server_name for s in spans()), 10, "no server span")
    return {hexid(s.context.span_id): s for s in spans()}


def children(spans: dict[str, ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    return {
        s.name: s
        for s in spans.values()
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    }


def assert_request_tree(spans: dict[str, ReadableSpan], server_name: str) -> ReadableSpan:
    server = next(s for s in spans.values() if s.name == server_name)
    assert server.kind == trace.SpanKind.SERVER
    assert hexid(server.parent.span_id) == CALLER and server.parent.is_remote  # continued
    below = children(spans, server)
    assert set(below) >= REQUEST_CHILDREN, sorted(below)
    infer = children(spans, below["batch"])["infer"]  # the backend call, inside the batch
    assert infer.attributes["resnet_serve.backend"] == "onnxruntime"
    assert below["batch"].attributes["resnet_serve.batch_size"] == 1
    attrs = server.attributes
    assert (attrs["resnet_serve.model"], attrs["resnet_serve.version"]) == ("tiny", "1")
    assert (attrs["resnet_serve.outcome"], attrs["resnet_serve.images"]) == ("ok", 1)
    # The stages are in order, inside the request.
    assert server.start_time <= below["preprocess"].start_time <= below["queue"].start_time
    assert below["queue"].end_time <= below["batch"].start_time + 5_000_000  # 5 ms of clocks
    assert below["top-k"].end_time <= server.end_time
    return server


def test_a_rest_request_continues_the_callers_trace(traced):
    client, exporter = traced
    exporter.clear()
    resp = client.post(
        "/v1/classify",
        content=image_bytes(),
        headers={"content-type": "image/png", "traceparent": TRACEPARENT},
    )
    assert resp.status_code == 200
    spans = trace_of(exporter, "/v1/classify")
    server = assert_request_tree(spans, "/v1/classify")
    assert "read" in children(spans, server)  # the body
    assert server.attributes["http.route"] == "/v1/classify"
    assert server.attributes["resnet_serve.request_id"] == resp.headers["x-request-id"]
    # The latency histogram carries the trace id as an exemplar (OpenMetrics, on request).
    text = client.get("/metrics", headers={"accept": "application/openmetrics-text"}).text
    assert any(
        line.startswith("resnet_serve_request_duration_seconds_bucket")
        and 'route="/v1/classify"' in line
        and f'# {{trace_id="{TRACE}"}}' in line
        for line in text.splitlines()
    )


def test_a_grpc_request_continues_the_callers_trace(traced):
    client, exporter = traced
    exporter.clear()
    with grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}") as channel:
        stub = channel.unary_unary(
            "/resnet_serving.v1.Classifier/Classify",
            request_serializer=cpb.ClassifyRequest.SerializeToString,
        )
        stub(
            cpb.ClassifyRequest(images=[image_bytes()]),
            timeout=30,
            metadata=(("traceparent", TRACEPARENT),),
        )
    name = "resnet_serving.v1.Classifier/Classify"
    server = assert_request_tree(trace_of(exporter, name), name)
    assert server.attributes["rpc.system"] == "grpc"


def test_one_batch_span_is_linked_from_every_request_in_it(traced):
    """Two requests queued together behind a batch held in the backend (the queue's depth
    says when both are there) go to it as one batch, whose span both traces reach."""
    client, exporter = traced
    backend: SlowBackend = client.app.state.runtime.backend
    registry = client.app.state.runtime.metrics.registry
    exporter.clear()

    def post(seed: int) -> Callable[[], None]:
        def call() -> None:
            resp = client.post(
                "/v1/classify",
                content=image_bytes(seed=seed),
                headers={"content-type": "image/png"},
            )
            assert resp.status_code == 200, resp.text

        return call

    def both_queued() -> bool:
        return counted(registry, "resnet_serve_queue_depth", model="tiny") == 2

    with backend.holding(post(0), post(1), post(2)):
        wait_until(both_queued, 30, "the two requests never queued together")
    wait_until(lambda: len(servers(exporter)) == 3, 10, "three server spans")
    requests = {s.context.span_id for s in servers(exporter)}
    assert len({s.context.trace_id for s in servers(exporter)}) == 3  # three traces
    batches = sorted(
        (s for s in exporter.get_finished_spans() if s.name == "batch"),
        key=lambda s: s.attributes["resnet_serve.batch_size"],
    )
    assert [b.attributes["resnet_serve.batch_size"] for b in batches] == [1, 2]
    held, pair = batches
    # The pair's batch: a child of one request, linked from the other; both traces reach it.
    parent_id = pair.parent.span_id
    linked = {link.context.span_id for link in pair.links}
    assert parent_id not in linked and len(linked) == 1
    assert {parent_id, *linked} == requests - {held.parent.span_id}


def servers(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind == trace.SpanKind.SERVER]


async def test_the_call_to_triton_carries_the_requests_trace(scripted):
    servicer, url = scripted
    backend = await started(servicer, url)
    provider, exporter = recorder()
    tracer = provider.get_tracer("test")

    async def infer(x: np.ndarray, timeout: float) -> np.ndarray:
        return await backend.infer(SPEC, x, timeout)

    batcher = Batcher(
        "m",
        infer,
        max_batch=8,
        max_delay_s=0,
        max_queue=8,
        metrics=Metrics(),
        backend_name="triton",
        tracer=tracer,
    )
    batcher.start()
    with tracer.start_as_current_span("request") as request:
        await batcher.submit([np.ones((1, 8, 8), np.float32)], time.perf_counter() + 10)
    await batcher.close()
    await backend.close()
    sent = servicer.metadata[-1]["traceparent"]
    _, trace_id, span_id, _ = sent.split("-")
    assert trace_id == hexid(request.get_span_context().trace_id, 32)
    infer_span = next(s for s in exporter.get_finished_spans() if s.name == "infer")
    assert span_id == hexid(infer_span.context.span_id)  # Triton's spans hang below it


def test_tracing_is_off_unless_the_environment_asks_and_refuses_what_it_cannot_do():
    assert provider_from_env({}) is None
    assert provider_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    assert provider_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is None
    provider = provider_from_env({"OTEL_TRACES_EXPORTER": "console"})
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "resnet-serving"
    provider.shutdown()
    with pytest.raises(TracingError, match="otlp or console"):
        provider_from_env({"OTEL_TRACES_EXPORTER": "jaeger"})
    for protocol in ("grpc", "http/protobuf"):
        otlp = provider_from_env(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
        )
        assert otlp is not None
        otlp.shutdown()
    with pytest.raises(TracingError, match="over grpc or http/protobuf"):
        provider_from_env(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )
