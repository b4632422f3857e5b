"""The REST API in process (real app, real lifespan, the trained digits model)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.backends.onnxruntime import OnnxRuntimeBackend
from service.settings import Settings


@pytest.fixture(scope="module")
def client(demo):
    app = create_app(
        Settings(repository=demo.repository, max_body_bytes=2_000_000, max_images_per_request=8)
    )
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def digit(demo):
    """(png bytes, label) of a few held-out digits."""
    return [(p.read_bytes(), label) for p, label in demo.pngs()[::57]]


def png(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def assert_error(resp, status: int, code: str, fragment: str = "") -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"]
    assert "Traceback" not in resp.text


# --- the API ----------------------------------------------------------------------------------


def test_multipart_many_files_in_order(client, digit):
    files = [("file", (f"{n}.png", data, "image/png")) for n, (data, _) in enumerate(digit)]
    resp = client.post("/v1/models/digits/classify", files=files, params={"top_k": 3})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model"] == "digits" and body["version"] == "1"
    assert len(body["predictions"]) == len(digit)
    for preds, (_, label) in zip(body["predictions"], digit, strict=True):
        assert len(preds) == 3
        assert preds[0]["index"] == label and preds[0]["label"] == str(label)
        scores = [p["score"] for p in preds]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6


def test_raw_body_and_default_model(client, digit):
    data, label = digit[0]
    for ctype in ("image/png", "application/octet-stream", "image/jpeg"):  # type is not trusted
        resp = client.post("/v1/classify", content=data, headers={"content-type": ctype})
        assert resp.status_code == 200, resp.text
        assert resp.json()["predictions"][0][0]["index"] == label
        assert len(resp.json()["predictions"][0]) == 5


def test_json_base64_and_top_k(client, digit):
    images = [{"b64": base64.b64encode(d).decode()} for d, _ in digit[:2]]
    resp = client.post("/v1/models/digits/classify", json={"images": images, "top_k": 10})
    assert resp.status_code == 200
    preds = resp.json()["predictions"]
    assert [len(p) for p in preds] == [10, 10]
    assert abs(sum(p["score"] for p in preds[0]) - 1.0) < 1e-6
    # The query parameter wins over the body.
    resp = client.post("/v1/models/digits/classify?top_k=1", json={"images": images, "top_k": 10})
    assert [len(p) for p in resp.json()["predictions"]] == [1, 1]


def test_same_answer_as_the_onnx_model(client, demo, digit):
    import onnxruntime as ort

    from service.contract import PreprocessContract
    from service.preprocess import preprocess

    contract = PreprocessContract.load(demo.model_dir / "preprocess.json")
    session = ort.InferenceSession(
        str(demo.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    data = digit[3][0]
    logits = session.run(None, {"input": preprocess(data, contract)[None]})[0][0]
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    resp = client.post("/v1/classify?top_k=10", content=data, headers={"content-type": "image/png"})
    got = {p["index"]: p["score"] for p in resp.json()["predictions"][0]}
    np.testing.assert_allclose([got[i] for i in range(10)], probs, rtol=1e-4, atol=1e-6)


def test_models_endpoints(client):
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["digits"]
    assert models[0]["labels_count"] == 10 and models[0]["default"] is True
    detail = client.get("/v1/models/digits").json()
    assert detail["contract"]["channels"] == "L" and detail["contract"]["crop"] == 32
    assert detail["version"] == "1" and detail["backend"] == "onnxruntime"
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found", "'nope'")


def test_health_ready_docs(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/models/{model}/classify"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/*", "application/json"} <= set(body)


def test_metrics_use_route_templates(client, digit):
    client.post(
        "/v1/models/digits/classify", content=digit[0][0], headers={"content-type": "image/png"}
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
    assert re.search(
        r'resnet_serve_model_info\{arch="resnet18",backend="onnxruntime",model="digits",precision="fp32",version="1"\} 1\.0',
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


def test_truncated_image_is_400(client, digit):
    data = digit[0][0]
    assert_error(
        client.post("/v1/classify", content=data[:40], headers={"content-type": "image/png"}),
        400,
        "invalid_image",
    )


def test_second_bad_image_is_named(client, digit):
    files = [
        ("file", ("a.png", digit[0][0], "image/png")),
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
def test_bad_top_k_is_422(client, digit, top_k):
    resp = client.post(
        f"/v1/classify?top_k={top_k}", content=digit[0][0], headers={"content-type": "image/png"}
    )
    assert_error(resp, 422, "validation_failed", "top_k")


def test_unknown_model_is_404_before_reading(client, digit):
    assert_error(
        client.post(
            "/v1/models/nope/classify", content=digit[0][0], headers={"content-type": "image/png"}
        ),
        404,
        "model_not_found",
    )


def test_too_many_images_is_413(client, digit):
    files = [("file", (f"{n}.png", digit[0][0], "image/png")) for n in range(9)]
    assert_error(client.post("/v1/classify", files=files), 413, "payload_too_large", "limit is 8")
    images = [{"b64": base64.b64encode(digit[0][0]).decode()}] * 9
    assert_error(
        client.post("/v1/classify", json={"images": images}), 413, "payload_too_large", "limit is 8"
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
    assert_error(
        client.post(
            "/v1/classify", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
        "validation_failed",
    )


def test_bad_timeout_header(client, digit):
    assert_error(
        client.post(
            "/v1/classify",
            content=digit[0][0],
            headers={"content-type": "image/png", "x-request-timeout": "-1"},
        ),
        422,
        "validation_failed",
        "X-Request-Timeout",
    )
    assert_error(
        client.post(
            "/v1/classify",
            content=digit[0][0],
            headers={"content-type": "image/png", "x-request-timeout": "soon"},
        ),
        422,
        "validation_failed",
    )


def test_unknown_route_and_method(client):
    assert_error(client.get("/v2/nothing"), 404, "not_found")
    assert_error(client.get("/v1/classify"), 405, "method_not_allowed")


def test_server_unharmed_after_bad_input(client, digit):
    resp = client.post("/v1/classify", content=digit[0][0], headers={"content-type": "image/png"})
    assert resp.status_code == 200
    assert 'status="500"' not in client.get("/metrics").text


# --- API keys ---------------------------------------------------------------------------------


def test_api_keys(demo, digit):
    app = create_app(Settings(repository=demo.repository, api_keys=["s3cret", "other"]))
    with TestClient(app) as c:
        data = digit[0][0]
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
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert c.get(open_path).status_code == 200


# --- overload and deadlines -------------------------------------------------------------------


class SlowBackend(OnnxRuntimeBackend):
    """The real ORT backend, made slow, to fill the queue deterministically."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.batches: list[int] = []

    async def infer(self, spec, batch, timeout_s):
        self.batches.append(len(batch))
        await asyncio.sleep(self.delay)
        return await super().infer(spec, batch, timeout_s)


