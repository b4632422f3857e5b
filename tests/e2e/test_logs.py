"""The request log of a real gateway process with RESNET_SERVE_LOG_FORMAT=json: one JSON line
per request on every transport, carrying the request id the client got back, the model
version, images, outcome and stage timings; never a key or an image's bytes."""

from __future__ import annotations

import base64
import json

import grpc
import httpx
import pytest
from tritonclient.grpc import service_pb2 as kpb

from service.host.processes import GatewayProcess, wait_until
from service.tools.otlp_receiver import OtlpReceiver
from service.transports.grpc import classifier_pb2 as cpb
from service.transports.openinference import serialize_bytes
from tests.helpers.images import image_bytes

KEY = "s3cret-key-never-logged"


@pytest.fixture(scope="module")
def gateway(tiny, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    env = {"RESNET_SERVE_LOG_FORMAT": "json", "RESNET_SERVE_API_KEYS": KEY}
    gw = GatewayProcess.start(log, "--repository", str(tiny.repository), grpc=True, env=env)
    yield gw
    gw.stop()


def lines(gw: GatewayProcess) -> list[dict]:
    """Every line of the process's output, each one a JSON object."""
    return [json.loads(line) for line in gw.output().splitlines() if line.strip()]


def grpc_call(gw: GatewayProcess, method: str, request, metadata) -> tuple[grpc.StatusCode, dict]:
    with grpc.insecure_channel(gw.grpc_target) as channel:
        stub = channel.unary_unary(method, request_serializer=type(request).SerializeToString)
        try:
            _, call = stub.with_call(request, timeout=30, metadata=metadata)
            return grpc.StatusCode.OK, dict(call.trailing_metadata() or ())
        except grpc.RpcError as err:
            return err.code(), dict(err.trailing_metadata() or ())


def test_one_json_line_per_request_on_every_transport(gateway):
    image = image_bytes(seed=3)
    auth = {"x-api-key": KEY}
    answered: dict[str, str] = {}  # transport -> the request id the client got back

    rest = httpx.post(
        gateway.url + "/v1/classify",
        content=image,
        headers={**auth, "content-type": "image/png", "x-request-id": "rest-given-1"},
    )
    assert rest.status_code == 200
    answered["rest"] = rest.headers["x-request-id"]
    assert answered["rest"] == "rest-given-1"  # the client's own id, echoed

    body = {"inputs": [{"name": "images", "shape": [1], "datatype": "BYTES",
                        "data": [base64.b64encode(image).decode()]}]}  # fmt: skip
    kserve = httpx.post(gateway.url + "/v2/models/tiny/infer", json=body, headers=auth)
    assert kserve.status_code == 200
    answered["kserve_http"] = kserve.headers["x-request-id"]  # generated

    request = cpb.ClassifyRequest(images=[image], top_k=1)
    md = (("x-api-key", KEY), ("x-request-id", "grpc-given-2"))
    code, trailers = grpc_call(gateway, "/resnet_serving.v1.Classifier/Classify", request, md)
    assert code == grpc.StatusCode.OK
    answered["classifier_grpc"] = trailers["x-request-id"]
    assert answered["classifier_grpc"] == "grpc-given-2"

    infer = kpb.ModelInferRequest(model_name="tiny")
    infer.inputs.add(name="images", datatype="BYTES", shape=[1])
    infer.raw_input_contents.append(serialize_bytes([image]))
    code, trailers = grpc_call(
        gateway, "/inference.GRPCInferenceService/ModelInfer", infer, (("x-api-key", KEY),)
    )
    assert code == grpc.StatusCode.OK
    answered["kserve_grpc"] = trailers["x-request-id"]

    # Failures have their line too, with the same id the client sees: a wrong key over
    # gRPC, a forged id over REST (not echoed: replaced by one of ours).
    code, trailers = grpc_call(
        gateway, "/resnet_serving.v1.Classifier/Classify", request, (("x-api-key", "wrong"),)
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED
    answered["denied"] = trailers["x-request-id"]
    forged = httpx.post(
        gateway.url + "/v1/classify",
        content=image[: len(image) // 2],  # a truncated PNG
        headers={**auth, "content-type": "image/png", "x-request-id": 'x" level=error'},
    )
    assert forged.status_code == 400
    answered["bad_image"] = forged.headers["x-request-id"]
    assert answered["bad_image"] != 'x" level=error'

    requests = [r for r in lines(gateway) if r.get("logger") == "service.access"]
    by_id = {r["request_id"]: r for r in requests}
    assert len(by_id) == len(requests)  # one line per request
    expected_route = {
        "rest": "/v1/classify",
        "kserve_http": "/v2/models/{model}/infer",
        "classifier_grpc": "resnet_serving.v1.Classifier/Classify",
        "kserve_grpc": "inference.GRPCInferenceService/ModelInfer",
    }
    for transport, route in expected_route.items():
        line = by_id[answered[transport]]
        assert line["route"] == route and line["outcome"] == "ok", line
        assert (line["model"], line["version"], line["images"]) == ("tiny", "1", 1), line
        assert {"preprocess", "queue", "infer"} <= set(line["stages_ms"]), line
        assert line["duration_ms"] > 0 and line["level"] == "INFO"
    assert by_id[answered["denied"]]["outcome"] == "unauthorized"
    assert by_id[answered["denied"]]["status"] == "UNAUTHENTICATED"
    assert by_id[answered["bad_image"]]["outcome"] == "invalid_image"
    assert by_id[answered["bad_image"]]["status"] == "400"

    text = gateway.output()
    assert KEY not in text
    for encoded in (base64.b64encode(image).decode()[:24], image[:16].hex()):
        assert encoded not in text


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_traced_gateway_exports_over_otlp_and_logs_the_trace_id(tiny, tmp_path, protocol):
    """Tracing on through the standard variables only: a real process exports its spans over
    OTLP (gRPC, or HTTP with protobuf: the specification's default) to a receiver
    (`service.tools.otlp_receiver`, the one `make bench` uses), and each request's log line
    and the spans it receives carry the caller's trace id."""
    receiver = OtlpReceiver(protocol)
    env = {
        "RESNET_SERVE_LOG_FORMAT": "json",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    gw = GatewayProcess.start(tmp_path / "gw.log", "--repository", str(tiny.repository), env=env)
    try:
        resp = httpx.post(
            gw.url + "/v1/classify",
            content=image_bytes(),
            headers={
                "content-type": "image/png",
                "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
            },
        )
        assert resp.status_code == 200
        wait_until(lambda: receiver.spans >= 6, 10, "no spans exported")
    finally:
        gw.stop()
        receiver.stop()
    assert trace_id in receiver.trace_ids
    line = next(r for r in lines(gw) if r.get("request_id") == resp.headers["x-request-id"])
    assert line["trace_id"] == trace_id
