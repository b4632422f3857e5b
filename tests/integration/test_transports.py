"""One fault, four transports: REST /v1, KServe v2 over HTTP, KServe v2 over gRPC and the
Classifier gRPC service answer each error kind with the matching status, the same code,
and exactly one rejection counted; every HTTP status is one the OpenAPI document lists."""

from __future__ import annotations

import base64
import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import grpc
import pytest
from fastapi.testclient import TestClient
from tritonclient.grpc import service_pb2 as kpb

from service.backends.onnxruntime import OnnxRuntimeBackend
from service.backends.triton.backend import TritonBackend
from service.dataplane.preprocess import preprocess
from service.host.processes import free_port, wait_until
from service.settings import Settings
from service.transports.grpc import classifier_pb2 as cpb
from service.transports.http.app import create_app
from service.transports.openinference import serialize_bytes
from tests.helpers.doubles import SlowBackend
from tests.helpers.images import image_bytes, slow_to_decode
from tests.helpers.metrics import counted
from tests.helpers.timing import fastest_of

GOOD = image_bytes()
BAD_PNG = GOOD[:60]  # a truncated file


@dataclass
class Call:
    """What to send: the same request in every transport's terms."""

    images: list[bytes] = field(default_factory=lambda: [GOOD])
    model: str = "tiny"
    top_k: int | None = None
    key: str | None = None
    #: A pinned version (None: the model's routing picks one).
    version: str | None = None

    def path(self, prefix: str) -> str:
        """``prefix/{model}`` or ``prefix/{model}/versions/{version}``, and the template."""
        if self.version is None:
            return f"{prefix}/{self.model}", prefix + "/{model}"
        return (
            f"{prefix}/{self.model}/versions/{self.version}",
            prefix + "/{model}/versions/{version}",
        )


@dataclass
class Answer:
    status: int | grpc.StatusCode
    code: str
    retry_after: str | None


class Gateway:
    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.channel = grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}")

    def rejections(self, code: str) -> float:
        registry = self.client.app.state.runtime.metrics.registry
        return counted(registry, "resnet_serve_requests_total", outcome=code)

    # --- the four transports ------------------------------------------------------------------

    def rest(self, call: Call) -> Answer:
        path, template = call.path("/v1/models")
        resp = self.client.post(
            path + "/classify",
            files=[("file", (f"{n}.png", d, "image/png")) for n, d in enumerate(call.images)],
            params={} if call.top_k is None else {"top_k": call.top_k},
            headers={"x-api-key": call.key} if call.key else {},
        )
        assert_documented(self.client, template + "/classify", "post", resp.status_code)
        return Answer(
            resp.status_code, resp.json()["error"]["code"], resp.headers.get("retry-after")
        )

    def kserve_http(self, call: Call) -> Answer:
        body: dict = {
            "inputs": [
                {
                    "name": "images",
                    "shape": [len(call.images)],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(d).decode() for d in call.images],
                }
            ]
        }
        if call.top_k is not None:
            body["outputs"] = [{"name": "logits", "parameters": {"classification": call.top_k}}]
        path, template = call.path("/v2/models")
        resp = self.client.post(
            path + "/infer", json=body, headers={"x-api-key": call.key} if call.key else {}
        )
        assert_documented(self.client, template + "/infer", "post", resp.status_code)
        return Answer(resp.status_code, resp.json()["code"], resp.headers.get("retry-after"))

    def _grpc(self, method: str, request, call: Call) -> Answer:
        stub = self.channel.unary_unary(method, request_serializer=type(request).SerializeToString)
        metadata = (("x-api-key", call.key),) if call.key else ()
        with pytest.raises(grpc.RpcError) as info:
            stub(request, timeout=30, metadata=metadata)
        trailers = dict(info.value.trailing_metadata() or ())
        return Answer(
            info.value.code(), trailers.get("error-code", ""), trailers.get("retry-after")
        )

    def kserve_grpc(self, call: Call) -> Answer:
        request = kpb.ModelInferRequest(model_name=call.model, model_version=call.version or "")
        request.inputs.add(name="images", datatype="BYTES", shape=[len(call.images)])
        request.raw_input_contents.append(serialize_bytes(call.images))
        if call.top_k is not None:
            out = request.outputs.add(name="logits")
            out.parameters["classification"].int64_param = call.top_k
        return self._grpc("/inference.GRPCInferenceService/ModelInfer", request, call)

    def classifier_grpc(self, call: Call) -> Answer:
        request = cpb.ClassifyRequest(
            model=call.model,
            images=call.images,
            top_k=call.top_k or 0,
            model_version=call.version or "",
        )
        return self._grpc("/resnet_serving.v1.Classifier/Classify", request, call)


def assert_documented(client: TestClient, path: str, method: str, status: int) -> None:
    documented = client.app.openapi()["paths"][path][method]["responses"]
    assert str(status) in documented, f"{status} not documented for {method} {path}"


TRANSPORTS = ["rest", "kserve_http", "kserve_grpc", "classifier_grpc"]


