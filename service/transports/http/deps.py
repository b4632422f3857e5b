"""What HTTP routes get from the runtime (``Depends``), and JSON bodies parsed one way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers

from service.dataplane.plane import DataPlane
from service.errors import InvalidRequest, ValidationFailed
from service.model.contract import describe_validation_error
from service.runtime.auth import key_from_headers
from service.runtime.core import Runtime
from service.runtime.lifecycle import Lifecycle

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# Declared for the OpenAPI document (the Authorize button in /docs); never fail by
# themselves: require_api_key decides, with the same rule as gRPC.
_API_KEY = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="One of RESNET_SERVE_API_KEYS."
)
_BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (same keys).")


def _runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


# Dependencies are `async def`: FastAPI runs a plain `def` on a thread pool, a thread hop
# per request (measured: a third of what a refused request cost).
async def runtime(request: Request) -> Runtime:
    return _runtime(request)


async def data_plane(request: Request) -> DataPlane:
    """The data plane for this call (503 while starting or shutting down)."""
    return _runtime(request).admit()


def check_api_key(runtime: Runtime, headers: Headers) -> None:
    """Unauthorized unless the request's headers carry a key the gateway takes."""
    runtime.authorize(
        key_from_headers(headers.get("authorization"), headers.get("x-api-key")),
        "Authorization: Bearer KEY or X-API-Key",
    )


async def require_api_key(request: Request) -> None:
    check_api_key(_runtime(request), request.headers)


async def admin(request: Request) -> Lifecycle:
    """The model lifecycle, for a caller with an admin key (403 while the admin API is off)."""
    rt = _runtime(request)
    rt.authorize_admin(
        key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key")),
        "Authorization: Bearer ADMIN_KEY or X-API-Key: ADMIN_KEY",
    )
    return rt.manage()


RuntimeDep = Annotated[Runtime, Depends(runtime)]
AdminDep = Annotated[Lifecycle, Depends(admin)]
PlaneDep = Annotated[DataPlane, Depends(data_plane)]
API_KEY = [Security(_API_KEY), Security(_BEARER), Depends(require_api_key)]


#: Bodies larger than this are parsed on a worker thread (the event loop keeps serving;
#: the parser's Python-level work yields the GIL), smaller ones in place (a thread hop
#: costs more than they do).
OFF_LOOP_BYTES = 64 * 1024


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, on a worker thread when ``size`` (bytes of input) is large."""
    if size <= OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


def parse_json(model: type[M], body: bytes, what: str) -> M:
    """``body`` as ``model``: 400 if it is not JSON at all, 422 if its fields are wrong
    (the same rule on every HTTP dialect)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise InvalidRequest(f"{what} is not valid JSON") from None
        raise ValidationFailed(f"invalid {what}: {describe_validation_error(exc)}") from None
