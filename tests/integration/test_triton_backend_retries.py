"""TritonBackend's failure policy: retries only transient codes, bounded, within the deadline.

A real Triton cannot be made to fail on cue, so this serves Triton's own gRPC protocol
(tritonclient's service definitions) from a scripted server on a real socket: it answers
ModelInfer with the status codes a test lines up, then with real logits.
"""

from __future__ import annotations

import threading
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pbg

from service.backends.triton.backend import TritonBackend
from service.errors import BackendUnavailable, DeadlineExceeded, Overloaded
from service.model.repository import ModelSpec, RepositoryError
from tests.conftest import contract

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


@pytest.fixture
def scripted():
    servicer = ScriptedTriton()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pbg.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    servicer.hold.set()
    server.stop(0)


async def started(servicer: ScriptedTriton, url: str, **kw) -> TritonBackend:
    """A backend started on the scripted Triton; its warm-up (a timed batch of each size
    1, 2, 4, 8, twice: Backend.warm_up) has run, and is not counted in ``calls``."""
    backend = TritonBackend(url, backoff_s=0.01, **kw)
    await backend.start([SPEC])
    assert backend.is_ready()
    assert servicer.calls == 8 and sorted(backend.warm_costs(SPEC)) == [1, 2, 4, 8]
    servicer.calls = 0
    return backend


BATCH = np.ones((2, 1, 8, 8), np.float32)


async def test_transient_failures_are_retried(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=2)
    servicer.failures = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    logits = await backend.infer(SPEC, BATCH, timeout_s=5)
    assert servicer.calls == 3
    np.testing.assert_allclose(logits[:, 0], [64, 64])
    await backend.close()


async def test_retries_are_bounded(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=1)
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 5
    with pytest.raises(BackendUnavailable):
        await backend.infer(SPEC, BATCH, timeout_s=5)
    assert servicer.calls == 2
    assert not backend.is_ready()  # the next requests fail fast until health says otherwise
    await backend.close()


async def test_exhausted_is_overloaded(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=0)
    servicer.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    with pytest.raises(Overloaded):
        await backend.infer(SPEC, BATCH, timeout_s=5)
    await backend.close()


async def test_other_errors_are_not_retried(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=3)
    servicer.failures = [grpc.StatusCode.INTERNAL]
    with pytest.raises(BackendUnavailable, match="INTERNAL"):
        await backend.infer(SPEC, BATCH, timeout_s=5)
    assert servicer.calls == 1
    await backend.close()


async def test_deadline_is_the_rpc_deadline(scripted):
    servicer, url = scripted
    backend = await started(servicer, url, max_retries=3)
    servicer.hold.clear()  # the answer comes only when the test says so
    with pytest.raises(DeadlineExceeded):
        await backend.infer(SPEC, BATCH, timeout_s=0.2)
    # At the deadline: not when the answer comes (it has not, yet), and not after a retry,
    # which would have been a second call, waiting for another deadline.
    assert servicer.calls == 1 and not servicer.hold.is_set()
    servicer.hold.set()
    await backend.close()


async def test_metadata_disagreement_refused(scripted):
    servicer, url = scripted
    servicer.input_shape = [-1, 3, 8, 8]
    backend = TritonBackend(url)
    with pytest.raises(
        RepositoryError,
        match=r"Triton inputs \['input' FP32 \[-1, 3, 8, 8\]\] != preprocess.json "
        r"\['input' FP32 \[-1, 1, 8, 8\]\]",
    ):
        await backend.start([SPEC])
    await backend.close()


async def test_unreachable_at_start_is_not_ready_and_fails_fast(scripted):
    """Triton not up yet: the gateway starts not-ready and answers 503 at once (recovery: see
    tests/e2e/test_triton.py, which kills and restarts a real Triton)."""
    from service.host.processes import free_port

    backend = TritonBackend(f"127.0.0.1:{free_port()}", health_interval_s=0.1)
    await backend.start([SPEC])
    assert not backend.is_ready()
    with pytest.raises(BackendUnavailable):
        await backend.infer(SPEC, BATCH, timeout_s=1)
    await backend.close()
