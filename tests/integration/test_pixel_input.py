"""A uint8 graph (`resnet-export export --input uint8`): the contract, the Triton config, the
parity checks and the probe say uint8 NHWC; the gateway hands the decoded pixels to it and
answers what the float-input graph of the same network answers; KServe v2 shows and takes
the real input (UINT8), and refuses any other with a named reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.dataplane.preprocess import preprocess
from service.model.contract import PreprocessContract, input_fields
from service.settings import Settings
from service.transports.http.app import create_app
from tests.helpers.images import image_bytes
from tests.helpers.models import TINY_CONTRACT, TINY_LABELS, assert_same_predictions

PIXELS = TINY_CONTRACT.model_copy(update=input_fields("uint8"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """One tiny network published twice: taking float planes ("planes"), and taking pixels
    ("pixels", FP32 and INT8)."""
    import torch

    from export.images import Images
    from export.models import BasicBlock, ResNet
    from export.pipeline import export_and_publish
    from export.plan import PrecisionPlan
    from export.repository import ServingConfig

    root = tmp_path_factory.mktemp("pixels") / "repo"
    torch.manual_seed(0)
    net = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=10, channels=(4, 8, 8, 8))
    photos = [image_bytes(size=(60 + s, 50), seed=s) for s in range(24)]
    calibration = np.stack([preprocess(p, PIXELS) for p in photos])
    for name, contract, plan in (
        ("planes", TINY_CONTRACT, None),
        ("pixels", PIXELS, None),
        (
            "pixels8",
            PIXELS,
            PrecisionPlan(
                precision="int8",
                calibration=Images(calibration[:16], "random photos"),
                validation=Images(calibration[16:], "random photos"),
                min_agreement=0,
            ),
        ),
    ):
        export_and_publish(
            model=net, contract=contract, labels=TINY_LABELS, name=name, repository=root,
            flavor="onnxruntime", serving=ServingConfig(max_batch_size=8), opset=17,
            real_images=photos[:2], source="tests", plan=plan, log=lambda _: None,
        )  # fmt: skip
    return root


@pytest.fixture(scope="module")
def client(repo):
    with TestClient(create_app(Settings(repository=repo)), raise_server_exceptions=False) as c:
        yield c


def test_the_published_files_say_uint8_nhwc(repo):
    version = repo / "pixels" / "1"
    contract = PreprocessContract.load(version / "preprocess.json")
    assert (contract.dtype, contract.layout, contract.input_shape) == ("uint8", "NHWC", (32, 32, 3))
    config = (repo / "pixels" / "config.pbtxt").read_text()
    assert "data_type: TYPE_UINT8\n  dims: 32\n  dims: 32\n  dims: 3" in config
    parity = json.loads((version / "export_report.json").read_text())["parity"]
    # The graph against its network fed the gateway's float planes of the same pixels.
    assert parity["passed"] and parity["max_abs_diff_vs_float_input"] <= parity["tolerance"]
    with np.load(version / "probe.npz") as probe:
        assert probe["inputs"].dtype == np.uint8 and probe["inputs"].shape[1:] == (32, 32, 3)


def test_pixels_are_answered_as_the_float_input_graph_answers(client):
    for seed in range(6):
        photo = image_bytes("JPEG", (90 + 11 * seed, 70), seed=100 + seed)
        answers = [
            client.post(
                f"/v1/models/{m}/classify?top_k=5", content=photo,
                headers={"content-type": "image/jpeg"},
            ).json()["predictions"][0]
            for m in ("planes", "pixels")
        ]  # fmt: skip
        assert_same_predictions(*answers)
    int8 = client.post(
        "/v1/models/pixels8/classify", content=photo, headers={"content-type": "image/jpeg"}
    )
    assert int8.status_code == 200, int8.text  # loaded: its probe passed on uint8 inputs


def test_kserve_shows_and_takes_the_real_input(client):
    meta = client.get("/v2/models/pixels").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    photo = image_bytes(size=(64, 48), seed=7)
    pixels = preprocess(photo, PIXELS)
    planes = preprocess(photo, TINY_CONTRACT)

    def logits(model: str, datatype: str, x: np.ndarray, binary: bool) -> np.ndarray:
        tensor = {"name": "input", "datatype": datatype, "shape": [1, *x.shape]}
        if binary:
            header = json.dumps(
                {"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}]}
            ).encode()
            resp = client.post(
                f"/v2/models/{model}/infer", content=header + x.tobytes(),
                headers={"Inference-Header-Content-Length": str(len(header))},
            )  # fmt: skip
        else:
            resp = client.post(
                f"/v2/models/{model}/infer",
                json={"inputs": [{**tensor, "data": x.ravel().tolist()}]},
            )
        assert resp.status_code == 200, resp.text
        return np.asarray(resp.json()["outputs"][0]["data"])

    want = logits("planes", "FP32", planes, binary=True)
    np.testing.assert_allclose(logits("pixels", "UINT8", pixels, binary=True), want, atol=1e-5)
    np.testing.assert_allclose(logits("pixels", "UINT8", pixels, binary=False), want, atol=1e-5)


@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        ({"datatype": "FP32", "shape": [1, 32, 32, 3], "data": [0.5] * 3072}, "must be UINT8, got 'FP32'"),
        ({"datatype": "UINT8", "shape": [1, 3, 32, 32], "data": [1] * 3072}, "expected [n, 32, 32, 3]"),
        ({"datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [300] * 3072}, "integers from 0 to 255"),
        ({"datatype": "UINT8", "shape": [1, 32, 32, 3], "data": [1.5] * 3072}, "integers from 0 to 255"),
    ],
)  # fmt: skip
def test_kserve_refuses_another_input_by_name(client, tensor, fragment):
    resp = client.post("/v2/models/pixels/infer", json={"inputs": [{"name": "input", **tensor}]})
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json()["error"], resp.text


def test_kserve_grpc_takes_uint8_raw_and_typed(repo):
    """Over KServe v2 gRPC: raw_input_contents (tritonclient) and uint_contents (the
    protocol's typed field for UINT8) give the float-plane model's logits; 256 is refused."""
    import grpc
    import tritonclient.grpc as tgrpc
    from tritonclient.grpc import service_pb2 as pb

    photo = image_bytes(size=(64, 48), seed=9)
    pixels = preprocess(photo, PIXELS)[None]
    planes = preprocess(photo, TINY_CONTRACT)[None]
    with TestClient(create_app(Settings(repository=repo, grpc_port=0))) as client:
        target = f"127.0.0.1:{client.app.state.grpc_port}"
        triton = tgrpc.InferenceServerClient(target)

        def infer(model: str, datatype: str, x: np.ndarray) -> np.ndarray:
            inp = tgrpc.InferInput("input", list(x.shape), datatype)
            inp.set_data_from_numpy(x)
            return triton.infer(model, [inp]).as_numpy("logits")

        want = infer("planes", "FP32", planes)
        np.testing.assert_allclose(infer("pixels", "UINT8", pixels), want, atol=1e-5)
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )

            def typed(values: list[int]) -> pb.ModelInferRequest:
                request = pb.ModelInferRequest(model_name="pixels")
                tensor = request.inputs.add(name="input", datatype="UINT8", shape=[1, 32, 32, 3])
                tensor.contents.uint_contents.extend(values)
                return request

            reply = call(typed(pixels.ravel().tolist()), timeout=10)
            got = np.frombuffer(reply.raw_output_contents[0], dtype="<f4")
            np.testing.assert_allclose(got, want.ravel(), atol=1e-5)
            with pytest.raises(grpc.RpcError) as info:
                call(typed([256] * pixels.size), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "UINT8 values are integers from 0 to 255" in info.value.details()
        triton.close()
