"""KServe v2 / Open Inference Protocol on the gateway, so Triton's own tools work against it.

``tritonclient.http`` (and perf_analyzer, KServe) pointed at the gateway works unchanged:
server and model metadata, readiness, model config, and ``/infer`` with the model's own
tensors, in JSON or with the binary tensor data extension, with the classification
extension (``class_count``: ``"value:index:label"`` strings, like Triton). Tensors go
through the same batcher and backend as every other request.

Extension of our own: an input of datatype ``BYTES`` (any name; ``images`` by convention)
holds encoded image files, which the gateway decodes and preprocesses by the model's
contract first (in the JSON form, each element is the file base64-encoded).

Errors use the protocol's shape, ``{"error": "message"}`` (plus our ``code``), with the same
statuses as the rest of the API.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

from service import __version__
from service.api.routes import classifier, not_ready_reason, require_api_key
from service.classifier import Classifier
from service.contract import describe_validation_error
from service.errors import (
    InvalidRequest,
    ModelNotFound,
    ServiceError,
    UnsupportedMediaType,
    ValidationFailed,
)
from service.model_store import ModelSpec

HEADER_LENGTH = "inference-header-content-length"


def kserve_error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


class KServeRoute(APIRoute):
    """Errors in the protocol's own shape for every /v2 route (dependencies included)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                request.app.state.metrics.rejected(exc.code, exc.http_status)
                resp = kserve_error(exc.http_status, exc.message, exc.code)
                if exc.retry_after is not None:
                    resp.headers["Retry-After"] = str(int(exc.retry_after))
                return resp
            except RequestValidationError as exc:
                request.app.state.metrics.rejected("validation_failed", 422)
                msg = "; ".join(str(e.get("msg", "invalid")) for e in exc.errors())
                return kserve_error(422, msg or "invalid request", "validation_failed")

        return wrapped


class TensorIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class TensorOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[TensorOut] | None = None


ClassifierDep = Annotated[Classifier, Depends(classifier)]
v2 = APIRouter(prefix="/v2", route_class=KServeRoute, tags=["KServe v2"])
v2_models = APIRouter(
    prefix="/v2/models",
    route_class=KServeRoute,
    tags=["KServe v2"],
    dependencies=[Depends(require_api_key)],
)


def _ready(request: Request) -> bool:
    return not_ready_reason(request.app.state) is None


def _spec(clf: Classifier, model: str, version: str | None) -> ModelSpec:
    spec = clf.spec(model)
    if version not in (None, "", spec.version):
        raise ModelNotFound(
            f"model {model!r} version {version} is not served (serving {spec.version})"
        )
    return spec


@v2.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    return {
        "name": "resnet-serving",
        "version": __version__,
        "extensions": ["classification", "binary_tensor_data", "model_configuration"],
    }


@v2.get("/health/live", summary="Server liveness")
async def live() -> Response:
    return Response(status_code=200)


@v2.get("/health/ready", summary="Server readiness")
async def ready(request: Request) -> Response:
    return Response(status_code=200 if _ready(request) else 503)


def _metadata(spec: ModelSpec) -> dict[str, Any]:
    c = spec.contract
    return {
        "name": spec.name,
        "versions": [spec.version],
        "platform": spec.platform,
        "inputs": [{"name": c.input_name, "datatype": "FP32", "shape": [-1, *c.input_shape]}],
        "outputs": [{"name": c.output_name, "datatype": "FP32", "shape": [-1, c.num_classes]}],
    }


@v2_models.get("/{model}", summary="Model metadata")
async def model_metadata(model: str, clf: ClassifierDep) -> dict[str, Any]:
    return _metadata(_spec(clf, model, None))


@v2_models.get("/{model}/versions/{version}", summary="Model metadata (one version)")
async def model_version_metadata(model: str, version: str, clf: ClassifierDep) -> dict[str, Any]:
    return _metadata(_spec(clf, model, version))


@v2_models.get("/{model}/config", summary="Model configuration (config.pbtxt as JSON)")
async def model_config(model: str, clf: ClassifierDep) -> dict[str, Any]:
    return _spec(clf, model, None).config


@v2_models.get("/{model}/ready", summary="Model readiness")
async def model_ready(model: str, request: Request, clf: ClassifierDep) -> Response:
    _spec(clf, model, None)
    return Response(status_code=200 if _ready(request) else 503)


@v2_models.get("/{model}/versions/{version}/ready", summary="Model readiness (one version)")
async def model_version_ready(
    model: str, version: str, request: Request, clf: ClassifierDep
) -> Response:
    _spec(clf, model, version)
    return Response(status_code=200 if _ready(request) else 503)