def test_full_queue_is_503_with_retry_after_and_deadline_is_504(demo, digit):
    settings = Settings(
        repository=demo.repository, max_queue_images=2, max_batch_size=1, max_batch_delay_ms=0
    )
    backend = SlowBackend(0.4)
    with TestClient(create_app(settings, backend=backend)) as c:
        data = digit[0][0]
        hdr = {"content-type": "image/png"}
        results: list = []

        def call():
            results.append(c.post("/v1/classify", content=data, headers=hdr))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert 200 in codes and 503 in codes, codes
        assert set(codes) <= {200, 503}
        rejected = next(r for r in results if r.status_code == 503)
        assert int(rejected.headers["retry-after"]) >= 1
        assert_error(rejected, 503, "overloaded", "retry later")

        resp = c.post("/v1/classify", content=data, headers={**hdr, "x-request-timeout": "0.1"})
        assert_error(resp, 504, "deadline_exceeded")
        text = c.get("/metrics").text
        assert 'resnet_serve_rejections_total{reason="queue_full"}' in text
        assert 'resnet_serve_rejections_total{reason="deadline"}' in text


def test_concurrent_requests_share_a_backend_call(demo, digit):
    backend = SlowBackend(0.2)
    with TestClient(
        create_app(Settings(repository=demo.repository, max_batch_delay_ms=50), backend=backend)
    ) as c:
        backend.batches.clear()
        data = digit[0][0]
        threads = [
            threading.Thread(
                target=c.post,
                args=("/v1/classify",),
                kwargs={"content": data, "headers": {"content-type": "image/png"}},
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert backend.batches == [2]


def test_misconfigured_repository_fails_startup(tmp_path):
    app = create_app(Settings(repository=tmp_path))
    with pytest.raises(Exception, match="holds no model"), TestClient(app):
        pass


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RESNET_SERVE_MODELS", "a, b")
    monkeypatch.setenv("RESNET_SERVE_API_KEYS", "k1,k2")
    monkeypatch.setenv("RESNET_SERVE_MAX_QUEUE_IMAGES", "7")
    s = Settings()
    assert s.models == ["a", "b"] and s.api_keys == ["k1", "k2"] and s.max_queue_images == 7
    monkeypatch.setenv("RESNET_SERVE_MAX_QUEUE_IMAGES", "0")
    with pytest.raises(ValueError, match="max_queue_images"):
        Settings()


# --- KServe v2 in process (tritonclient against a real Triton: tests/e2e/test_triton.py) ------


def test_kserve_json_infer_and_errors(client, demo, digit):
    from service.contract import PreprocessContract
    from service.preprocess import preprocess

    contract = PreprocessContract.load(demo.model_dir / "preprocess.json")
    x = preprocess(digit[0][0], contract)[None]
    body = {
        "id": "r1",
        "inputs": [
            {
                "name": "input",
                "shape": [1, 1, 32, 32],
                "datatype": "FP32",
                "data": x.ravel().tolist(),
            }
        ],
    }
    resp = client.post("/v2/models/digits/infer", json=body)
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["id"] == "r1" and out["model_name"] == "digits" and out["model_version"] == "1"
    assert out["outputs"][0]["shape"] == [1, 10]
    assert int(np.argmax(out["outputs"][0]["data"])) == digit[0][1]
    assert client.get("/v2/health/ready").status_code == 200
    assert client.get("/v2/models/digits/versions/9/ready").status_code == 404

    bad = {**body, "inputs": [{**body["inputs"][0], "shape": [1, 3, 32, 32]}]}
    resp = client.post("/v2/models/digits/infer", json=bad)
    assert resp.status_code == 400
    assert resp.json() == {
        "error": "input 'input' has shape [1, 3, 32, 32]; expected [n, 1, 32, 32]",
        "code": "invalid_request",
    }
    nan = {**body, "inputs": [{**body["inputs"][0], "data": [float("nan")] * 1024}]}
    resp = client.post(
        "/v2/models/digits/infer",
        content=json.dumps(nan),
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400 and "NaN" in resp.json()["error"]
    resp = client.post(
        "/v2/models/digits/infer", content=b"{", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_request"
    resp = client.post(
        "/v2/models/digits/infer", content=b"{}", headers={"inference-header-content-length": "99"}
    )
    assert resp.status_code == 400 and "does not fit" in resp.json()["error"]
    assert client.get("/v2/models/nope").status_code == 404
    assert 'resnet_serve_rejections_total{reason="invalid_request"}' in client.get("/metrics").text
