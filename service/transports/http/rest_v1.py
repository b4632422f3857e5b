"""REST ``/v1``: HTTP only. Reads the request's images, calls the data plane, shapes JSON.

The classify routes are declared here for FastAPI (the OpenAPI document, and every request
the direct path below leaves to them); :class:`DirectClassify` serves their common case."""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, Query, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from service.dataplane.plane import MIN_TIMEOUT_S, Classification, DataPlane
from service.errors import (
    InvalidImage,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from service.observability import observe
from service.runtime.core import Runtime
from service.transports.http.deps import (
    API_KEY,
    AdminDep,
    PlaneDep,
    RuntimeDep,
    check_api_key,
    off_loop,
    parse_json,
)
from service.transports.http.error_responses import HANDLED, handle, responses
from service.transports.http.middleware import MATCHED, Matched
from service.transports.http.schemas import (
    ClassifyJSON,
    ClassifyResponse,
    ImageB64,
    ModelDetail,
    ModelList,
    ReloadReport,
    ShadowReport,
    VersionState,
)

IMAGE_TYPES = ("image/", "application/octet-stream")

_CLASSIFY_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "minItems": 1,
                        }
                    },
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/ClassifyJSON"}},
        },
    }
}
#: Schemas referred to by hand above, added to the document's components (service.transports.http.app).
EXTRA_SCHEMAS = (ClassifyJSON, ImageB64)

TopK = Annotated[
    int | None, Query(ge=1, description="Classes per image, 1..num_classes (default 5).")
]
Timeout = Annotated[
    float | None,
    Header(
        alias="x-request-timeout",
        ge=MIN_TIMEOUT_S,
        allow_inf_nan=False,
        description="Seconds this request may take (can only shorten the server's deadline).",
    ),
]

api = APIRouter(prefix="/v1", dependencies=API_KEY, tags=["classification"])
_CLASSIFY: dict[str, Any] = {
    "response_model": ClassifyResponse,
    "openapi_extra": _CLASSIFY_BODY,
    "responses": responses(400, 401, 404, 413, 415, 422, 503, 504),
}


async def read_images(request: Request, max_images: int) -> tuple[list[bytes], int | None]:
    """The images of a classify request (multipart, raw image body, or JSON base64), and
    the JSON body's ``top_k`` if it has one."""
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
            if not all(isinstance(p, UploadFile) for p in parts):
                raise InvalidRequest("the 'file' parts must be files, not text fields")
            return [await p.read() for p in parts if isinstance(p, UploadFile)], None
        finally:
            await form.close()
    if ctype.startswith(IMAGE_TYPES):
        body = await request.body()
        if not body:
            raise InvalidRequest("empty request body; send an image")
        return [body], None
    if ctype == "application/json":
        body = await request.body()
        # Counted before parsing: a flood of entries is refused without building it.
        if (count := body.count(b'"b64"')) > max_images:
            raise PayloadTooLarge(f"{count} images in one request; the limit is {max_images}")
        return await off_loop(len(body), _json_images, body)
    if not ctype:
        raise InvalidRequest("missing Content-Type; send multipart/form-data, an image, or JSON")
    raise UnsupportedMediaType(
        f"unsupported Content-Type {ctype[:100]!r}; send multipart/form-data (file parts), "
        "image/* or application/octet-stream, or application/json"
    )


