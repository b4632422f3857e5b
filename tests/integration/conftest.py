"""Fixtures of the integration tests (real sockets, in-process servers)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc as pbg

from tests.helpers.triton import ScriptedTriton


@pytest.fixture
def scripted():
    """A scripted Triton (tests.helpers.triton.ScriptedTriton) on a free loopback port:
    (the servicer, its address)."""
    servicer = ScriptedTriton()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    servicer.hold.set()
    server.stop(0)
