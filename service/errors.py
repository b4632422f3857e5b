"""The gateway's error hierarchy: every error a caller can cause or observe is one of these.

Each class carries its HTTP status, its gRPC status and a stable machine-readable
``code``; the transports map them in one place per dialect (``service.transports.http.error_responses`` for
both HTTP dialects, ``service.transports.grpc.grpc_server`` for gRPC), which is also where Retry-After is
set and rejections are counted. Messages are written for the caller: they say what was
wrong with the request, never an internal name, path or traceback (5xx messages stay
generic; :func:`as_service_error` logs the details instead).
"""

from __future__ import annotations

import logging
import math
import re
from typing import ClassVar

log = logging.getLogger(__name__)


# Where a native library (ONNX Runtime, Triton) raised, as its messages say it: the source
# file and line, then the C++ function's signature. Of no use to the reader, and long
# enough to push the reason that follows past any length limit.
_NATIVE_FRAME = re.compile(r"[\w./-]+\.(?:cc|cpp|h):\d+ (?:[\w:~<>]+\([^()]*\)(?: const)? )?")


def brief(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type if it has none), at most ``limit``,
    without native source locations and signatures."""
    text = _NATIVE_FRAME.sub("", str(exc)).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]


def cut(value: str, limit: int = 64) -> str:
    """A caller's value (a model name...) as it may be echoed in a message: repr'd, short."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} chars)"


class ServiceError(Exception):
    """Base class: a status, a stable machine-readable code, and a message for the caller."""

    http_status: ClassVar[int] = 500
    grpc_status: ClassVar[str] = "INTERNAL"  # name of a grpc.StatusCode member
    code: ClassVar[str] = "internal"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after

    def retry_after_header(self) -> str | None:
        """Retry-After in whole seconds (at least 1), or None if the caller should not retry."""
        return None if self.retry_after is None else str(max(1, math.ceil(self.retry_after)))


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


class Forbidden(ServiceError):
    """A call this gateway does not allow (the admin API while it is off)."""

    http_status = 403
    grpc_status = "PERMISSION_DENIED"
    code = "forbidden"


class LoadFailed(ServiceError):
    """A reload could not serve a version the repository asks for (the versions serving
    go on serving): the repository holds something that cannot be served."""

    http_status = 409
    grpc_status = "FAILED_PRECONDITION"
    code = "load_failed"


class UnsupportedMediaType(ServiceError):
    http_status = 415
    grpc_status = "INVALID_ARGUMENT"
    code = "unsupported_media_type"


class PayloadTooLarge(ServiceError):
    http_status = 413
    grpc_status = "INVALID_ARGUMENT"
    code = "payload_too_large"


class RequestTimeout(ServiceError):
    """The client took too long to send its request (headers or body)."""

    http_status = 408
    grpc_status = "DEADLINE_EXCEEDED"
    code = "request_timeout"


class HeaderTooLarge(ServiceError):
    http_status = 431
    grpc_status = "RESOURCE_EXHAUSTED"
    code = "header_too_large"


class ModelNotFound(ServiceError):
    http_status = 404
    grpc_status = "NOT_FOUND"
    code = "model_not_found"


class NotFound(ServiceError):
    """No such route."""

    http_status = 404
    grpc_status = "UNIMPLEMENTED"
    code = "not_found"


class MethodNotAllowed(ServiceError):
    http_status = 405
    grpc_status = "UNIMPLEMENTED"
    code = "method_not_allowed"


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


class NotReady(BackendUnavailable):
    """Readiness probes while starting, draining, or with the backend down."""

    code = "not_ready"


class DeadlineExceeded(ServiceError):
    http_status = 504
    grpc_status = "DEADLINE_EXCEEDED"
    code = "deadline_exceeded"


class ClientClosed(ServiceError):
    """The caller went away before its answer (closed the connection, cancelled the call).

    Nobody receives this answer; it exists so that the request is counted as what it was
    (status 499, nginx's "client closed request"), never as a server error."""

    http_status = 499
    grpc_status = "CANCELLED"
    code = "client_closed"


class InternalError(ServiceError):
    """Anything unexpected. The message is deliberately generic; details go to the log."""

    def __init__(self, message: str = "internal error; see the gateway log") -> None:
        super().__init__(message)


def as_service_error(exc: BaseException, where: str) -> ServiceError:
    """``exc`` as the caller will see it: itself if it is a ServiceError; otherwise a
    generic InternalError, with the traceback logged here (and only here)."""
    if isinstance(exc, ServiceError):
        return exc
    log.error("unhandled error in %s", where, exc_info=exc)
    return InternalError()
