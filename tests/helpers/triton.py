"""Triton for the tests: a scripted server speaking Triton's gRPC protocol (failures on
cue), a real CPU tritonserver, and the gateway in front of one."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import grpc
import numpy as np
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from service.backends.triton.backend import TritonBackend
from service.host.processes import GatewayProcess, free_ports
from service.model.repository import ModelSpec
from tests.helpers.models import contract

CONTRACT = contract(
    arch="resnet18", channels="L", resize=8, crop=8, mean=(0.5,), std=(0.5,), num_classes=3
)

SPEC = ModelSpec(
    "m", "1", CONTRACT, ("a", "b", "c"), 8, Path("none"), "python", mc.ModelConfig(name="m")
)


class ScriptedTriton(pbg.GRPCInferenceServiceServicer):
    def __init__(self) -> None:
        self.failures: list[grpc.StatusCode] = []
        self.calls = 0
        #: While cleared, ModelInfer answers only once it is set (by the test).
        self.hold = threading.Event()
        self.hold.set()
        self.input_shape = [-1, 1, 8, 8]
        #: Each ModelInfer's metadata (what a tracing gateway sends along).
        self.metadata: list[dict[str, str]] = []

    def ServerLive(self, request, context):  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):  # noqa: N802
        return pb.ModelReadyResponse(ready=True)

    def ModelMetadata(self, request, context):  # noqa: N802
        return pb.ModelMetadataResponse(
            name="m",
            versions=["1"],
            platform="python",
            inputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name="input", datatype="FP32", shape=self.input_shape
                )
            ],
            outputs=[
                pb.ModelMetadataResponse.TensorMetadata(
                    name="logits", datatype="FP32", shape=[-1, 3]
                )
            ],
        )

    def ModelConfig(self, request, context):  # noqa: N802
        return pb.ModelConfigResponse(config=mc.ModelConfig(name="m", max_batch_size=8))

    def ModelInfer(self, request, context):  # noqa: N802
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        self.hold.wait(30)
        if self.failures:
            context.abort(self.failures.pop(0), "scripted failure")
        n = request.inputs[0].shape[0]
        x = np.frombuffer(request.raw_input_contents[0], dtype="<f4").reshape(n, -1)
        logits = np.stack([x.sum(1), -x.sum(1), np.zeros(n, np.float32)], axis=1).astype("<f4")
        return pb.ModelInferResponse(
            model_name="m",
            model_version="1",
            outputs=[
                pb.ModelInferResponse.InferOutputTensor(
                    name="logits", datatype="FP32", shape=[n, 3]
                )
            ],
            raw_output_contents=[logits.tobytes()],
        )


async def started(servicer: ScriptedTriton, url: str, **kw) -> TritonBackend:
    """A backend started on the scripted Triton; its warm-up (a timed batch of each size
    1, 2, 4, 8, twice: Backend.warm_up) has run, and is not counted in ``calls``."""
    backend = TritonBackend(url, backoff_s=0.01, **kw)
    await backend.start([SPEC])
    assert backend.is_ready()
    assert servicer.calls == 8 and sorted(backend.warm_costs(SPEC)) == [1, 2, 4, 8]
    servicer.calls = 0
    return backend


def start_real_triton(
    repo: Path,
    log: Path,
    ports: tuple[int, int, int] | None = None,
    extra_args: tuple[str, ...] = (),
    control: Literal["none", "explicit"] = "none",
):
    from service.tools.triton_launcher import start_triton

    http, grpc, metrics = ports or free_ports(3)
    server = start_triton(
        repo, http, grpc, metrics, log_path=log, extra_args=extra_args, control=control
    )
    server.wait_ready(180)
    return server


def gateway_on_triton(log: Path, repo: Path, triton) -> GatewayProcess:
    """The gateway (REST and gRPC) with the Triton backend, in front of ``triton``."""
    return GatewayProcess.start(
        log,
        "--repository",
        str(repo),
        "--backend",
        "triton",
        "--triton-url",
        triton.grpc_url,
        grpc=True,
    )


def registered(triton, key: str | None = None) -> set[str]:
    """The system shared memory regions Triton holds."""
    from service.backends.triton.channels import ADMIN_HEADER

    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    headers = {ADMIN_HEADER: key} if key else None
    status = client.get_system_shared_memory_status(headers=headers, as_json=True)
    client.close()
    return set(status.get("regions", {}))