def _split_body(request: Request, body: bytes) -> tuple[bytes, bytes]:
    if request.headers.get("content-encoding", "identity") != "identity":
        raise UnsupportedMediaType("compressed request bodies are not supported")
    raw = request.headers.get(HEADER_LENGTH)
    if raw is None:
        return body, b""
    try:
        n = int(raw)
    except ValueError:
        raise InvalidRequest(f"{HEADER_LENGTH} must be an integer") from None
    if not 0 < n <= len(body):
        raise InvalidRequest(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes")
    return body[:n], body[n:]


def _parse(header: bytes) -> InferRequest:
    try:
        return InferRequest.model_validate_json(header)
    except ValidationError as exc:
        raise InvalidRequest(
            f"invalid inference request: {describe_validation_error(exc)}"
        ) from exc


def _bytes_elements(blob: bytes) -> list[bytes]:
    """Triton's BYTES serialization: each element a little-endian uint32 length + bytes."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise InvalidRequest("malformed BYTES tensor data")
        (size,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if pos + size > len(blob):
            raise InvalidRequest("malformed BYTES tensor data")
        out.append(blob[pos : pos + size])
        pos += size
    return out


def _serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


async def _input_tensors(
    clf: Classifier, spec: ModelSpec, tensor: TensorIn, binary: bytes | None
) -> list[np.ndarray]:
    c = spec.contract
    if tensor.datatype == "BYTES":
        if binary is not None:
            images = _bytes_elements(binary)
        else:
            try:
                images = [base64.b64decode(str(v), validate=True) for v in tensor.data or []]
            except (binascii.Error, ValueError):
                raise InvalidRequest(
                    "BYTES input in JSON must hold base64-encoded image files"
                ) from None
        n = len(images)
        if tensor.shape not in ([n], [n, 1]):
            raise InvalidRequest(
                f"BYTES input shape {tensor.shape} does not match its {n} elements"
            )
        clf.check_count(n)
        return await clf.preprocess_images(spec, images)
    if tensor.name != c.input_name:
        raise InvalidRequest(
            f"unexpected input {tensor.name!r}: model {spec.name!r} takes {c.input_name!r} "
            "(FP32) or a BYTES input of encoded images"
        )
    if tensor.datatype != "FP32":
        raise InvalidRequest(f"input {tensor.name!r} must be FP32, got {tensor.datatype}")
    if len(tensor.shape) != 4 or tuple(tensor.shape[1:]) != c.input_shape or tensor.shape[0] < 1:
        raise InvalidRequest(
            f"input {tensor.name!r} has shape {tensor.shape}; expected [n, "
            f"{', '.join(map(str, c.input_shape))}]"
        )
    clf.check_count(tensor.shape[0])
    count = int(np.prod(tensor.shape))
    if binary is not None:
        if len(binary) != count * 4:
            raise InvalidRequest(
                f"input {tensor.name!r}: {len(binary)} bytes of data for shape {tensor.shape}"
            )
        arr = np.frombuffer(binary, dtype="<f4").reshape(tensor.shape)
    else:
        try:
            arr = np.asarray(tensor.data, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidRequest(f"input {tensor.name!r}: data must be numbers") from None
        if arr.size != count:
            raise InvalidRequest(
                f"input {tensor.name!r}: {arr.size} values for shape {tensor.shape}"
            )
        arr = arr.reshape(tensor.shape)
    if not np.isfinite(arr).all():
        raise InvalidRequest(f"input {tensor.name!r} holds NaN or infinite values")
    return list(np.ascontiguousarray(arr, dtype=np.float32))


async def _infer(request: Request, clf: Classifier, spec: ModelSpec) -> Response:
    header, binary = _split_body(request, await request.body())
    req = _parse(header)
    if len(req.inputs) != 1:
        raise InvalidRequest(f"model {spec.name!r} takes exactly one input, got {len(req.inputs)}")
    tensor = req.inputs[0]
    size = tensor.parameters.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise InvalidRequest("binary_data_size does not match the binary data sent")
        data: bytes | None = binary
    else:
        if binary:
            raise InvalidRequest("binary data sent, but no input declares binary_data_size")
        if tensor.data is None:
            raise InvalidRequest(f"input {tensor.name!r} has no data")
        data = None
    timeout_us = req.parameters.get("timeout")
    timeout_s = timeout_us / 1e6 if isinstance(timeout_us, int | float) and timeout_us > 0 else None
    deadline = clf.deadline(timeout_s)

    tensors = await _input_tensors(clf, spec, tensor, data)
    logits = await clf.logits(spec, tensors, deadline)

    c = spec.contract
    default_binary = bool(req.parameters.get("binary_data_output", False))
    wanted = req.outputs or [TensorOut(name=c.output_name)]
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in wanted:
        if out.name != c.output_name:
            raise InvalidRequest(
                f"unknown output {out.name!r}; model {spec.name!r} has {c.output_name!r}"
            )
        binary_out = bool(out.parameters.get("binary_data", default_binary))
        k = out.parameters.get("classification", 0)
        if not isinstance(k, int) or k < 0:
            raise ValidationFailed("classification must be a non-negative integer")
        if k:
            k = min(k, c.num_classes)
            idx = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            vals = np.take_along_axis(logits, idx, axis=1)
            strings = [
                f"{v:f}:{i}:{spec.labels[i]}".encode()
                for row_v, row_i in zip(vals, idx, strict=True)
                for v, i in zip(row_v, row_i, strict=True)
            ]
            entry: dict[str, Any] = {
                "name": out.name,
                "datatype": "BYTES",
                "shape": [len(logits), k],
            }
            if binary_out:
                blob = _serialize_bytes(strings)
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = [s.decode() for s in strings]
        else:
            arr = np.ascontiguousarray(logits, dtype="<f4")
            entry = {"name": out.name, "datatype": "FP32", "shape": list(arr.shape)}
            if binary_out:
                entry["parameters"] = {"binary_data_size": arr.nbytes}
                blobs.append(arr.tobytes())
            else:
                entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": spec.name,
        "model_version": spec.version,
        "outputs": outputs,
    }
    if req.id is not None:
        body["id"] = req.id
    head = json.dumps(body).encode()
    if not blobs:
        return Response(head, media_type="application/json")
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(head))},
    )


@v2_models.post("/{model}/infer", summary="Inference with the model's own tensors")
async def infer(model: str, request: Request, clf: ClassifierDep) -> Response:
    return await _infer(request, clf, _spec(clf, model, None))


@v2_models.post("/{model}/versions/{version}/infer", summary="Inference (one version)")
async def infer_version(model: str, version: str, request: Request, clf: ClassifierDep) -> Response:
    return await _infer(request, clf, _spec(clf, model, version))
