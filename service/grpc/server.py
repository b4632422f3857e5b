"""The gateway's gRPC server: same process, same Classifier (preprocessing, batching,
backends) as REST; standard health checking and server reflection.

Errors map from :class:`service.errors.ServiceError` to status codes in one place
(``ServiceError.grpc_status``); bad input is never UNKNOWN, and INTERNAL carries no detail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import Counter, Histogram

from service.api.routes import not_ready_reason
from service.auth import check_key, key_from_headers
from service.classifier import Classifier
from service.errors import InternalError, ServiceError, ShuttingDown
from service.grpc import classifier_pb2, classifier_pb2_grpc
from service.metrics import Metrics

log = logging.getLogger(__name__)
SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name


class GrpcMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.requests = Counter(
            "resnet_serve_grpc_requests",
            "gRPC calls answered.",
            ["method", "code"],
            registry=metrics.registry,
        )
        self.latency = Histogram(
            "resnet_serve_grpc_duration_seconds",
            "gRPC call latency.",
            ["method"],
            registry=metrics.registry,
        )


class ClassifierService(classifier_pb2_grpc.ClassifierServicer):
    def __init__(
        self,
        classifier: Classifier,
        metrics: GrpcMetrics,
        api_key_hashes: list[bytes],
        draining: Callable[[], bool],
    ) -> None:
        self.clf = classifier
        self.metrics = metrics
        self.key_hashes = api_key_hashes
        self.draining = draining

    def _authorize(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        check_key(
            key_from_headers(md.get("authorization"), md.get("x-api-key")),
            self.key_hashes,
            "metadata authorization: Bearer KEY or x-api-key",
        )

    async def _call(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any], work: Callable[[], Any]
    ) -> Any:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if self.draining():
                raise ShuttingDown("the gateway is shutting down; retry on another replica")
            self._authorize(context)
            return await work()
        except ServiceError as exc:
            self.clf.metrics.rejected(exc.code, exc.http_status)
            code = grpc.StatusCode[exc.grpc_status]
            if exc.retry_after is not None:
                context.set_trailing_metadata((("retry-after", str(int(exc.retry_after))),))
            await context.abort(code, exc.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("gRPC %s failed", method)
            code = grpc.StatusCode.INTERNAL
            await context.abort(code, InternalError().message)
        finally:
            self.metrics.requests.labels(method, code.name).inc()
            self.metrics.latency.labels(method).observe(time.perf_counter() - start)

    async def Classify(  # noqa: N802 - gRPC method name
        self, request: classifier_pb2.ClassifyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> classifier_pb2.ClassifyResponse:
        async def work() -> classifier_pb2.ClassifyResponse:
            remaining = context.time_remaining()
            result = await self.clf.classify(
                request.model or None,
                list(request.images),
                request.top_k if request.top_k != 0 else None,
                remaining if remaining is not None and remaining < 1e6 else None,
            )
            return classifier_pb2.ClassifyResponse(
                model=result.model,
                model_version=result.version,
                results=[
                    classifier_pb2.Classification(
                        predictions=[
                            classifier_pb2.Prediction(index=p.index, label=p.label, score=p.score)
                            for p in row
                        ]
                    )
                    for row in result.predictions
                ],
            )

        response: classifier_pb2.ClassifyResponse = await self._call("Classify", context, work)
        return response

    async def ListModels(  # noqa: N802 - gRPC method name
        self, request: classifier_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> classifier_pb2.ListModelsResponse:
        async def work() -> classifier_pb2.ListModelsResponse:
            return classifier_pb2.ListModelsResponse(
                models=[
                    classifier_pb2.ModelInfo(
                        name=s.name,
                        version=s.version,
                        arch=s.contract.arch,
                        num_classes=s.contract.num_classes,
                        max_batch_size=self.clf.batchers[s.name].max_batch,
                        precision=s.precision,
                        is_default=s.name == self.clf.default_model,
                    )
                    for s in self.clf.specs.values()
                ]
            )

        response: classifier_pb2.ListModelsResponse = await self._call("ListModels", context, work)
        return response


class GrpcServer:
    """grpc.aio server with the Classifier, health checking and reflection."""

    def __init__(
        self, classifier: Classifier, metrics: Metrics, app_state: Any, max_message_bytes: int
    ) -> None:
        """``app_state``: the FastAPI app's state (API keys, draining flag, readiness)."""
        self.clf = classifier
        self.state = app_state
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.aio.server(options=options)
        classifier_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierService(
                classifier,
                GrpcMetrics(metrics),
                app_state.api_key_hashes,
                lambda: bool(app_state.draining),
            ),
            self.server,
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self._watch: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {host}:{port}")
        await self.server.start()
        self._watch = asyncio.create_task(self._track_health(), name="grpc-health")
        log.info("gRPC API on %s:%d", host, self.port)
        return self.port

    async def _track_health(self) -> None:
        """Health status follows readiness (backend ready, not draining)."""
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            ok = not_ready_reason(self.state) is None
            for name in ("", SERVICE_NAME):
                await self.health.set(name, serving if ok else not_serving)
            await asyncio.sleep(0.5)

    async def stop(self, grace_s: float) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