def gateway(tiny, backend=None, **settings) -> Iterator[Gateway]:
    app = create_app(
        Settings(repository=tiny.repository, grpc_port=0, max_images_per_request=4, **settings),
        backend=backend,
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        # Built once here: the REST answers are checked against it, and building it (a
        # quarter of a second) inside a timed call made the 504 case look late.
        client.app.openapi()
        gw = Gateway(client)
        yield gw
        gw.channel.close()


@pytest.fixture(scope="module")
def plain(tiny):
    yield from gateway(tiny)


@pytest.fixture(scope="module")
def keyed(tiny):
    yield from gateway(tiny, api_keys=["k"])


@pytest.fixture(scope="module")
def busy(tiny):
    """One slow batch at a time and room for one image in the queue."""
    yield from gateway(
        tiny,
        SlowBackend(OnnxRuntimeBackend(), 0.5),
        max_batch_size=1,
        max_queue_images=1,
        max_batch_delay_ms=0,
    )


#: The "late" gateway's deadline: shorter than decoding ``slow_to_decode()`` takes.
LATE_S = 0.2


@pytest.fixture(scope="module")
def late(tiny):
    """A deadline shorter than decoding one large image takes: admitted (decoding is known
    to be fast), then answered 504 at the deadline while the decode runs out."""
    yield from gateway(tiny, request_timeout_s=LATE_S)


@pytest.fixture(scope="module")
def slow_decode_s(tiny) -> float:
    """One decode of ``slow_to_decode()`` the way the gateway decodes it, timed here."""
    return fastest_of(lambda: preprocess(slow_to_decode(), tiny.contract), runs=2)


@pytest.fixture(scope="module")
def down(tiny):
    """The Triton backend, pointed at a port where no Triton listens."""
    yield from gateway(tiny, TritonBackend(f"127.0.0.1:{free_port()}"))


@contextmanager
def full_queue(gw: Gateway) -> Iterator[None]:
    """One request held in the (slow) backend and another in the queue for as long as the
    block runs (the call under test)."""
    backend: SlowBackend = gw.client.app.state.runtime.backend
    registry = gw.client.app.state.runtime.metrics.registry

    def classify() -> None:
        resp = gw.client.post("/v1/classify", content=GOOD, headers={"content-type": "image/png"})
        assert resp.status_code == 200, resp.text

    with backend.holding(classify, classify):
        wait_until(
            lambda: counted(registry, "resnet_serve_queue_depth", model="tiny") == 1,
            30,
            "the second request never queued",
        )
        yield


# (gateway fixture, the call, HTTP status, gRPC status, code)
CASES = {
    "400 undecodable image": ("plain", Call(images=[BAD_PNG]), 400, "INVALID_ARGUMENT", "invalid_image"),
    "401 no API key": ("keyed", Call(), 401, "UNAUTHENTICATED", "unauthorized"),
    "401 wrong API key": ("keyed", Call(key="nope"), 401, "UNAUTHENTICATED", "unauthorized"),
    "404 unknown model": ("plain", Call(model="nope"), 404, "NOT_FOUND", "model_not_found"),
    "404 version not served": ("plain", Call(version="9"), 404, "NOT_FOUND", "model_not_found"),
    "413 too many images": ("plain", Call(images=[GOOD] * 5), 413, "INVALID_ARGUMENT", "payload_too_large"),
    "415 not an image": ("plain", Call(images=[b"hello"]), 415, "INVALID_ARGUMENT", "unsupported_media_type"),
    "422 top_k out of range": ("plain", Call(top_k=11), 422, "INVALID_ARGUMENT", "validation_failed"),
    "503 overloaded": ("busy", Call(), 503, "RESOURCE_EXHAUSTED", "overloaded"),
    "503 backend unavailable": ("down", Call(), 503, "UNAVAILABLE", "backend_unavailable"),
    "504 deadline": ("late", Call(images=["slow"]), 504, "DEADLINE_EXCEEDED", "deadline_exceeded"),
}  # fmt: skip


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", CASES)
def test_every_fault_maps_alike_on_every_transport(request, case, transport):
    fixture, call, http_status, grpc_status, code = CASES[case]
    gw: Gateway = request.getfixturevalue(fixture)
    call = dataclasses.replace(
        call, images=[slow_to_decode() if i == "slow" else i for i in call.images]
    )
    # Timed before the call: what the 504 must not wait for.
    decode_s = request.getfixturevalue("slow_decode_s") if code == "deadline_exceeded" else 0
    before = gw.rejections(code)
    with full_queue(gw) if fixture == "busy" else nullcontext():
        t0 = time.perf_counter()
        answer = getattr(gw, transport)(call)
        elapsed = time.perf_counter() - t0
    expected = (
        http_status if "http" in transport or transport == "rest" else grpc.StatusCode[grpc_status]
    )
    assert (answer.status, answer.code) == (expected, code)
    assert gw.rejections(code) == before + 1  # counted once, by the transport's one mapping
    if code == "overloaded":
        assert answer.retry_after is not None and int(answer.retry_after) >= 1
    if code == "deadline_exceeded":
        # At the deadline, not when the decode ends: the decode, in this process and on its
        # cores, may delay the answer by a part of itself, never by the whole of it.
        assert elapsed < LATE_S + decode_s / 2, (elapsed, decode_s)
