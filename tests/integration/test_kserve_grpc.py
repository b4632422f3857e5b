"""KServe v2 over gRPC (``inference.GRPCInferenceService``) in process, driven by
``tritonclient.grpc`` unchanged: the same answers as KServe v2 over HTTP and as REST.
(Against a real Triton on the same model: tests/e2e/test_triton.py.)"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from fastapi.testclient import TestClient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from service import __version__
from service.dataplane.preprocess import preprocess
from service.settings import Settings
from service.transports.http.app import create_app
from tests.helpers.images import image_bytes
from tests.helpers.models import TINY_LABELS

IMAGES = [image_bytes(size=(50 + n, 41), seed=20 + n) for n in range(3)]


@pytest.fixture(scope="module")
def gateway(tiny):
    app = create_app(Settings(repository=tiny.repository, grpc_port=0))
    with TestClient(app) as client:
        triton = tgrpc.InferenceServerClient(f"127.0.0.1:{client.app.state.grpc_port}")
        yield client, triton
        triton.close()


@pytest.fixture(scope="module")
def batch(tiny):
    return np.stack([preprocess(d, tiny.contract) for d in IMAGES])


def fp32_input(x: np.ndarray) -> tgrpc.InferInput:
    inp = tgrpc.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def test_health_and_metadata(gateway):
    _, triton = gateway
    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready("tiny") and triton.is_model_ready("tiny", "1")
    meta = triton.get_server_metadata(as_json=True)
    assert meta["name"] == "resnet-serving" and meta["version"] == __version__
    assert {"classification", "statistics", "binary_tensor_data"} <= set(meta["extensions"])
    model = triton.get_model_metadata("tiny", as_json=True)
    assert model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
    assert model["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": ["-1", "3", "32", "32"]}
    ]
    assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": ["-1", "10"]}]
    config = triton.get_model_config("tiny").config
    assert config.max_batch_size == 8 and config.output[0].label_filename == "labels.txt"


def test_infer_matches_http_and_rest(gateway, batch):
    client, triton = gateway
    logits = triton.infer("tiny", [fp32_input(batch)], request_id="r7")
    assert logits.get_response().id == "r7" and logits.get_response().model_version == "1"
    got = logits.as_numpy("logits")
    assert got.shape == (3, 10) and got.dtype == np.float32
    http = client.post(
        "/v2/models/tiny/infer",
        json={
            "inputs": [
                {
                    "name": "input",
                    "shape": list(batch.shape),
                    "datatype": "FP32",
                    "data": batch.ravel().tolist(),
                }
            ]
        },
    ).json()["outputs"][0]["data"]
    np.testing.assert_array_equal(got.ravel(), np.asarray(http, np.float32))
    rest = client.post(
        "/v1/classify?top_k=1",
        files=[("file", (f"{n}.png", d, "image/png")) for n, d in enumerate(IMAGES)],
    ).json()
    assert list(got.argmax(1)) == [p[0]["index"] for p in rest["predictions"]]


def test_encoded_images_and_classification(gateway, batch):
    _, triton = gateway
    images = tgrpc.InferInput("images", [len(IMAGES)], "BYTES")
    images.set_data_from_numpy(np.array(IMAGES, dtype=np.object_))
    out = tgrpc.InferRequestedOutput("logits", class_count=3)
    classes = triton.infer("tiny", [images], outputs=[out]).as_numpy("logits")
    assert classes.shape == (3, 3)
    expected = triton.infer("tiny", [fp32_input(batch)]).as_numpy("logits")
    for row, logits in zip(classes, expected, strict=True):
        parsed = [entry.decode().split(":") for entry in row]
        assert [int(i) for _, i, _ in parsed] == list(np.argsort(-logits, kind="stable")[:3])
        assert [label for _, _, label in parsed] == [TINY_LABELS[int(i)] for _, i, _ in parsed]
        assert abs(float(parsed[0][0]) - logits.max()) < 1e-4


def test_typed_contents_as_well_as_raw(gateway, batch):
    """KServe's own clients send typed contents (fp32_contents), not raw bytes."""
    client, triton = gateway
    request = pb.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=list(batch[:1].shape))
    tensor.contents.fp32_contents.extend(batch[:1].ravel().tolist())
    channel = grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}")
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    reply = infer(request, timeout=10)
    typed = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
    raw = triton.infer("tiny", [fp32_input(batch[:1])]).as_numpy("logits").ravel()
    np.testing.assert_array_equal(typed, raw)
    channel.close()


def test_statistics(gateway, batch):
    _, triton = gateway
    before = triton.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    triton.infer("tiny", [fp32_input(batch)])
    after = triton.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    assert int(after["inference_count"]) == int(before.get("inference_count", 0)) + 3
    assert (
        int(after["inference_stats"]["success"]["count"])
        == int(before["inference_stats"].get("success", {}).get("count", 0)) + 1
    )
    assert int(after["inference_stats"]["compute_infer"]["ns"]) > 0
    assert after["batch_stats"] and int(after["execution_count"]) >= 1


@pytest.mark.parametrize(
    ("call", "code", "fragment"),
    [
        (lambda t, x: t.infer("nope", [fp32_input(x)]), "NOT_FOUND", "'nope'"),
        (lambda t, x: t.infer("tiny", [fp32_input(x)], model_version="4"), "NOT_FOUND", "version"),
        (
            lambda t, x: t.infer("tiny", [fp32_input(x[:, :1])]),
            "INVALID_ARGUMENT",
            "expected [n, 3, 32, 32]",
        ),
        (
            lambda t, x: t.infer(
                "tiny",
                [fp32_input(x)],
                outputs=[tgrpc.InferRequestedOutput("logits", class_count=11)],
            ),
            "INVALID_ARGUMENT",
            "class_count",
        ),
        (lambda t, x: t.infer("tiny", [fp32_input(x * np.nan)]), "INVALID_ARGUMENT", "NaN"),
        (lambda t, x: t.get_model_metadata("nope"), "NOT_FOUND", "'nope'"),
        (lambda t, x: t.get_inference_statistics("nope"), "NOT_FOUND", "'nope'"),
        (lambda t, x: t.get_model_repository_index(), "UNIMPLEMENTED", ""),
    ],
)
def test_errors_are_status_codes(gateway, batch, call, code, fragment):
    _, triton = gateway
    with pytest.raises(InferenceServerException) as info:
        call(triton, batch)
    assert info.value.status() == f"StatusCode.{code}"
    assert fragment in info.value.message()


def test_malformed_message(gateway):
    client, _ = gateway
    with grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}") as channel:
        raw = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            raw(b"\x0a\xff\xff\xff\xff\x0f", timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "malformed ModelInferRequest message"


def test_api_keys_guard_models_not_health(tiny, batch):
    app = create_app(Settings(repository=tiny.repository, grpc_port=0, api_keys=["k"]))
    with TestClient(app) as client:
        triton = tgrpc.InferenceServerClient(f"127.0.0.1:{client.app.state.grpc_port}")
        assert triton.is_server_live() and triton.is_server_ready()
        with pytest.raises(InferenceServerException) as info:
            triton.infer("tiny", [fp32_input(batch)])
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        ok = triton.infer("tiny", [fp32_input(batch)], headers={"authorization": "Bearer k"})
        assert ok.as_numpy("logits").shape == (3, 10)
        triton.close()
