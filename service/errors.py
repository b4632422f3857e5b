"""The gateway's error hierarchy, mapped to HTTP and gRPC status in one place.

Every error a caller can cause or observe is one of these. Messages are written for the
caller: they say what was wrong with the request, never an internal name, path or
traceback (5xx messages in particular stay generic).
"""

from __future__ import annotations

from typing import ClassVar


def brief(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type if it has none), at most ``limit``."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


class ServiceError(Exception):
    """Base class: a status, a stable machine-readable code, and a message for the caller."""

    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"  # name of a grpc.StatusCode member
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def envelope(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(ServiceError):
    http_status = 400
    grpc_status = "INVALID_ARGUMENT"
    code = "invalid_request"


class InvalidImage(InvalidRequest):
    code = "invalid_image"


class ValidationFailed(InvalidRequest):
    http_status = 422
    code = "validation_failed"


class Unauthorized(ServiceError):
    http_status = 401
    grpc_status = "UNAUTHENTICATED"
    code = "unauthorized"


class UnsupportedMediaType(ServiceError):
    http_status = 415
    grpc_status = "INVALID_ARGUMENT"
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    http_status = 413
    grpc_status = "INVALID_ARGUMENT"
    code = "payload_too_large"


class ModelNotFound(ServiceError):
    http_status = 404
    grpc_status = "NOT_FOUND"
    code = "model_not_found"


class Overloaded(ServiceError):
    http_status = 503
    grpc_status = "RESOURCE_EXHAUSTED"
    code = "overloaded"


class BackendUnavailable(ServiceError):
    http_status = 503
    grpc_status = "UNAVAILABLE"
    code = "backend_unavailable"


class ShuttingDown(BackendUnavailable):
    code = "shutting_down"


class DeadlineExceeded(ServiceError):
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"
    code = "deadline_exceeded"


class InternalError(ServiceError):
    """Anything unexpected. The message is deliberately generic; details go to the log."""

    def __init__(self, message: str = "internal error; see the gateway log") -> None:
        super().__init__(message)
