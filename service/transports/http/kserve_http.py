"""KServe v2 / Open Inference Protocol over HTTP: the wire format only (JSON, and Triton's
binary tensor data extension). What the requests mean is ``service.transports.openinference``'s,
shared with the gRPC adapter; ``tritonclient.http`` works against these routes unchanged.

Every path with a ``{version}`` also exists without it (that version must be the one
served). Errors come in the protocol's shape, ``{"error": "message", "code": "..."}``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from google.protobuf import json_format

from service.errors import InvalidRequest, NotReady, PayloadTooLarge, UnsupportedMediaType, cut
from service.observability import observe
from service.transports import openinference as oi
from service.transports.http.deps import API_KEY, PlaneDep, RuntimeDep, off_loop, parse_json
from service.transports.http.error_responses import responses
from service.transports.http.schemas import (
    InferRequestJSON,
    ModelMetadata,
    ModelStatisticsList,
    ServerMetadata,
    TensorIn,
)

HEADER_LENGTH = "inference-header-content-length"
# Health answers are the status alone, as the protocol says: no body.
_YES: dict[int | str, dict[str, Any]] = {200: {"description": "Yes", "content": {}}}
_STATUS = {**_YES, **responses(503, kserve=True)}

v2 = APIRouter(prefix="/v2", tags=["KServe v2"])
v2_models = APIRouter(prefix="/v2/models", tags=["KServe v2"], dependencies=API_KEY)


@v2.get("", operation_id="server_metadata", summary="Server metadata")
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(**oi.server_metadata())


@v2.get(
    "/health/live",
    operation_id="server_live",
    summary="Server liveness",
    responses=_YES,
    response_class=Response,
)
async def live() -> Response:
    return Response(status_code=200)


@v2.get(
    "/health/ready",
    operation_id="server_ready",
    summary="Server readiness",
    responses=_STATUS,
    response_class=Response,
)
async def ready(rt: RuntimeDep) -> Response:
    if reason := rt.not_ready_reason():
        raise NotReady(reason)
    return Response(status_code=200)


@v2_models.get(
    "/stats",
    operation_id="all_model_statistics",
    summary="Statistics of every served model (the statistics extension)",
    responses=responses(401, 503, kserve=True),
)
async def all_statistics(plane: PlaneDep) -> ModelStatisticsList:
    return ModelStatisticsList(model_stats=plane.statistics())


_ONE_MODEL = responses(401, 404, 503, kserve=True)


@v2_models.get("/{model}", operation_id="model_metadata", responses=_ONE_MODEL)
@v2_models.get(
    "/{model}/versions/{version}", operation_id="model_version_metadata", responses=_ONE_MODEL
)
async def model_metadata(model: str, plane: PlaneDep, version: str | None = None) -> ModelMetadata:
    """Model metadata: tensors, versions, platform."""
    return ModelMetadata(**oi.model_metadata(plane, plane.spec(model, version)))


@v2_models.get("/{model}/config", operation_id="model_config", responses=_ONE_MODEL)
@v2_models.get(
    "/{model}/versions/{version}/config",
    operation_id="model_version_config",
    responses=_ONE_MODEL,
)
async def model_config(model: str, plane: PlaneDep, version: str | None = None) -> dict[str, Any]:
    """The model configuration extension: config.pbtxt as JSON."""
    config = plane.spec(model, version).config
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


@v2_models.get(
    "/{model}/ready",
    operation_id="model_ready",
    responses={**_ONE_MODEL, **_STATUS},
    response_class=Response,
)
@v2_models.get(
    "/{model}/versions/{version}/ready",
    operation_id="model_version_ready",
    responses={**_ONE_MODEL, **_STATUS},
    response_class=Response,
)
async def model_ready(
    model: str, plane: PlaneDep, rt: RuntimeDep, version: str | None = None
) -> Response:
    """Model readiness (404 for a model or version that is not served)."""
    plane.spec(model, version)
    if reason := rt.not_ready_reason():
        raise NotReady(reason)
    return Response(status_code=200)


@v2_models.get("/{model}/stats", operation_id="model_statistics", responses=_ONE_MODEL)
@v2_models.get(
    "/{model}/versions/{version}/stats",
    operation_id="model_version_statistics",
    responses=_ONE_MODEL,
)
async def model_statistics(
    model: str, plane: PlaneDep, version: str | None = None
) -> ModelStatisticsList:
    """The statistics extension, in Triton's shape: counts and cumulative times."""
    return ModelStatisticsList(model_stats=plane.statistics(model, version))


