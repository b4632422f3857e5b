"""A small OTLP trace receiver: the other end of a gateway with tracing on, without a collector.

Point a gateway's ``OTEL_EXPORTER_OTLP_ENDPOINT`` at ``http://127.0.0.1:<port>`` of an
:class:`OtlpReceiver` (with ``OTEL_TRACES_EXPORTER=otlp``) and it counts the spans the
gateway's exporter really serializes and sends, and keeps their trace ids: enough to see
that tracing is wired end to end, and what it costs (``make bench``'s tracing phase), before
a real collector is in place. It speaks both protocols OTEL_EXPORTER_OTLP_PROTOCOL names:
``grpc`` (the TraceService) and ``http/protobuf`` (a POST of the same protobuf message to
``/v1/traces``). It listens on 127.0.0.1 only and keeps nothing but the count and the ids.

    receiver = OtlpReceiver("grpc")
    ...  # a gateway with OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:{receiver.port}
    receiver.spans, receiver.trace_ids
    receiver.stop()

The protobuf messages come from ``opentelemetry-proto``, which the gateway's OTLP
exporters are built on (the ``service`` extra), and the gRPC server from ``grpcio``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pbg


class OtlpReceiver:
    """An OTLP trace receiver on 127.0.0.1 (a free port: ``port``) that counts the spans it
    is sent (``spans``) and keeps their trace ids (``trace_ids``, hex). ``protocol`` as
    OTEL_EXPORTER_OTLP_PROTOCOL says: ``grpc`` or ``http/protobuf``."""

    def __init__(self, protocol: str = "grpc") -> None:
        self.spans = 0
        self.trace_ids: set[str] = set()
        self._lock = threading.Lock()
        serve = self._serve_grpc if protocol == "grpc" else self._serve_http
        self.port, self.stop = serve()

    def received(self, request: pb.ExportTraceServiceRequest) -> None:
        """Count one export request's spans."""
        spans = [s for r in request.resource_spans for ss in r.scope_spans for s in ss.spans]
        with self._lock:  # the server's threads export concurrently
            self.spans += len(spans)
            self.trace_ids.update(s.trace_id.hex() for s in spans)

    def _serve_grpc(self) -> tuple[int, Callable[[], None]]:
        receiver = self

        class TraceService(pbg.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                receiver.received(request)
                return pb.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(2))
        pbg.add_TraceServiceServicer_to_server(TraceService(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()

        def stop() -> None:
            server.stop(0)

        return port, stop

    def _serve_http(self) -> tuple[int, Callable[[], None]]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/traces" or self.headers.get_content_type() != (
                    "application/x-protobuf"
                ):
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                request = pb.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.received(request)
                reply = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:  # quiet: the caller reads its own output
                pass

        http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=http.serve_forever, daemon=True).start()

        def stop() -> None:
            http.shutdown()
            http.server_close()

        return http.server_address[1], stop
