"""gRPC's one error mapping, and the wrapper every unary method of every service runs in.

Methods are registered with raw bytes in and out, so that parsing the request is ours too:
a malformed message is INVALID_ARGUMENT naming the message type, never UNKNOWN naming a
protobuf exception. Around each call: the API-key check (from metadata), the status code
of any error (``ServiceError.grpc_status``) with its stable code and Retry-After in the
trailing metadata, the rejection count, per-method metrics, and a generic INTERNAL for
anything unexpected (logged, never echoed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError, Message

from service.auth import key_from_headers
from service.errors import (
    ClientClosed,
    DeadlineExceeded,
    InvalidRequest,
    ServiceError,
    as_service_error,
)
from service.runtime import Runtime

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Message]]
KEY_HOW = "metadata authorization: Bearer KEY or x-api-key"


@dataclass(frozen=True)
class Method:
    request: type[Message]
    handler: Handler
    #: Whether the API keys apply (health-like methods stay open, as on HTTP).
    auth: bool = True


def time_remaining(context: Context) -> float | None:
    """The call's own deadline, in seconds from now (None without one)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e6:  # "no deadline" comes back as a huge number
        return None
    return max(remaining, 1e-6)


def unary(runtime: Runtime, name: str, method: Method) -> grpc.RpcMethodHandler:
    metrics = runtime.metrics

    async def call(raw: bytes, context: Context) -> bytes:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            try:
                request = method.request.FromString(raw)
            except DecodeError:
                raise InvalidRequest(
                    f"malformed {method.request.DESCRIPTOR.name} message"
                ) from None
            if method.auth:
                md = {k.lower(): v for k, v in context.invocation_metadata() or () if k}
                runtime.authorize(
                    key_from_headers(md.get("authorization"), md.get("x-api-key")), KEY_HOW
                )
            response = await method.handler(request, context)
            return response.SerializeToString()
        except asyncio.CancelledError:
            # gRPC cancels the handler when the caller goes away or its deadline passes.
            remaining = context.time_remaining()
            late = remaining is not None and remaining <= 0
            gone: ServiceError = (
                DeadlineExceeded("deadline passed") if late else ClientClosed("call cancelled")
            )
            code = grpc.StatusCode[gone.grpc_status]
            metrics.rejected(gone.code)
            raise
        except Exception as exc:
            err = as_service_error(exc, f"gRPC {name}")
            code = grpc.StatusCode[err.grpc_status]
            metrics.rejected(err.code)
            trailers = [("error-code", err.code)]
            if (retry_after := err.retry_after_header()) is not None:
                trailers.append(("retry-after", retry_after))
            context.set_trailing_metadata(tuple(trailers))
            await context.abort(code, err.message)
            raise AssertionError("unreachable: abort raises") from None
        finally:
            metrics.grpc_requests.labels(name, code.name).inc()
            metrics.grpc_latency.labels(name).observe(time.perf_counter() - start)

    return grpc.unary_unary_rpc_method_handler(call)


def service_handler(runtime: Runtime, service: str, methods: dict[str, Method]) -> Any:
    return grpc.method_handlers_generic_handler(
        service, {name: unary(runtime, name, m) for name, m in methods.items()}
    )