_INFER: dict[str, Any] = {
    "responses": responses(400, 401, 404, 413, 415, 422, 503, 504, kserve=True),
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferRequestJSON"}},
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "The binary tensor data extension: a JSON header of "
                    "Inference-Header-Content-Length bytes, then the tensors' bytes.",
                },
            },
        }
    },
}
#: Schemas referred to by hand above, added to the document's components (service.transports.http.app).
EXTRA_SCHEMAS = (InferRequestJSON,)


@v2_models.post("/{model}/infer", operation_id="model_infer", **_INFER)
@v2_models.post("/{model}/versions/{version}/infer", operation_id="model_version_infer", **_INFER)
async def infer(
    model: str, request: Request, plane: PlaneDep, version: str | None = None
) -> Response:
    """Inference with the model's own tensors or with encoded images (a BYTES input), in
    JSON or with the binary tensor data extension; the classification extension."""
    arrived = time.perf_counter()
    if request.headers.get("content-encoding", "identity") != "identity":
        raise UnsupportedMediaType("compressed request bodies are not supported")
    with observe.step("read"):
        body = await request.body()
    header, binary = _split_body(request.headers.get(HEADER_LENGTH), body)
    # Counted before parsing: no more JSON values than the largest request of this model.
    most = plane.settings.max_images_per_request * math.prod(plane.spec(model).contract.input_shape)
    if header.count(b",") > most:
        raise PayloadTooLarge(
            f"the JSON request holds more values than {plane.settings.max_images_per_request} "
            "images of this model; send the binary form, or fewer images"
        )
    request_, binary_out = await off_loop(len(header), _request, model, version, header, binary)
    return _response(await oi.infer(plane, request_, arrived), binary_out)


def _request(
    model: str, version: str | None, header: bytes, binary: bytes
) -> tuple[oi.InferRequest, bool]:
    """The protocol's request from the wire (JSON header, binary tensor data), and whether
    outputs go in binary unless an output says otherwise (``binary_data_output``)."""
    req = parse_json(InferRequestJSON, header, "inference request")
    default_binary = bool(req.parameters.get("binary_data_output", False))
    request = oi.InferRequest(
        model=model,
        version=version,
        inputs=_inputs(req.inputs, binary),
        outputs=[
            oi.RequestedOutput(
                o.name,
                o.parameters.get("classification", 0),
                {"binary_data": o.parameters.get("binary_data", default_binary)},
            )
            for o in req.outputs or []
        ],
        id=req.id,
        timeout_s=oi.timeout_from_us(req.parameters.get("timeout")),
    )
    return request, default_binary


def _split_body(header_length: str | None, body: bytes) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request body."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise InvalidRequest(f"{HEADER_LENGTH} must be an integer") from None
    if not 0 < n <= len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
    return body[:n], body[n:]


def _inputs(tensors: list[TensorIn], binary: bytes) -> list[oi.InferInput]:
    inputs, pos = [], 0
    for t in tensors:
        size = t.parameters.get("binary_data_size")
        if size is not None:
            if type(size) is not int or not 0 <= size <= len(binary) - pos:
                raise InvalidRequest(
                    f"input {cut(t.name)}: binary_data_size does not fit the binary data sent"
                )
            inputs.append(oi.raw_input(t.name, t.datatype, t.shape, binary[pos : pos + size]))
            pos += size
        elif t.data is None:
            raise InvalidRequest(f"input {cut(t.name)} has no data")
        elif t.datatype == "BYTES":
            try:
                images = [base64.b64decode(str(v), validate=True) for v in t.data]
            except (binascii.Error, ValueError):
                raise InvalidRequest(
                    "BYTES input in JSON must hold base64-encoded image files"
                ) from None
            inputs.append(oi.InferInput(t.name, t.datatype, t.shape, images))
        else:
            inputs.append(oi.number_input(t.name, t.datatype, t.shape, t.data))
    if pos != len(binary):
        raise InvalidRequest("binary data sent beyond what the inputs' binary_data_size declare")
    return inputs


def _response(result: oi.InferResponse, default_binary: bool) -> Response:
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in result.outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": out.shape}
        if out.parameters.get("binary_data", default_binary):
            blob = out.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = out.values()
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": result.model_name,
        "model_version": result.model_version,
        "outputs": outputs,
    }
    if result.id is not None:
        body["id"] = result.id
    head = json.dumps(body).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
