"""The gateway in front of a real Triton (the CPU tritonserver from nvidia-pytriton), and
the gateway standing in for Triton: accuracy over REST and gRPC with identical top-1 to the
embedded backend, tritonclient (gRPC and HTTP) getting from the gateway what it gets from
Triton on the same model, and Triton dying and coming back."""

from __future__ import annotations

import inspect
import json
import shutil
import signal

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from service.backends.triton.backend import TritonBackend
from service.dataplane.preprocess import preprocess
from service.host.processes import GatewayProcess, free_port, free_ports, wait_until
from service.settings import Settings
from service.transports.grpc import classifier_pb2, classifier_pb2_grpc
from tests.helpers.cli import run_cli
from tests.helpers.images import image_bytes
from tests.helpers.models import TINY_LABELS, assert_same_predictions
from tests.helpers.timing import fastest_of
from tests.helpers.triton import gateway_on_triton, start_real_triton

pytestmark = pytest.mark.triton
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def via_triton(triton, triton_repo, tmp_path_factory):
    """The gateway with the Triton backend, serving both models Triton serves."""
    gw = gateway_on_triton(tmp_path_factory.mktemp("gw") / "gw.log", triton_repo, triton)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def embedded(tiny, tmp_path_factory):
    """The gateway with the embedded backend on the tiny model's own repository."""
    gw = GatewayProcess.start(
        tmp_path_factory.mktemp("emb") / "gw.log", "--repository", str(tiny.repository), grpc=True
    )
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def embedded_top1(demo):
    """Top-1 of every held-out PNG from the embedded ONNX Runtime path (same preprocessing)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(demo.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    x = np.stack([preprocess(p.read_bytes(), demo.contract) for p, _ in demo.pngs()])
    return session.run(None, {"input": x})[0].argmax(1)


@pytest.mark.slow
def test_heldout_over_rest_and_grpc_through_triton(via_triton, demo, embedded_top1):
    files = demo.pngs()
    labels = np.array([label for _, label in files])
    rest = []
    with httpx.Client(timeout=60) as client:
        for i in range(0, len(files), 16):
            parts = [("file", (p.name, p.read_bytes(), "image/png")) for p, _ in files[i : i + 16]]
            resp = client.post(via_triton.url + "/v1/models/digits/classify?top_k=1", files=parts)
            assert resp.status_code == 200, resp.text
            rest += [preds[0]["index"] for preds in resp.json()["predictions"]]
    with grpc.insecure_channel(via_triton.grpc_target) as channel:
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
    print(f"Triton backend accuracy: REST {np.mean(rest == labels):.4f}")
    assert np.mean(rest == labels) >= 0.97
    assert np.array_equal(rest, embedded_top1)  # identical top-1 to the embedded backend
    assert np.array_equal(grpc_top1, embedded_top1)
    metrics = httpx.get(via_triton.url + "/metrics").text
    assert (
        'resnet_serve_inference_seconds_count{backend="triton",model="digits",'
        'served_precision="fp32",version="1"}'
    ) in metrics
    assert (
        'backend="triton",kernels="triton",model="digits",precision="fp32",'
        'served_precision="fp32",version="1"} 1.0'
    ) in metrics


def _answers(client, module, x: np.ndarray, images: list[bytes]) -> dict:
    """What one tritonclient (gRPC or HTTP) gets from one server for the tiny model."""
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("tiny")
    as_json = {"as_json": True} if module is triton_grpc else {}  # HTTP answers JSON anyway
    meta = client.get_model_metadata("tiny", **as_json)
    inp = module.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    logits = client.infer("tiny", [inp]).as_numpy("logits")
    out = module.InferRequestedOutput("logits", class_count=3)
    classes = client.infer("tiny", [inp], outputs=[out]).as_numpy("logits")
    encoded = module.InferInput("images", [len(images)], "BYTES")
    encoded.set_data_from_numpy(np.array(images, dtype=np.object_))
    stats = client.get_inference_statistics("tiny", **as_json)["model_stats"][0]
    return {
        "inputs": [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]
        ],
        "outputs": [
            (t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]
        ],
        "logits": logits,
        "classes": [[e.decode().split(":") for e in row] for row in classes],
        "stats_keys": set(stats) - {"response_stats"},
        "success": int(stats["inference_stats"]["success"]["count"]),
    }


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient_gets_from_the_gateway_what_it_gets_from_triton(
    protocol, embedded, triton, tiny
):
    """The same tritonclient, unchanged, against the gateway and against Triton itself,
    on the same ONNX file."""
    images = [image_bytes(size=(44 + n, 39), seed=30 + n) for n in range(4)]
    x = np.stack([preprocess(d, tiny.contract) for d in images])
    module = triton_grpc if protocol == "grpc" else triton_http
    targets = {
        "grpc": {"gateway": embedded.grpc_target, "triton": triton.grpc_url},
        "http": {
            "gateway": embedded.url.removeprefix("http://"),
            "triton": triton.http_url.removeprefix("http://"),
        },
    }[protocol]
    answers = {}
    for name, url in targets.items():
        client = module.InferenceServerClient(url)
        answers[name] = _answers(client, module, x, images)
        client.close()
    ours, theirs = answers["gateway"], answers["triton"]
    assert ours["inputs"] == theirs["inputs"] == [("input", "FP32", [-1, 3, 32, 32])]
    assert ours["outputs"] == theirs["outputs"] == [("logits", "FP32", [-1, 10])]
    np.testing.assert_allclose(ours["logits"], theirs["logits"], rtol=1e-5, atol=1e-5)
    for our_row, their_row in zip(ours["classes"], theirs["classes"], strict=True):
        assert [e[1:] for e in our_row] == [e[1:] for e in their_row]  # index, label
        for (ov, _, label), (tv, _, _) in zip(our_row, their_row, strict=True):
            assert abs(float(ov) - float(tv)) < 1e-4 and label in TINY_LABELS
    assert ours["stats_keys"] <= theirs["stats_keys"] | {"response_stats"}
    assert ours["success"] >= 2  # the two inferences above


def test_encoded_images_through_the_triton_backend(via_triton):
    """Our BYTES extension: the gateway decodes, Triton computes."""
    client = triton_grpc.InferenceServerClient(via_triton.grpc_target)
    images = [image_bytes(seed=n) for n in range(3)]
    encoded = triton_grpc.InferInput("images", [3], "BYTES")
    encoded.set_data_from_numpy(np.array(images, dtype=np.object_))
    logits = client.infer("tiny", [encoded]).as_numpy("logits")
    rest = httpx.post(
        via_triton.url + "/v1/models/tiny/classify?top_k=1",
        files=[("file", (f"{n}.png", d, "image/png")) for n, d in enumerate(images)],
    ).json()
    assert list(logits.argmax(1)) == [p[0]["index"] for p in rest["predictions"]]
    client.close()


def test_pixels_through_triton_are_answered_as_float_planes(via_triton, triton, tiny_pixels):
    """A uint8 graph in Triton: its metadata is the contract's UINT8 NHWC input (the gateway
    checked it at start), the gateway sends it the decoded pixels, a quarter of the float
    planes' bytes, and answers what the same network taking float planes answers."""
    meta = triton_http.InferenceServerClient(triton.http_url.removeprefix("http://"))
    inputs = meta.get_model_metadata("tinypixels")["inputs"]
    assert inputs == [{"name": "input", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    for seed in range(3):
        photo = image_bytes("JPEG", (80 + 9 * seed, 60), seed=200 + seed)
        answers = [
            httpx.post(
                f"{via_triton.url}/v1/models/{m}/classify?top_k=3", content=photo,
                headers={"content-type": "image/jpeg"}, timeout=30,
            ).json()["predictions"][0]
            for m in ("tiny", "tinypixels")
        ]  # fmt: skip
        assert_same_predictions(*answers)


def test_metadata_disagreement_is_refused(triton, triton_repo, tmp_path):
    """The gateway reads Triton's metadata and refuses a model that is not what its
    contract says."""
    repo = tmp_path / "repo"
    shutil.copytree(triton_repo, repo)
    path = repo / "digits" / "1" / "preprocess.json"
    contract = json.loads(path.read_text())
    contract.update(resize=28, crop=28)
    path.write_text(json.dumps(contract))
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
    assert "serves something else than its contract describes" in proc.stderr
    assert "[-1, 1, 28, 28]" in proc.stderr and "Traceback" not in proc.stderr


def test_triton_cli_refuses_the_onnxruntime_flavor(tiny):
    proc = run_cli("resnet-serve", "triton", "--repository", str(tiny.repository), timeout=60)
    assert proc.returncode == 1
    assert "re-export it with --flavor python-ort" in proc.stderr


def test_triton_binds_loopback_by_default(triton):
    """Triton's own default is every interface; the launcher's is 127.0.0.1."""
    args = " ".join(triton.proc.args)
    for flag in (
        "--http-address=127.0.0.1",
        "--grpc-address=127.0.0.1",
        "--metrics-address=127.0.0.1",
    ):
        assert flag in args
    from pathlib import Path

    listening = [
        line.split()
        for table in ("/proc/net/tcp", "/proc/net/tcp6")
        for line in Path(table).read_text().splitlines()[1:]
    ]
    bound = {int(f[1].split(":")[1], 16): f[1].split(":")[0] for f in listening if f[3] == "0A"}
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, also as IPv6
    ports = {triton.http_port, triton.grpc_port, triton.metrics_port}
    assert all(bound.get(p) in loopback for p in ports), {p: bound.get(p) for p in ports}


def test_triton_dies_then_recovers_without_restart(triton_repo, tiny, tmp_path):
    """Kill Triton: 503s at once and not ready; start it again: the same gateway recovers."""
    ports = tuple(free_ports(3))
    server = start_real_triton(triton_repo, tmp_path / "t1.log", ports)
    gw = GatewayProcess.start(
        tmp_path / "gw.log",
        "--repository",
        str(triton_repo),
        "--models",
        "tiny",
        "--backend",
        "triton",
        "--triton-url",
        f"127.0.0.1:{ports[1]}",
        grpc=True,
    )
    image = image_bytes()

    def classify() -> httpx.Response:
        return httpx.post(gw.url + "/v1/classify", content=image, headers=PNG, timeout=30)

    try:
        # What a 503 may take, the same request answered timed first: that much for the
        # first call and for each retry, plus the retries' backoff at its longest (doubling
        # from backoff_s, jittered up to 1.5x). Each attempt fails at once on a dead server.
        answered = fastest_of(lambda: classify().raise_for_status())
        retries = Settings.model_fields["triton_max_retries"].default
        backoff_s = inspect.signature(TritonBackend).parameters["backoff_s"].default
        at_once = (1 + retries) * answered + 1.5 * backoff_s * (2**retries - 1)
        server.proc.send_signal(signal.SIGKILL)
        server.stop()  # reaps it and closes its log
        codes, slowest = [], 0.0
        for _ in range(10):
            resp = classify()
            slowest = max(slowest, resp.elapsed.total_seconds())
            codes.append(resp.status_code)
            assert resp.json()["error"]["code"] == "backend_unavailable"
        assert set(codes) == {503} and slowest < at_once, (codes, slowest, at_once)
        wait_until(lambda: httpx.get(gw.url + "/readyz").status_code == 503, 10, "still ready")
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = classifier_pb2_grpc.ClassifierStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Classify(classifier_pb2.ClassifyRequest(images=[image]), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        metrics = httpx.get(gw.url + "/metrics").text
        assert (
            'resnet_serve_backend_errors_total{backend="triton",code="backend_unavailable",'
            'model="tiny",version="1"}' in metrics
        )

        server = start_real_triton(triton_repo, tmp_path / "t2.log", ports)
        wait_until(
            lambda: httpx.get(gw.url + "/readyz").status_code == 200, 30, "gateway did not recover"
        )
        resp = httpx.post(gw.url + "/v1/classify", content=image, headers=PNG)
        assert resp.status_code == 200
        assert gw.proc.poll() is None  # never restarted
    finally:
        gw.stop()
        server.stop()
