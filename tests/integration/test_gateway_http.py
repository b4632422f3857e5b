"""The REST API and KServe v2 over HTTP in process (real app, real lifespan, the tiny model)."""

from __future__ import annotations

import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.backends.onnxruntime import OnnxRuntimeBackend
from service.host.cpus import cpu_isa
from service.host.processes import wait_until
from service.settings import Settings
from service.transports.http.app import create_app
from service.transports.serving import ThreadedGateway
from tests.helpers.doubles import SlowBackend
from tests.helpers.engines import ENGINES
from tests.helpers.errors import assert_error
from tests.helpers.images import image_bytes
from tests.helpers.metrics import counted
from tests.helpers.models import TINY_LABELS


@pytest.fixture(scope="module", params=ENGINES)
def client(tiny, request):
    """The gateway on the tiny model, with each engine of the embedded backend."""
    app = create_app(
        Settings(
            repository=tiny.repository,
            max_body_bytes=2_000_000,
            max_images_per_request=8,
            engine=request.param,
        )
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def images():
    """Real PNG files of different sizes."""
    return [image_bytes("PNG", (40 + 7 * n, 33 + 5 * n), seed=n) for n in range(6)]


def top1(client, data: bytes) -> int:
    resp = client.post("/v1/classify?top_k=1", content=data, headers={"content-type": "image/png"})
    assert resp.status_code == 200, resp.text
    return resp.json()["predictions"][0][0]["index"]


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# --- the API ----------------------------------------------------------------------------------


def test_multipart_many_files_in_order(client, images):
    files = [("file", (f"{n}.png", data, "image/png")) for n, data in enumerate(images)]
    resp = client.post("/v1/models/tiny/classify", files=files, params={"top_k": 3})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "tiny" and body["version"] == "1"
    assert len(body["predictions"]) == len(images)
    for preds, data in zip(body["predictions"], images, strict=True):
        assert len(preds) == 3
        assert preds[0]["index"] == top1(client, data)  # each image its own answer, in order
        assert preds[0]["label"] == TINY_LABELS[preds[0]["index"]]
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6


def test_raw_body_and_default_model(client, images):
    data = images[0]
    expected = top1(client, data)
    for ctype in ("image/png", "application/octet-stream", "image/jpeg"):  # type is not trusted
        resp = client.post("/v1/classify", content=data, headers={"content-type": ctype})
        assert resp.status_code == 200, resp.text
        assert resp.json()["predictions"][0][0]["index"] == expected
        assert len(resp.json()["predictions"][0]) == 5


def test_json_base64_and_top_k(client, images):
    body = [{"b64": base64.b64encode(d).decode()} for d in images[:2]]
    resp = client.post("/v1/models/tiny/classify", json={"images": body, "top_k": 10})
    assert resp.status_code == 200
    preds = resp.json()["predictions"]
    assert [len(p) for p in preds] == [10, 10]
    assert abs(sum(p["score"] for p in preds[0]) - 1.0) < 1e-6
    # The query parameter wins over the body.
    resp = client.post("/v1/models/tiny/classify?top_k=1", json={"images": body, "top_k": 10})
    assert [len(p) for p in resp.json()["predictions"]] == [1, 1]
    assert_error(
        client.post("/v1/models/tiny/classify", json={"images": body, "top_k": 11}),
        422,
        "validation_failed",
        "top_k must be an integer between 1 and 10",
    )


def test_same_answer_as_the_onnx_model(client, tiny, images):
    import onnxruntime as ort

    from service.dataplane.preprocess import preprocess

    session = ort.InferenceSession(
        str(tiny.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    data = images[3]
    logits = session.run(None, {"input": preprocess(data, tiny.contract)[None]})[0][0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    resp = client.post("/v1/classify?top_k=10", content=data, headers={"content-type": "image/png"})
    got = {p["index"]: p["score"] for p in resp.json()["predictions"][0]}
    np.testing.assert_allclose([got[i] for i in range(10)], probs, rtol=1e-4, atol=1e-6)


def test_models_endpoints(client):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["tiny"]
    assert models[0]["labels_count"] == 10 and models[0]["default"] is True
    detail = client.get("/v1/models/tiny").json()
    assert detail["contract"]["channels"] == "RGB" and detail["contract"]["crop"] == 32
    engine = client.app.state.runtime.settings.engine  # the fixture's
    assert detail["version"] == "1" and detail["backend"] == engine
    assert detail["precision"] == detail["served_precision"] == "fp32"
    assert client.get("/v2/models/tiny").json()["parameters"]["backend"] == engine
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found", "'nope'")


def test_the_cost_model_is_shown_per_batch_size(client, images):
    """What the batcher plans with: every size up to the cap, measured at warm-up (the
    metric has exactly the measured sizes), learned from live batches."""
    costs = client.get("/v1/models/tiny").json()["batch_cost_ms"]
    assert list(costs) == [str(n) for n in range(1, 9)]  # max_batch_size 8
    assert all(v > 0 for v in costs.values())
    png_body = {"content": images[0], "headers": {"content-type": "image/png"}}
    assert client.post("/v1/classify", **png_body).status_code == 200
    metrics = client.get("/metrics").text
    sizes = {
        line.split('batch_size="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("resnet_serve_batch_cost_seconds{") and 'model="tiny"' in line
    }
    assert "1" in sizes and sizes <= {str(n) for n in range(1, 9)}
    after = client.get("/v1/models/tiny").json()["batch_cost_ms"]
    assert set(after) == set(costs)


def test_long_names_are_not_echoed_whole(client):
    resp = client.get("/v1/models/" + "x" * 60_000)
    assert_error(resp, 404, "model_not_found", "(60000 chars)")
    assert len(resp.text) < 500


def test_health_ready_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/models/{model}/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body)


def test_metrics_use_route_templates(client, images):
    client.post(
        "/v1/models/tiny/classify", content=images[0], headers={"content-type": "image/png"}
    )
    client.get("/no/such/path/12345")
    text = client.get("/metrics").text
    assert 'route="/v1/models/{model}/classify"' in text
    assert "/no/such/path" not in text and 'route="unmatched"' in text
    for name in (
        "resnet_serve_request_duration_seconds",
        "resnet_serve_preprocess_seconds",
        "resnet_serve_queue_wait_seconds",
        "resnet_serve_inference_seconds",
        "resnet_serve_batch_size",
        "resnet_serve_queue_depth",
        "resnet_serve_inflight_requests",
        "resnet_serve_model_info",
        "resnet_serve_ready 1.0",
    ):
        assert name in text
    engine = client.app.state.runtime.settings.engine  # the fixture's
    assert re.search(
        rf'resnet_serve_model_info\{{arch="tiny",backend="{engine}",kernels="'
        + re.escape(cpu_isa())
        + r'",model="tiny",precision="fp32",served_precision="fp32",version="1"\} 1\.0',
        text,
    )


def test_request_id_is_echoed(client):
    resp = client.get("/healthz", headers={"x-request-id": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32


# --- bad input: a clear 4xx, the server unharmed ---------------------------------------------


def test_body_over_limit_is_413(client):
    assert_error(
        client.post(
            "/v1/classify",
            content=b"\xff\xd8\xff" + b"0" * 2_100_000,
            headers={"content-type": "image/jpeg"},
        ),
        413,
        "payload_too_large",
        "limit is 2000000",
    )


def test_chunked_body_over_limit_is_413(client):
    def chunks():
        for _ in range(30):
            yield b"x" * 100_000

    resp = client.post("/v1/classify", content=chunks(), headers={"content-type": "image/png"})
    assert_error(resp, 413, "payload_too_large")


def test_pixel_bomb_is_413(client):
    bomb = png(Image.new("L", (8000, 6000)))
    assert_error(
        client.post("/v1/classify", content=bomb, headers={"content-type": "image/png"}),
        413,
        "payload_too_large",
        "8000x6000",
    )


def test_unknown_format_is_415(client):
    assert_error(
        client.post(
            "/v1/classify", content=b"GIF90a-not-really", headers={"content-type": "image/gif"}
        ),
        415,
        "unsupported_media_type",
    )
    assert_error(
        client.post("/v1/classify", content=b"hello", headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
        "text/plain",
    )


def test_truncated_image_is_400(client, images):
    assert_error(
        client.post("/v1/classify", content=images[0][:40], headers={"content-type": "image/png"}),
        400,
        "invalid_image",
    )


def test_second_bad_image_is_named(client, images):
    files = [
        ("file", ("a.png", images[0], "image/png")),
        ("file", ("b.png", b"junk", "image/png")),
    ]
    assert_error(
        client.post("/v1/classify", files=files), 415, "unsupported_media_type", "image 2:"
    )


def test_empty_body_and_missing_parts(client):
    assert_error(
        client.post("/v1/classify", content=b"", headers={"content-type": "image/png"}),
        400,
        "invalid_request",
        "empty",
    )
    assert_error(
        client.post("/v1/classify", data={"other": "x"}, files={"notfile": ("a", b"x")}),
        400,
        "invalid_request",
        "no 'file' part",
    )
    assert_error(client.post("/v1/classify", content=b"x"), 400, "invalid_request", "Content-Type")
    assert_error(
        client.post(
            "/v1/classify", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}
        ),
        400,
        "invalid_request",
        "multipart",
    )


@pytest.mark.parametrize("top_k", ["0", "11", "-1", "abc", "2.5"])
def test_bad_top_k_is_422(client, images, top_k):
    resp = client.post(
        f"/v1/classify?top_k={top_k}", content=images[0], headers={"content-type": "image/png"}
    )
    assert_error(resp, 422, "validation_failed", "top_k")


def test_unknown_model_is_404_before_reading(client, images):
    assert_error(
        client.post(
            "/v1/models/nope/classify", content=images[0], headers={"content-type": "image/png"}
        ),
        404,
        "model_not_found",
    )


def test_too_many_images_is_413(client, images):
    files = [("file", (f"{n}.png", images[0], "image/png")) for n in range(9)]
    assert_error(client.post("/v1/classify", files=files), 413, "payload_too_large", "limit is 8")
    body = [{"b64": base64.b64encode(images[0]).decode()}] * 9
    assert_error(
        client.post("/v1/classify", json={"images": body}), 413, "payload_too_large", "limit is 8"
    )


def test_bad_json_bodies(client):
    assert_error(
        client.post("/v1/classify", json={"images": [{"b64": "!!!"}]}),
        400,
        "invalid_image",
        "base64",
    )
    assert_error(
        client.post("/v1/classify", json={"images": []}), 422, "validation_failed", "images"
    )
    assert_error(client.post("/v1/classify", json={"pictures": []}), 422, "validation_failed")
    # Not JSON at all: 400, the same status as on /v2.
    assert_error(
        client.post(
            "/v1/classify", content=b"{not json", headers={"content-type": "application/json"}
        ),
        400,
        "invalid_request",
        "not valid JSON",
    )


@pytest.mark.parametrize("value", ["-1", "0", "soon", "nan", "inf"])
def test_bad_timeout_header(client, images, value):
    assert_error(
        client.post(
            "/v1/classify",
            content=images[0],
            headers={"content-type": "image/png", "x-request-timeout": value},
        ),
        422,
        "validation_failed",
        "timeout",
    )


def test_unknown_route_and_method_in_each_dialect(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")
    resp = client.get("/v2/nothing")
    assert resp.status_code == 404 and resp.json() == {
        "error": "no such route; see /docs",
        "code": "not_found",
    }


def test_server_unharmed_after_bad_input(client, images):
    resp = client.post("/v1/classify", content=images[0], headers={"content-type": "image/png"})
    assert resp.status_code == 200
    assert 'status="500"' not in client.get("/metrics").text


# --- API keys ---------------------------------------------------------------------------------


def test_api_keys(tiny, images):
    app = create_app(Settings(repository=tiny.repository, api_keys=["s3cret", "other"]))
    with TestClient(app) as c:
        data = images[0]
        hdr = {"content-type": "image/png"}
        assert_error(
            c.post("/v1/classify", content=data, headers=hdr), 401, "unauthorized", "required"
        )
        assert_error(
            c.post("/v1/classify", content=data, headers={**hdr, "x-api-key": "wrong"}),
            401,
            "unauthorized",
            "invalid",
        )
        assert (
            c.post("/v1/classify", content=data, headers={**hdr, "x-api-key": "s3cret"}).status_code
            == 200
        )
        assert (
            c.post(
                "/v1/classify", content=data, headers={**hdr, "authorization": "Bearer other"}
            ).status_code
            == 200
        )
        assert_error(c.get("/v1/models"), 401, "unauthorized")
        assert c.get("/v2/models/tiny").status_code == 401
        for open_path in ("/healthz", "/readyz", "/metrics", "/v2", "/v2/health/ready"):
            assert c.get(open_path).status_code == 200, open_path


def test_the_start_up_heap_is_frozen(tiny):
    """What is alive when the gateway has started is out of the cyclic collector's scans
    (service.runtime.core.freeze_heap): full collections stay short while serving."""
    import gc

    alive = [object()]  # a tracked container
    assert any(o is alive for o in gc.get_objects())
    with TestClient(create_app(Settings(repository=tiny.repository))) as c:
        assert c.get("/readyz").status_code == 200
        assert not any(o is alive for o in gc.get_objects())


# --- the direct path --------------------------------------------------------------------------

# (path, query, headers) of classify requests: the direct path takes the first group and
# leaves the second to FastAPI's route.
DIRECT_CASES = [
    ("/v1/classify", "", {}),
    ("/v1/models/tiny/classify", "top_k=3", {"x-request-timeout": "2.5"}),
    ("/v1/models/tiny/versions/1/classify", "top_k=10&other=1", {"x-api-key": "wrong"}),
    ("/v1/models/tiny/classify", "", {"authorization": "Bearer s3cret"}),
    ("/v1/models/tiny/classify", "top_k=11", {}),  # the data plane's range check
    ("/v1/models/nope/classify", "", {}),
    ("/v1/models/tiny/versions/9/classify", "", {}),
]
ROUTE_CASES = [
    ("/v1/classify", "top_k=abc", {}),
    ("/v1/classify", "top_k=0", {}),
    ("/v1/classify", "top_k=2&top_k=3", {}),
    ("/v1/classify", "top_k=+3", {}),
    ("/v1/classify", "top_k=%C2%B2&%C3%AD=%F2%BB%9D%B6", {}),  # non-ASCII, percent-escaped
    ("/v1/classify", "", {"x-request-timeout": "1e1"}),
    ("/v1/classify", "", {"x-request-timeout": "inf"}),
    ("/v1/classify", "", {"x-request-timeout": "0.0005"}),  # below MIN_TIMEOUT_S
    ("/v1/classify/", "", {}),
]


def test_the_direct_path_answers_as_the_routes_do(tiny, images, monkeypatch):
    """Every classify request gets the same status, body and headers from the direct path
    (service.transports.http.rest_v1.DirectClassify) as from FastAPI's route; plain ones take the direct
    path, the rest the route."""
    from service.transports.http import rest_v1 as v1

    app = create_app(Settings(repository=tiny.repository, api_keys=["s3cret"]))
    direct: list[str] = []
    serve = v1.DirectClassify._serve

    async def counted_serve(self, scope, *args):
        direct.append(scope["path"])
        await serve(self, scope, *args)

    monkeypatch.setattr(v1.DirectClassify, "_serve", counted_serve)
    plain = v1._plain_params

    def answer(c, path, query, headers, use_direct):
        monkeypatch.setattr(v1, "_plain_params", plain if use_direct else lambda *_: (False, None))
        hdr = {"content-type": "image/png", "x-api-key": "s3cret", **headers}
        resp = c.post(f"{path}?{query}", content=images[1], headers=hdr, follow_redirects=False)
        kept = {k: v for k, v in resp.headers.items() if k not in ("x-request-id", "date")}
        return resp.status_code, resp.content, kept

    with TestClient(app) as c:
        for path, query, headers in DIRECT_CASES + ROUTE_CASES:
            direct.clear()
            via_direct = answer(c, path, query, headers, True)
            took_direct = bool(direct)
            direct.clear()
            assert answer(c, path, query, headers, False) == via_direct, (path, query, headers)
            assert not direct
            assert took_direct == ((path, query, headers) in DIRECT_CASES), (path, query)
        statuses = {answer(c, *case, True)[0] for case in DIRECT_CASES}
        assert statuses == {200, 401, 404, 422}, statuses


# --- overload and deadlines -------------------------------------------------------------------


def test_full_queue_is_503_and_hopeless_deadlines_504_at_once(tiny, images):
    settings = Settings(
        repository=tiny.repository, max_queue_images=2, max_batch_size=1, max_batch_delay_ms=0
    )
    backend = SlowBackend(OnnxRuntimeBackend(), 0.4)
    with TestClient(create_app(settings, backend=backend)) as c:
        data = images[0]
        hdr = {"content-type": "image/png"}
        results: list = []

        def call():
            results.append(c.post("/v1/classify", content=data, headers=hdr))

        # The first request's batch stays in the backend until the refusals are in; of the
        # five behind it, two queue (the limit) and three are refused at once, however and
        # whenever they arrive.
        with backend.holding(call, *[call] * 5):
            wait_until(lambda: len(results) == 3, 30, "the three refusals never came")
            assert {r.status_code for r in results} == {503}
        codes = sorted(r.status_code for r in results)
        assert codes == [200] * 3 + [503] * 3, codes
        rejected = next(r for r in results if r.status_code == 503)
        assert int(rejected.headers["retry-after"]) >= 1
        assert_error(rejected, 503, "overloaded", "retry later")

        # A batch is known to take ~0.4 s: 0.1 s cannot be met even by an idle model, and
        # is answered so at once, before any work (retrying would not help: 504, not 503):
        # before its deadline, which an answer that waited for anything would reach.
        timeout_s = 0.1
        headers = {**hdr, "x-request-timeout": str(timeout_s)}
        registry = c.app.state.runtime.metrics.registry
        batches = len(backend.batches)
        decoded = counted(registry, "resnet_serve_preprocess_seconds_count", model="tiny")
        resp = c.post("/v1/classify", content=data, headers=headers)
        # Admission's answer (one that waited would have been the deadline's own 504), given
        # before its image was decoded or any batch ran.
        assert_error(resp, 504, "deadline_exceeded", "shorter than model 'tiny' needs")
        assert len(backend.batches) == batches
        assert counted(registry, "resnet_serve_preprocess_seconds_count", model="tiny") == decoded
        refused = codes.count(503)  # one rejection counted per refused request
        assert counted(registry, "resnet_serve_requests_total", outcome="overloaded") == refused


class KnownCost(SlowBackend):
    """The slow backend, its batch cost the same for every gateway (its warm-up's timing
    not added in): two gateways quote the same estimate in a refusal."""

    def warm_costs(self, spec):
        return dict.fromkeys(self.inner.warm_costs(spec), self.delay_s)


def test_a_refusal_before_the_app_answers_as_the_app_does(tiny, images):
    """Over a real socket a refused classify is answered by the HTTP protocol, before the
    app (service.transports.http.guard): the same status, envelope, request id and count as the app's
    answer to it in process (TestClient), in each dialect; its body is skipped, not read
    as a next request, and the connection serves on."""
    settings = Settings(repository=tiny.repository, max_batch_size=1, max_batch_delay_ms=0)
    slow = 0.4  # a batch's cost: a 10 ms deadline is one no model here can meet (504 at once)
    hopeless = {"x-request-timeout": "0.01", "x-request-id": "refused-1"}
    paths = {"/v1/models/tiny/classify": "/v1/models/{model}/classify",
             "/v2/models/tiny/infer": "/v2/models/{model}/infer"}  # fmt: skip
    with TestClient(create_app(settings, backend=KnownCost(OnnxRuntimeBackend(), slow))) as c:
        in_process = {p: c.post(p, content=images[0], headers=hopeless) for p in paths}
    with (
        ThreadedGateway(settings, KnownCost(OnnxRuntimeBackend(), slow)) as gw,
        httpx.Client(base_url=gw.url) as client,  # one keep-alive connection
    ):
        for path in paths:
            got = client.post(path, content=images[0], headers=hopeless)
            want = in_process[path]
            assert (got.status_code, got.json()) == (want.status_code, want.json())
            assert got.status_code == 504 and got.headers["x-request-id"] == "refused-1"
        assert client.get("/healthz").status_code == 200  # the same connection, serving on
        registry = gw.runtime.metrics.registry
        for template in paths.values():
            assert counted(registry, "resnet_serve_requests_total",
                           route=template, outcome="deadline_exceeded") == 1  # fmt: skip


def test_concurrent_requests_share_a_backend_call(tiny, images):
    """Two requests from two threads, queued together, go to the backend as one batch. They
    meet behind a batch held in the backend (not within a batch delay, which a busy
    machine's threads may miss): the queue's depth says when both are there."""
    backend = SlowBackend(OnnxRuntimeBackend(), 0.0)
    settings = Settings(repository=tiny.repository, max_batch_delay_ms=50)
    with TestClient(create_app(settings, backend=backend)) as c:
        registry = c.app.state.runtime.metrics.registry
        backend.batches.clear()

        def post() -> None:
            resp = c.post("/v1/classify", content=images[0], headers={"content-type": "image/png"})
            assert resp.status_code == 200, resp.text

        def queued() -> float:
            return counted(registry, "resnet_serve_queue_depth", model="tiny")

        with backend.holding(post, post, post):
            wait_until(lambda: queued() == 2, 30, "the two requests never queued together")
        assert backend.batches == [1, 2]


def test_misconfigured_repository_fails_startup(tmp_path):
    app = create_app(Settings(repository=tmp_path))
    with pytest.raises(Exception, match="holds no model"), TestClient(app):
        pass


def test_settings_from_environment(monkeypatch, tmp_path):
    from pydantic import ValidationError

    from service.settings import describe_settings_error

    monkeypatch.setenv("RESNET_SERVE_MODELS", "a, b")
    monkeypatch.setenv("RESNET_SERVE_API_KEYS", "k1,k2")
    monkeypatch.setenv("RESNET_SERVE_MAX_QUEUE_IMAGES", "7")
    s = Settings()
    assert s.models == ["a", "b"] and s.api_keys == ["k1", "k2"] and s.max_queue_images == 7
    monkeypatch.setenv("RESNET_SERVE_MAX_QUEUE_IMAGES", "0")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert describe_settings_error(info.value).startswith("RESNET_SERVE_MAX_QUEUE_IMAGES=0: ")
    monkeypatch.setenv("RESNET_SERVE_MAX_QUEUE_IMAGES", "7")
    monkeypatch.setenv("RESNET_SERVE_ORT_PROVIDERS", "CPUExecutionProvider")
    assert Settings().ort_providers == ["CPUExecutionProvider"]
    # Providers matter only where this process runs ONNX Runtime.
    monkeypatch.setenv("RESNET_SERVE_ORT_PROVIDERS", "CUDAExecutionProvider")
    assert Settings(backend="triton").ort_providers == ["CUDAExecutionProvider"]
    with pytest.raises(ValidationError, match="CUDAExecutionProvider not available"):
        Settings()


# --- KServe v2 over HTTP in process (tritonclient against a real Triton: tests/e2e) ----------


def infer_body(x: np.ndarray, **extra) -> dict:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
        **extra,
    }


def kserve_error(resp, status: int, code: str, fragment: str = "") -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "code"} and body["code"] == code, body
    assert fragment in body["error"], body


def test_kserve_json_infer(client, tiny, images):
    from service.dataplane.preprocess import preprocess

    x = preprocess(images[0], tiny.contract)[None]
    resp = client.post("/v2/models/tiny/infer", json=infer_body(x, id="r1"))
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["id"] == "r1" and out["model_name"] == "tiny" and out["model_version"] == "1"
    assert out["outputs"][0]["shape"] == [1, 10]
    assert int(np.argmax(out["outputs"][0]["data"])) == top1(client, images[0])
    nested = infer_body(x)
    nested["inputs"][0]["data"] = x.tolist()  # nested row-major lists are accepted too
    assert client.post("/v2/models/tiny/infer", json=nested).json()["outputs"] == out["outputs"]
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/tiny/versions/1/ready").status_code == 200


def test_kserve_classification_extension(client, images):
    b64 = base64.b64encode(images[1]).decode()
    body = {
        "inputs": [{"name": "images", "shape": [1], "datatype": "BYTES", "data": [b64]}],
        "outputs": [{"name": "logits", "parameters": {"classification": 3}}],
    }
    resp = client.post("/v2/models/tiny/infer", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    assert out["datatype"] == "BYTES" and out["shape"] == [1, 3]
    _, index, label = out["data"][0].split(":")
    assert int(index) == top1(client, images[1]) and label == TINY_LABELS[int(index)]
    body["outputs"][0]["parameters"]["classification"] = 11  # the same rule as top_k
    kserve_error(
        client.post("/v2/models/tiny/infer", json=body), 422, "validation_failed", "class_count"
    )


@pytest.mark.parametrize(
    ("mutate", "status", "code", "fragment"),
    [
        (
            lambda b: b["inputs"][0].update(shape=[1, 1, 32, 32]),
            400,
            "invalid_request",
            "expected [n, 3, 32, 32]",
        ),
        (
            lambda b: b["inputs"][0].update(data=[float("nan")] * 3072),
            400,
            "invalid_request",
            "NaN",
        ),
        (lambda b: b["inputs"][0].update(data=[True] * 3072), 400, "invalid_request", "numbers"),
        (lambda b: b["inputs"][0].update(data=[1e39] * 3072), 400, "invalid_request", "FP32 range"),
        (lambda b: b["inputs"][0].update(data=[1.0] * 3071), 400, "invalid_request", "3071 values"),
        (lambda b: b["inputs"][0].update(datatype="INT8"), 400, "invalid_request", "must be FP32"),
        (lambda b: b["inputs"][0].update(name="other"), 400, "invalid_request", "unexpected input"),
        (lambda b: b.update(outputs=[{"name": "probs"}]), 400, "invalid_request", "unknown output"),
        (lambda b: b.update(parameters={"timeout": -5}), 422, "validation_failed", "timeout"),
        (lambda b: b.pop("inputs"), 422, "validation_failed", "inputs"),
    ],
)
def test_kserve_bad_requests(client, mutate, status, code, fragment):
    body = infer_body(np.zeros((1, 3, 32, 32), np.float32))
    mutate(body)
    resp = client.post(
        "/v2/models/tiny/infer",
        content=json.dumps(body),
        headers={"content-type": "application/json"},
    )
    kserve_error(resp, status, code, fragment)


def test_kserve_bad_bodies(client):
    huge = (
        '{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [1'
        + "0" * 400
        + "]}]}"
    )
    kserve_error(
        client.post("/v2/models/tiny/infer", content=huge), 400, "invalid_request", "FP32 range"
    )
    kserve_error(
        client.post(
            "/v2/models/tiny/infer", content=b"{", headers={"content-type": "application/json"}
        ),
        400,
        "invalid_request",
        "not valid JSON",
    )
    kserve_error(
        client.post(
            "/v2/models/tiny/infer",
            content=b"{}",
            headers={"inference-header-content-length": "99"},
        ),
        400,
        "invalid_request",
        "does not fit",
    )
    kserve_error(client.get("/v2/models/nope"), 404, "model_not_found", "'nope'")
    kserve_error(client.get("/v2/models/tiny/versions/9/ready"), 404, "model_not_found", "version")
    registry = client.app.state.runtime.metrics.registry
    assert counted(registry, "resnet_serve_requests_total", outcome="invalid_request") > 0
    assert counted(registry, "resnet_serve_requests_total", outcome="internal") == 0


def test_kserve_statistics(client, images):
    before = client.get("/v2/models/tiny/stats").json()["model_stats"][0]
    files = [("file", (f"{n}.png", data, "image/png")) for n, data in enumerate(images[:3])]
    assert client.post("/v1/models/tiny/classify", files=files).status_code == 200
    client.post("/v1/classify", content=b"junk", headers={"content-type": "image/png"})
    after = client.get("/v2/models/tiny/stats").json()["model_stats"][0]
    assert (after["name"], after["version"]) == ("tiny", "1")
    assert after["inference_count"] == before["inference_count"] + 3
    assert after["execution_count"] > before["execution_count"]
    stats, old = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] == old["success"]["count"] + 1
    assert stats["fail"]["count"] == old["fail"]["count"] + 1
    for kind in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[kind]["count"] == old[kind]["count"] + 1, kind
        assert stats[kind]["ns"] > old[kind]["ns"], kind
    assert (
        sum(b["compute_infer"]["count"] for b in after["batch_stats"]) == after["execution_count"]
    )
    assert after["last_inference"] > 0
    every = client.get("/v2/models/stats").json()["model_stats"]
    assert [m["name"] for m in every] == ["tiny"]
    kserve_error(client.get("/v2/models/tiny/versions/7/stats"), 404, "model_not_found")


# --- the OpenAPI document ---------------------------------------------------------------------


def test_openapi_document_generates_good_clients(client):
    doc = client.get("/openapi.json").json()

    def refs(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    for ref in set(refs(doc)):  # every reference resolves inside the document
        assert ref.startswith("#/"), ref
        node = doc
        for part in ref[2:].split("/"):
            assert part in node, f"dangling {ref}"
            node = node[part]
    ids = [op["operationId"] for path in doc["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    assert all("__" not in i and not i.endswith(("_get", "_post")) for i in ids), ids  # explicit
    assert {"classify", "classify_default", "list_models", "model_infer", "readyz"} <= set(ids)
    schemes = doc["components"]["securitySchemes"]
    assert (
        schemes["APIKeyHeader"]["name"] == "X-API-Key"
        and schemes["HTTPBearer"]["scheme"] == "bearer"
    )
    classify = doc["paths"]["/v1/models/{model}/classify"]["post"]
    assert {"APIKeyHeader": []} in classify["security"]
    assert set(classify["responses"]) == {
        "200",
        "400",
        "401",
        "404",
        "413",
        "415",
        "422",
        "503",
        "504",
    }
    assert "security" not in doc["paths"]["/readyz"]["get"]
    assert set(doc["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    body = classify["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ClassifyJSON"}
