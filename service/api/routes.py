"""REST routes. HTTP only: parsing bodies and shaping responses; the work is the Classifier's."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import JSONResponse, PlainTextResponse

from service.api.schemas import (
    ClassifyJSON,
    ClassifyResponse,
    ErrorEnvelope,
    ModelDetail,
    ModelList,
)
from service.auth import check_key, key_from_headers
from service.classifier import Classification, Classifier
from service.contract import describe_validation_error
from service.errors import (
    InvalidImage,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from service.model_store import ModelSpec

IMAGE_TYPES = ("image/", "application/octet-stream")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorEnvelope, "description": text}
    for code, text in {
        400: "Invalid request or undecodable image",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body, image or image count over the limit",
        415: "Not an image format the gateway decodes",
        422: "Invalid parameter (top_k, JSON body)",
        503: "Queue full (Retry-After) or backend unavailable",
        504: "Request deadline exceeded",
    }.items()
}

_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": ClassifyJSON.model_json_schema()},
        },
    }
}


def classifier(request: Request) -> Classifier:
    clf: Classifier = request.app.state.classifier
    return clf


def require_api_key(
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
    x_api_key: Annotated[str | None, Header()] = None,
) -> None:
    """REST side of the API-key check (service.auth)."""
    check_key(
        key_from_headers(authorization, x_api_key),
        request.app.state.api_key_hashes,
        "Authorization: Bearer KEY or X-API-Key",
    )


ClassifierDep = Annotated[Classifier, Depends(classifier)]
TopK = Annotated[int | None, Query(description="Classes per image, 1..num_classes (default 5).")]
Timeout = Annotated[
    float | None,
    Header(
        alias="x-request-timeout",
        description="Seconds this request may take (capped by the server's own deadline).",
    ),
]

api = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)
ops = APIRouter()


async def read_images(request: Request, max_images: int) -> tuple[list[bytes], int | None]:
    """The images of a classify request (multipart, raw image body, or JSON base64)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=max_images, max_fields=max_images + 16)
        except (MultiPartException, StarletteHTTPException) as exc:
            detail = str(getattr(exc, "message", None) or getattr(exc, "detail", ""))
            if "Too many files" in detail:
                raise PayloadTooLarge(
                    f"more than {max_images} images in one request; the limit is {max_images}"
                ) from exc
            raise InvalidRequest(f"malformed multipart body: {detail}") from exc
        try:
            parts = form.getlist("file")
            if not parts:
                raise InvalidRequest("multipart body has no 'file' part")
            images = []
            for part in parts:
                if not isinstance(part, UploadFile):
                    raise InvalidRequest("the 'file' parts must be files, not text fields")
                images.append(await part.read())
        finally:
            await form.close()
        return images, None
    if ctype.startswith(IMAGE_TYPES):
        body = await request.body()
        if not body:
            raise InvalidRequest("empty request body; send an image")
        return [body], None
    if ctype == "application/json":
        body = await request.body()
        try:
            parsed = ClassifyJSON.model_validate_json(body)
        except ValidationError as exc:
            raise ValidationFailed(f"invalid JSON body: {describe_validation_error(exc)}") from exc
        if len(parsed.images) > max_images:
            raise PayloadTooLarge(
                f"{len(parsed.images)} images in one request; the limit is {max_images}"
            )
        images = []
        for n, item in enumerate(parsed.images, 1):
            try:
                images.append(base64.b64decode(item.b64, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise InvalidImage(f"image {n}: not valid base64") from exc
        return images, parsed.top_k
    if not ctype:
        raise InvalidRequest("missing Content-Type; send multipart/form-data, an image, or JSON")
    raise UnsupportedMediaType(
        f"unsupported Content-Type {ctype!r}; send multipart/form-data (file parts), "
        "image/* or application/octet-stream, or application/json"
    )


def _response(result: Classification) -> dict[str, Any]:
    return {
        "model": result.model,
        "version": result.version,
        "predictions": [
            [{"index": p.index, "label": p.label, "score": p.score} for p in row]
            for row in result.predictions
        ],
    }


async def _classify(
    request: Request, clf: Classifier, model: str | None, top_k: int | None, timeout: float | None
) -> JSONResponse:
    spec = clf.spec(model)  # 404 before reading the body
    if top_k is not None:
        clf.resolve_top_k(spec, top_k)
    if timeout is not None and timeout <= 0:
        raise ValidationFailed("X-Request-Timeout must be a positive number of seconds")
    images, body_top_k = await read_images(request, clf.settings.max_images_per_request)
    result = await clf.classify(
        spec.name, images, top_k if top_k is not None else body_top_k, timeout
    )
    return JSONResponse(_response(result))


@api.post(
    "/models/{model}/classify",
    response_model=ClassifyResponse,
    openapi_extra=_CLASSIFY_BODY,
    summary="Classify images with a named model",
)
async def classify_model(
    model: str, request: Request, clf: ClassifierDep, top_k: TopK = None, timeout: Timeout = None
) -> JSONResponse:
    """Send images as multipart `file` parts, a raw `image/*` body, or JSON
    `{"images": [{"b64": ...}], "top_k": 5}`. One prediction list per image, in order."""
    return await _classify(request, clf, model, top_k, timeout)


@api.post(
    "/classify",
    response_model=ClassifyResponse,
    openapi_extra=_CLASSIFY_BODY,
    summary="Classify images with the default model",
)
async def classify_default(
    request: Request, clf: ClassifierDep, top_k: TopK = None, timeout: Timeout = None
) -> JSONResponse:
    """As `/v1/models/{model}/classify`, with the default model."""
    return await _classify(request, clf, None, top_k, timeout)


def _summary(clf: Classifier, spec: ModelSpec) -> dict[str, Any]:
    c = spec.contract
    return {
        "name": spec.name,
        "version": spec.version,
        "arch": c.arch,
        "num_classes": c.num_classes,
        "labels_count": len(spec.labels),
        "max_batch_size": clf.batchers[spec.name].max_batch,
        "precision": spec.precision,
        "backend": clf.backend.name,
        "default": spec.name == clf.default_model,
    }


@api.get("/models", response_model=ModelList, summary="List served models")
async def list_models(clf: ClassifierDep) -> dict[str, Any]:
    return {"models": [_summary(clf, s) for s in clf.specs.values()]}


@api.get("/models/{model}", response_model=ModelDetail, summary="One model and its contract")
async def get_model(model: str, clf: ClassifierDep) -> dict[str, Any]:
    spec = clf.spec(model)
    return {**_summary(clf, spec), "contract": spec.contract}


@ops.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def not_ready_reason(state: Any) -> str | None:
    """Why the gateway is not ready (None when it is): the one definition of readiness,
    used by /readyz, /metrics, KServe's ready routes and gRPC health."""
    if getattr(state, "draining", False):
        return "draining"
    clf = getattr(state, "classifier", None)
    if clf is None:
        return "starting"
    if not clf.backend.is_ready():
        return "backend not ready"
    return None


@ops.get("/readyz", summary="Readiness: models loaded and warm, backend ready, not draining")
async def readyz(request: Request) -> JSONResponse:
    reason = not_ready_reason(request.app.state)
    if reason:
        return JSONResponse({"error": {"code": "not_ready", "message": reason}}, status_code=503)
    return JSONResponse({"status": "ready"})


@ops.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    m = request.app.state.metrics
    m.ready.set(0 if not_ready_reason(request.app.state) else 1)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