def _json_images(body: bytes) -> tuple[list[bytes], int | None]:
    parsed = parse_json(ClassifyJSON, body, "JSON body")
    images = []
    for n, item in enumerate(parsed.images, 1):
        try:
            images.append(base64.b64decode(item.b64, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise InvalidImage(f"image {n}: not valid base64") from exc
    return images, parsed.top_k


def _body(result: Classification) -> dict[str, Any]:
    return {
        "model": result.model,
        "version": result.version,
        "predictions": [
            [{"index": p.index, "label": p.label, "score": p.score} for p in row]
            for row in result.predictions
        ],
    }


def _response(result: Classification, labels_json: tuple[str, ...]) -> Response:
    """The JSON of :func:`_body`, byte for byte as JSONResponse renders it, written out
    from the class names encoded once (``ModelSpec.labels_json``): json.dumps of the whole
    answer costs more than the rest of shaping it. A score that is not finite goes to
    JSONResponse, which refuses it as before."""
    rows = []
    for row in result.predictions:
        if not all(math.isfinite(p.score) for p in row):
            return JSONResponse(_body(result))
        rows.append(
            ",".join(
                f'{{"index":{p.index},"label":{labels_json[p.index]},"score":{p.score!r}}}'
                for p in row
            )
        )
    model = json.dumps(result.model, ensure_ascii=False)
    version = json.dumps(result.version, ensure_ascii=False)
    predictions = "],[".join(rows)
    text = f'{{"model":{model},"version":{version},"predictions":[[{predictions}]]}}'
    return Response(text.encode(), media_type="application/json")


async def _classify(
    request: Request,
    plane: DataPlane,
    model: str | None,
    top_k: int | None,
    timeout: float | None,
    version: str | None = None,
) -> Response:
    # 404/422 before the body
    plan = plane.plan(model, version=version, top_k=top_k, timeout_s=timeout)
    with observe.step("read"):
        images, body_top_k = await read_images(request, plane.settings.max_images_per_request)
    if top_k is None and body_top_k is not None:
        plan = plane.with_top_k(plan, body_top_k)
    # Built directly (response_model documents it): validating our own output costs time.
    return _response(await plane.classify(plan, images), plan.spec.labels_json)


@api.post(
    "/models/{model}/classify",
    operation_id="classify",
    summary="Classify images with a named model",
    **_CLASSIFY,
)
async def classify(
    model: str, request: Request, plane: PlaneDep, top_k: TopK = None, timeout: Timeout = None
) -> Response:
    """Send images as multipart `file` parts, a raw `image/*` body, or JSON
    `{"images": [{"b64": ...}], "top_k": 5}`. One prediction list per image, in order;
    the query's `top_k` wins over the body's."""
    return await _classify(request, plane, model, top_k, timeout)


@api.post(
    "/models/{model}/versions/{version}/classify",
    operation_id="classify_version",
    summary="Classify images with one version of a model",
    **_CLASSIFY,
)
async def classify_version(
    model: str,
    version: str,
    request: Request,
    plane: PlaneDep,
    top_k: TopK = None,
    timeout: Timeout = None,
) -> Response:
    """As `/v1/models/{model}/classify`, answered by `version` (one of the served versions,
    whatever the canary weights say; never copied to a shadow)."""
    return await _classify(request, plane, model, top_k, timeout, version)


@api.post(
    "/classify",
    operation_id="classify_default",
    summary="Classify images with the default model",
    **_CLASSIFY,
)
async def classify_default(
    request: Request, plane: PlaneDep, top_k: TopK = None, timeout: Timeout = None
) -> Response:
    """As `/v1/models/{model}/classify`, with the default model."""
    return await _classify(request, plane, None, top_k, timeout)


#: Operation ids of the routes :class:`DirectClassify` serves.
DIRECT = ("classify", "classify_version", "classify_default")
# The top_k spelling the direct path takes; any other (signs, spaces, repeats, a value out
# of range) goes to the route, whose validation words the 422. The timeout header's is
# middleware.Matched's.
_TOP_K = re.compile(r"[1-9][0-9]{0,5}")


class DirectClassify:
    """Pure ASGI middleware (the innermost: Observe, Admission and BodyLimit have run): a
    classify request with plain parameters goes from here straight to :func:`_classify`,
    skipping FastAPI's routing, dependency solving and exception middleware (0.2-0.5 ms
    of CPU per request measured, 10-20 % of a small image's cost). Each step the route's
    dependencies take is taken here, in their order and by the same function: the API key
    (``check_api_key``), admission (``Runtime.admit``), the errors
    (``service.transports.http.error_responses.handle``). The route, its path parameters and the timeout header
    are Admission's (``Matched``). A request this path is not sure of (an unusual
    parameter, any method but POST) goes on to the route."""

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute], runtime: Runtime) -> None:
        self.app = app
        self.routes = routes
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found: Matched | None = scope.get(MATCHED)
        if found is not None and any(found.route is route for route in self.routes):
            plain, top_k = _plain_params(scope, found)
            if plain:
                scope["route"] = found.route  # labels the metrics as routing would
                await self._serve(scope, receive, send, found, top_k)
                return
        await self.app(scope, receive, send)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, found: Matched, top_k: int | None
    ) -> None:
        request = Request(scope, receive)
        try:
            check_api_key(self.runtime, request.headers)
            plane = self.runtime.admit()
            response = await _classify(
                request, plane, found.model, top_k, found.timeout, found.version
            )
        except HANDLED as exc:
            response = await handle(request, exc)
        await response(scope, receive, send)


