"""The Classifier gRPC API in process: same data plane as REST; status codes; health;
reflection; malformed messages."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.backends.onnxruntime import OnnxRuntimeBackend
from service.host.processes import wait_until
from service.settings import Settings
from service.transports.grpc import classifier_pb2 as pb
from service.transports.grpc import classifier_pb2_grpc as pbg
from service.transports.http.app import create_app
from tests.helpers.doubles import SlowBackend
from tests.helpers.errors import code_of
from tests.helpers.images import image_bytes
from tests.helpers.metrics import counted
from tests.helpers.models import TINY_LABELS
from tests.helpers.paths import ROOT


def serve(tiny, backend=None, **kw):
    settings = Settings(repository=tiny.repository, grpc_port=0, **kw)
    return TestClient(create_app(settings, backend=backend))


@pytest.fixture(scope="module")
def gateway(tiny):
    with serve(tiny, grpc_max_message_bytes=200_000) as client:
        channel = grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}")
        yield client, pbg.ClassifierStub(channel), channel
        channel.close()


@pytest.fixture(scope="module")
def pngs(gateway):
    """(png, top-1 over REST) of a few real image files."""
    client = gateway[0]
    out = []
    for n in range(5):
        data = image_bytes(size=(40 + n, 36), seed=10 + n)
        resp = client.post(
            "/v1/classify?top_k=1", content=data, headers={"content-type": "image/png"}
        )
        out.append((data, resp.json()["predictions"][0][0]["index"]))
    return out


def test_classify_matches_rest(gateway, pngs):
    client, stub, _ = gateway
    images = [d for d, _ in pngs]
    reply = stub.Classify(pb.ClassifyRequest(model="tiny", images=images, top_k=3), timeout=30)
    assert (reply.model, reply.model_version) == ("tiny", "1")
    assert [r.predictions[0].index for r in reply.results] == [label for _, label in pngs]
    assert all(len(r.predictions) == 3 for r in reply.results)
    rest = client.post(
        "/v1/classify?top_k=3", files=[("file", ("a.png", images[0], "image/png"))]
    ).json()
    assert [p["index"] for p in rest["predictions"][0]] == [
        p.index for p in reply.results[0].predictions
    ]
    assert abs(rest["predictions"][0][0]["score"] - reply.results[0].predictions[0].score) < 1e-6
    default = stub.Classify(
        pb.ClassifyRequest(images=images[:1]), timeout=30
    )  # default model, top_k 5
    assert len(default.results[0].predictions) == 5


def test_list_models(gateway):
    client, stub, _ = gateway
    models = stub.ListModels(pb.ListModelsRequest(), timeout=5).models
    assert [(m.name, m.num_classes, m.is_default) for m in models] == [("tiny", 10, True)]
    # Every field of ModelInfo is the REST summary's field of the same name (one declaration).
    (rest,) = client.get("/v1/models").json()["models"]
    info = {f.name: getattr(models[0], f.name) for f in pb.ModelInfo.DESCRIPTOR.fields}
    assert info == {f: rest["default" if f == "is_default" else f] for f in info}


@pytest.mark.parametrize(
    ("request_kw", "code", "fragment"),
    [
        ({"model": "nope", "images": [b"x"]}, grpc.StatusCode.NOT_FOUND, "'nope'"),
        ({"model_version": "3", "images": [b"x"]}, grpc.StatusCode.NOT_FOUND, "version '3'"),
        ({"images": []}, grpc.StatusCode.INVALID_ARGUMENT, "no image"),
        ({"images": [b"junk"]}, grpc.StatusCode.INVALID_ARGUMENT, "unsupported image format"),
        ({"images": [b"\x89PNG\r\n\x1a\n\x00"]}, grpc.StatusCode.INVALID_ARGUMENT, "cannot decode"),
        ({"images": ["PNG"], "top_k": 11}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ({"images": ["PNG"], "top_k": -2}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        ({"images": ["BOMB"]}, grpc.StatusCode.INVALID_ARGUMENT, "pixels"),
    ],
)
def test_bad_input_maps_to_status_codes(gateway, pngs, request_kw, code, fragment):
    _, stub, _ = gateway
    import io

    from PIL import Image

    bomb = io.BytesIO()
    Image.new("L", (7000, 7000)).save(bomb, format="PNG")
    images = [
        {"PNG": pngs[0][0], "BOMB": bomb.getvalue()}.get(i, i) if isinstance(i, str) else i
        for i in request_kw.pop("images")
    ]
    got, details = code_of(
        lambda: stub.Classify(pb.ClassifyRequest(images=images, **request_kw), timeout=10)
    )
    assert got == code and fragment in details


def test_max_message_size_is_enforced(gateway):
    _, stub, _ = gateway
    got, _ = code_of(
        lambda: stub.Classify(
            pb.ClassifyRequest(images=[b"\xff\xd8\xff" + b"0" * 300_000]), timeout=10
        )
    )
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_health_and_reflection(gateway):
    client, _, channel = gateway
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "resnet_serving.v1.Classifier"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in reply.list_services_response.service}
    assert {"resnet_serving.v1.Classifier", "grpc.health.v1.Health"} <= names
    registry = client.app.state.runtime.metrics.registry
    route = "resnet_serving.v1.Classifier/Classify"
    assert counted(registry, "resnet_serve_requests_total", route=route, outcome="ok") >= 1


def test_draining_serves_calls_while_health_says_not_serving(tiny, pngs):
    """Draining: not ready, still serving (the drain window); stopping: UNAVAILABLE."""
    with serve(tiny) as client:
        channel = grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}")
        stub = pbg.ClassifierStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        runtime = client.app.state.runtime
        runtime.drain()
        wait_until(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            ),
            5,
            "health still SERVING",
        )
        assert stub.Classify(pb.ClassifyRequest(images=[pngs[0][0]]), timeout=5).results
        assert client.get("/readyz").status_code == 503
        assert (
            client.post(
                "/v1/classify", content=pngs[0][0], headers={"content-type": "image/png"}
            ).status_code
            == 200
        )
        channel.close()


def test_malformed_message_is_invalid_argument(gateway):
    _, _, channel = gateway
    raw = channel.unary_unary("/resnet_serving.v1.Classifier/Classify")
    got, details = code_of(lambda: raw(b"\xff\xff\xff\xff", timeout=5))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "malformed ClassifyRequest message"
    assert "DecodeError" not in details


def test_api_keys_over_grpc(tiny, pngs):
    with (
        serve(tiny, api_keys=["k"]) as client,
        grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}") as channel,
    ):
        stub = pbg.ClassifierStub(channel)
        req = pb.ClassifyRequest(images=[pngs[0][0]])
        assert code_of(lambda: stub.Classify(req, timeout=5))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (
            code_of(lambda: stub.Classify(req, timeout=5, metadata=(("x-api-key", "no"),)))[0]
            == grpc.StatusCode.UNAUTHENTICATED
        )
        assert stub.Classify(req, timeout=5, metadata=(("authorization", "Bearer k"),)).results


def test_overload_and_deadline_codes(tiny, pngs):
    backend = SlowBackend(OnnxRuntimeBackend(), 0.4)
    with (
        serve(
            tiny, backend=backend, max_queue_images=1, max_batch_size=1, max_batch_delay_ms=0
        ) as client,
        grpc.insecure_channel(f"127.0.0.1:{client.app.state.grpc_port}") as channel,
    ):
        stub = pbg.ClassifierStub(channel)
        req = pb.ClassifyRequest(images=[pngs[0][0]])
        codes = []

        def call():
            try:
                stub.Classify(req, timeout=20)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())

        # The first call's batch stays in the backend until the refusals are in; of the four
        # behind it, one queues (the limit) and three are refused at once, however and
        # whenever they arrive.
        with backend.holding(call, *[call] * 4):
            wait_until(lambda: len(codes) == 3, 30, "the three refusals never came")
            assert set(codes) == {grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert sorted(c.name for c in codes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 3, codes
        # Batches are known to take ~0.4 s now: a call with 0.1 s left cannot be served even
        # by an idle model, and is told so at once, before any work. The answer is the
        # gateway's (a call whose own deadline passed first gets grpc's "Deadline
        # Exceeded" instead), given before its image was decoded or any batch ran.
        registry = client.app.state.runtime.metrics.registry
        batches = len(backend.batches)
        decoded = counted(registry, "resnet_serve_preprocess_seconds_count", model="tiny")
        code, details = code_of(lambda: stub.Classify(req, timeout=0.1))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "shorter than model" in details
        assert len(backend.batches) == batches
        assert counted(registry, "resnet_serve_preprocess_seconds_count", model="tiny") == decoded


def test_generated_code_matches_the_proto(tmp_path):
    """service/transports/grpc/*_pb2*.py are generated from classifier.proto (make proto) and current."""
    out = tmp_path / "gen"
    (out / "service" / "grpc").mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(ROOT),
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            f"--pyi_out={out}",
            str(ROOT / "service/transports/grpc/classifier.proto"),
        ],
        check=True,
    )
    for name in ("classifier_pb2.py", "classifier_pb2_grpc.py", "classifier_pb2.pyi"):
        assert (out / "service/transports/grpc" / name).read_text() == (
            ROOT / "service/transports/grpc" / name
        ).read_text(), name


def test_example_client(gateway, pngs, tmp_path):
    client, _, _ = gateway
    png = (tmp_path / "a.png", pngs[0][1])
    png[0].write_bytes(pngs[0][0])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.transports.grpc.example_client",
            "--target",
            f"127.0.0.1:{client.app.state.grpc_port}",
            "--top-k",
            "2",
            str(png[0]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{png[0]}: {TINY_LABELS[png[1]]} (")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "service.transports.grpc.example_client",
            str(tmp_path / "none.png"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert proc.returncode == 1 and "No such file" in proc.stderr


def test_grpc_rejections_are_counted_like_rest(gateway):
    client, stub, _ = gateway
    registry = client.app.state.runtime.metrics.registry
    labels = {"transport": "grpc", "outcome": "model_not_found"}
    before = counted(registry, "resnet_serve_requests_total", **labels)
    code_of(lambda: stub.Classify(pb.ClassifyRequest(model="not-here", images=[b"x"]), timeout=5))
    assert counted(registry, "resnet_serve_requests_total", **labels) == before + 1
