"""The gateway's gRPC server: the same runtime (data plane, readiness, keys) as HTTP.

Services: ``resnet_serving.v1.Classifier`` (``classifier_service``), ``inference.GRPCInferenceService``
(``kserve_grpc``; KServe v2 / Triton), the standard ``grpc.health.v1.Health`` (following
readiness: NOT_SERVING while starting, draining or with the backend down) and server
reflection. Every method runs inside ``rpc.unary`` (errors, keys, metrics).
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.runtime.core import Runtime
from service.transports.grpc import classifier_service, kserve_grpc
from service.transports.grpc.rpc import service_handler

log = logging.getLogger(__name__)
SERVICES = (classifier_service.SERVICE, kserve_grpc.SERVICE)
#: How often health follows readiness (the backend's readiness changes on its own).
HEALTH_INTERVAL_S = 0.25


class GrpcServer:
    def __init__(self, runtime: Runtime, max_message_bytes: int) -> None:
        self.runtime = runtime
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.server.add_generic_rpc_handlers(
            (
                service_handler(
                    runtime, classifier_service.SERVICE, classifier_service.methods(runtime)
                ),
                service_handler(runtime, kserve_grpc.SERVICE, kserve_grpc.methods(runtime)),
            )
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
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
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        while True:
            status = serving if self.runtime.not_ready_reason() is None else not_serving
            for name in ("", *SERVICES):
                await self.health.set(name, status)
            await asyncio.sleep(HEALTH_INTERVAL_S)

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; give the calls in flight ``grace_s`` to finish."""
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