def _plain_params(scope: Scope, found: Matched) -> tuple[bool, int | None]:
    """(plain, top_k): plain when the timeout header is (``Matched.plain_timeout``) and
    ``top_k`` (query) is absent or spelled plainly; otherwise the route validates them."""
    if not found.plain_timeout:
        return False, None
    if not (query := scope["query_string"]):
        return True, None
    # As Starlette reads it (a str: bytes would fail on a percent-escaped non-ASCII).
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    values = [v for k, v in pairs if k == "top_k"]
    if len(values) > 1 or (values and not _TOP_K.fullmatch(values[0])):
        return False, None
    return True, int(values[0]) if values else None


@api.get(
    "/models",
    operation_id="list_models",
    response_model=ModelList,
    summary="List served models",
    responses=responses(401, 503),
)
async def list_models(plane: PlaneDep) -> ModelList:
    return ModelList(models=plane.summaries())


@api.get(
    "/models/{model}",
    operation_id="get_model",
    response_model=ModelDetail,
    summary="One model and its preprocessing contract",
    responses=responses(401, 404, 503),
)
async def get_model(model: str, plane: PlaneDep, rt: RuntimeDep) -> ModelDetail:
    """The newest served version's summary and contract, every version's state and traffic
    share, and what the newest reload did."""
    spec = plane.spec(model)
    summary = plane.summary(spec)
    lifecycle = rt.manage()
    return ModelDetail(
        **summary.model_dump(),
        contract=spec.contract,
        batch_cost_ms=plane.batch_costs_ms(spec),
        version_states=[VersionState(**s) for s in lifecycle.states(spec.name)],
        last_reload=ReloadReport(**lifecycle.reloads[spec.name].as_dict()),
    )


@api.get(
    "/models/{model}/shadow",
    operation_id="get_shadow",
    response_model=ShadowReport,
    summary="How a shadow version's answers compare with the primary's",
    responses=responses(401, 404, 503),
)
async def get_shadow(model: str, plane: PlaneDep, rt: RuntimeDep) -> ShadowReport:
    """Top-1 agreement, top-5 overlap and score drift between each primary version and the
    shadow version that got a copy of its unpinned requests (rollout.json's `shadow`)."""
    assert rt.shadows is not None  # attached with the data plane, which admitted the call
    return ShadowReport(**rt.shadows.report(model, plane.routing(model)))


admin = APIRouter(prefix="/v1", tags=["admin"])


@admin.post(
    "/models/{model}/reload",
    operation_id="reload_model",
    response_model=ReloadReport,
    summary="Serve what the model repository now holds for a model",
    responses=responses(401, 403, 404, 409, 503),
)
async def reload_model(model: str, lifecycle: AdminDep) -> ReloadReport:
    """New versions are loaded, warmed and probed beside those serving, then traffic
    switches at once; versions no longer asked for finish their requests and are released.
    409 if a version cannot be served (the versions serving go on serving; the body says
    why, and so does `GET /v1/models/{model}`). Needs an admin key (RESNET_SERVE_ADMIN_KEYS)."""
    result = (await lifecycle.reload(model)).check()
    return ReloadReport(**result.as_dict())
