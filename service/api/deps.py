"""What HTTP routes get from the runtime (``Depends``), and JSON bodies parsed one way."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from pydantic import BaseModel, ValidationError

from service.auth import key_from_headers
from service.contract import describe_validation_error
from service.dataplane import DataPlane
from service.errors import InvalidRequest, ValidationFailed
from service.runtime import Runtime

M = TypeVar("M", bound=BaseModel)

# Declared for the OpenAPI document (the Authorize button in /docs); never fail by
# themselves: require_api_key decides, with the same rule as gRPC.
_API_KEY = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="One of RESNET_SERVE_API_KEYS."
)
_BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY (same keys).")


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


def data_plane(request: Request) -> DataPlane:
    """The data plane for this call (503 while starting or shutting down)."""
    return runtime(request).admit()


def require_api_key(request: Request) -> None:
    runtime(request).authorize(
        key_from_headers(request.headers.get("authorization"), request.headers.get("x-api-key")),
        "Authorization: Bearer KEY or X-API-Key",
    )


RuntimeDep = Annotated[Runtime, Depends(runtime)]
PlaneDep = Annotated[DataPlane, Depends(data_plane)]
API_KEY = [Security(_API_KEY), Security(_BEARER), Depends(require_api_key)]


def parse_json(model: type[M], body: bytes, what: str) -> M:
    """``body`` as ``model``: 400 if it is not JSON at all, 422 if its fields are wrong
    (the same rule on every HTTP dialect)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise InvalidRequest(f"{what} is not valid JSON") from None
        raise ValidationFailed(f"invalid {what}: {describe_validation_error(exc)}") from None
