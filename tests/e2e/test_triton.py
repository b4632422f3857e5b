"""The gateway in front of a real Triton (the CPU tritonserver from nvidia-pytriton):
accuracy over REST and gRPC, identical top-1 to the embedded backend, KServe v2
compatibility with tritonclient, and Triton dying and coming back."""

from __future__ import annotations

import shutil
import signal
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http

from service.contract import PreprocessContract
from service.grpc import classifier_pb2, classifier_pb2_grpc
from service.preprocess import preprocess
from tests.conftest import run_cli
from tests.e2e.conftest import free_port, start_real_triton, start_server, stop

pytestmark = pytest.mark.triton


@pytest.fixture(scope="module")
def gateway(triton, triton_repo, tmp_path_factory):
    grpc_port = free_port()
    srv = start_server(
        tmp_path_factory.mktemp("gw"),
        "--repository",
        str(triton_repo),
        "--backend",
        "triton",
        "--triton-url",
        triton.grpc_url,
        "--grpc-port",
        str(grpc_port),
    )
    srv.grpc_port = grpc_port  # type: ignore[attr-defined]
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def embedded_top1(demo):
    """Top-1 of every held-out PNG from the embedded ONNX Runtime path (same preprocessing)."""
    import onnxruntime as ort

    contract = PreprocessContract.load(demo.model_dir / "preprocess.json")
    session = ort.InferenceSession(
        str(demo.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.stack([preprocess(p.read_bytes(), contract) for p, _ in demo.pngs()])
    return session.run(None, {"input": x})[0].argmax(1)


def test_heldout_over_rest_and_grpc_through_triton(gateway, demo, embedded_top1):
    files = demo.pngs()
    labels = np.array([label for _, label in files])
    rest = []
    with httpx.Client(timeout=60) as client:
        for i in range(0, len(files), 16):
            parts = [("file", (p.name, p.read_bytes(), "image/png")) for p, _ in files[i : i + 16]]
            resp = client.post(gateway.url + "/v1/models/digits/classify?top_k=1", files=parts)
            assert resp.status_code == 200, resp.text
            rest += [preds[0]["index"] for preds in resp.json()["predictions"]]
    with grpc.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stub = classifier_pb2_grpc.ClassifierStub(channel)
        grpc_top1 = []
        for i in range(0, len(files), 16):
            reply = stub.Classify(
                classifier_pb2.ClassifyRequest(
                    model="digits", images=[p.read_bytes() for p, _ in files[i : i + 16]], top_k=1
                ),
                timeout=60,
            )
            assert reply.model == "digits" and reply.model_version == "1"
            grpc_top1 += [r.predictions[0].index for r in reply.results]
    rest, grpc_top1 = np.array(rest), np.array(grpc_top1)
    print(
        f"Triton backend accuracy: REST {np.mean(rest == labels):.4f}, gRPC {np.mean(grpc_top1 == labels):.4f}"
    )
    assert np.mean(rest == labels) >= 0.97
    assert np.array_equal(rest, embedded_top1)  # identical top-1 to the embedded backend
    assert np.array_equal(grpc_top1, embedded_top1)
    metrics = httpx.get(gateway.url + "/metrics").text
    assert 'resnet_serve_inference_seconds_count{backend="triton",model="digits"}' in metrics
    assert 'backend="triton",model="digits",precision="fp32",version="1"} 1.0' in metrics


def test_kserve_v2_gateway_answers_what_triton_answers(gateway, triton, demo):
    """tritonclient.http, unchanged, against the gateway and against Triton itself."""
    contract = PreprocessContract.load(demo.model_dir / "preprocess.json")
    x = np.stack([preprocess(p.read_bytes(), contract) for p, _ in demo.pngs()[:5]])
    answers = {}
    for name, url in (("gateway", gateway.url), ("triton", triton.http_url)):
        client = triton_http.InferenceServerClient(url.removeprefix("http://"))
        assert (
            client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
        )
        meta = client.get_model_metadata("digits")
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 32, 32]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
        assert client.get_model_config("digits")["max_batch_size"] == 32
        inp = triton_http.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        logits = client.infer("digits", [inp]).as_numpy("logits")
        inp_json = triton_http.InferInput("input", list(x.shape), "FP32")
        inp_json.set_data_from_numpy(x, binary_data=False)
        out = triton_http.InferRequestedOutput("logits", binary_data=False, class_count=3)
        classes = client.infer("digits", [inp_json], outputs=[out]).as_numpy("logits")
        answers[name] = (logits, classes)
        client.close()
    np.testing.assert_allclose(answers["gateway"][0], answers["triton"][0], rtol=1e-5, atol=1e-5)
    assert answers["gateway"][1].shape == answers["triton"][1].shape == (5, 3)
    for ours, theirs in zip(
        answers["gateway"][1].ravel(), answers["triton"][1].ravel(), strict=True
    ):
        ov, oi, ol = (ours.decode() if isinstance(ours, bytes) else ours).split(":")
        tv, ti, tl = (theirs.decode() if isinstance(theirs, bytes) else theirs).split(":")
        assert (oi, ol) == (ti, tl) and abs(float(ov) - float(tv)) < 1e-4


def test_kserve_bytes_input_of_encoded_images(gateway, demo):
    client = triton_http.InferenceServerClient(gateway.url.removeprefix("http://"))
    files = demo.pngs()[:4]
    images = triton_http.InferInput("images", [len(files)], "BYTES")
    images.set_data_from_numpy(np.array([p.read_bytes() for p, _ in files], dtype=np.object_))
    logits = client.infer("digits", [images]).as_numpy("logits")
    assert logits.shape == (4, 10)
    assert list(logits.argmax(1)) == [label for _, label in files]
    bad = triton_http.InferInput("input", [1, 3, 32, 32], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(Exception, match=r"\[400\].*expected \[n, 1, 32, 32\]"):
        client.infer("digits", [bad])
    client.close()


def test_metadata_disagreement_is_refused(triton, triton_repo, tmp_path):
    """The gateway reads Triton's metadata and refuses a model that is not what preprocess.json says."""
    import json

    repo = tmp_path / "repo"
    shutil.copytree(triton_repo, repo)
    contract = json.loads((repo / "digits" / "preprocess.json").read_text())
    contract.update(resize=28, crop=28)
    (repo / "digits" / "preprocess.json").write_text(json.dumps(contract))
    proc = run_cli(
        "resnet-serve",
        "serve",
        "--repository",
        str(repo),
        "--backend",
        "triton",
        "--triton-url",
        triton.grpc_url,
        "--port",
        str(free_port()),
        timeout=120,
    )
    assert proc.returncode == 1
    assert "serves something else than preprocess.json describes" in proc.stderr
    assert "[-1, 1, 28, 28]" in proc.stderr and "Traceback" not in proc.stderr


def test_triton_cli_refuses_the_onnxruntime_flavor(demo):
    proc = run_cli("resnet-serve", "triton", "--repository", str(demo.repository), timeout=60)
    assert proc.returncode == 1
    assert "re-export it with --flavor python-ort" in proc.stderr


def test_triton_dies_then_recovers_without_restart(triton_repo, demo, tmp_path):
    """Kill Triton: 503s at once and not ready; start it again: the same gateway recovers."""
    from tests.e2e.conftest import TritonPorts

    ports = TritonPorts(free_port(), free_port(), free_port())
    server = start_real_triton(triton_repo, ports, tmp_path / "t1.log")
    grpc_port = free_port()
    gw = start_server(
        tmp_path,
        "--repository",
        str(triton_repo),
        "--backend",
        "triton",
        "--triton-url",
        f"127.0.0.1:{ports.grpc}",
        "--grpc-port",
        str(grpc_port),
    )
    image = demo.pngs()[0][0].read_bytes()
    hdr = {"content-type": "image/png"}
    try:
        assert httpx.post(gw.url + "/v1/classify", content=image, headers=hdr).status_code == 200
        server.proc.send_signal(signal.SIGKILL)
        server.stop()  # reaps it and closes its log
        codes, slowest = [], 0.0
        for _ in range(10):
            t0 = time.perf_counter()
            resp = httpx.post(gw.url + "/v1/classify", content=image, headers=hdr, timeout=30)
            slowest = max(slowest, time.perf_counter() - t0)
            codes.append(resp.status_code)
            assert resp.json()["error"]["code"] == "backend_unavailable"
        assert set(codes) == {503} and slowest < 2.0, (codes, slowest)
        deadline = time.monotonic() + 10
        while httpx.get(gw.url + "/readyz").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(classifier_pb2.ClassifyRequest(images=[image]), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        metrics = httpx.get(gw.url + "/metrics").text
        assert (
            'resnet_serve_backend_errors_total{backend="triton",code="backend_unavailable",model="digits"}'
            in metrics
        )

        server = start_real_triton(triton_repo, ports, tmp_path / "t2.log")
        deadline = time.monotonic() + 30
        while httpx.get(gw.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, "gateway did not recover"
            time.sleep(0.25)
        resp = httpx.post(gw.url + "/v1/classify", content=image, headers=hdr)
        assert (
            resp.status_code == 200
            and resp.json()["predictions"][0][0]["index"] == demo.pngs()[0][1]
        )
        assert gw.proc.poll() is None  # never restarted
    finally:
        stop(gw)
        server.stop()
