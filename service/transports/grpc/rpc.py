"""gRPC's one error mapping, and the wrapper every unary method of every service runs in.

Methods are registered with raw bytes in and out, so that parsing the request is ours too:
a malformed message is INVALID_ARGUMENT naming the message type, never UNKNOWN naming a
protobuf exception. Around each call: its record (``service.observability.observe``: request id from
metadata ``x-request-id`` or generated, returned in the trailing metadata; the outcome,
metrics and log line), the API-key check (from metadata), the status code of any error
(``ServiceError.grpc_status``) with its stable code and Retry-After in the trailing
metadata, and a generic INTERNAL for anything unexpected (logged, never echoed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError, Message

from service.errors import (
    ClientClosed,
    DeadlineExceeded,
    InvalidRequest,
    ServiceError,
    as_service_error,
)
from service.observability import observe
from service.runtime.auth import key_from_headers
from service.runtime.core import Runtime

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Handler = Callable[[Any, Context], Awaitable[Message]]
KEY_HOW = "metadata authorization: Bearer KEY or x-api-key"


@dataclass(frozen=True)
class Method:
    request: type[Message]
    handler: Handler
    #: Whether the API keys apply (health-like methods stay open, as on HTTP).
    auth: bool = True
    #: Whether the admin keys apply instead (service.runtime.core.Runtime.authorize_admin).
    admin: bool = False


def time_remaining(context: Context) -> float | None:
    """The call's own deadline, in seconds from now (None without one)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 1e6:  # "no deadline" comes back as a huge number
        return None
    return max(remaining, 1e-6)


def unary(runtime: Runtime, name: str, method: Method) -> grpc.RpcMethodHandler:
    metrics = runtime.metrics

    async def call(raw: bytes, context: Context) -> bytes:
        md = {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        record = observe.Record(
            "grpc",
            name,
            observe.request_id(md.get("x-request-id")),
            tracer=runtime.tracer,
            client=md.get("x-client-id"),
        )
        trailers: list[tuple[str, str]] = [("x-request-id", record.request_id)]
        code = grpc.StatusCode.OK
        # The request is counted and logged as its handling ends, before the answer leaves:
        # a client that reads /metrics after its answer finds it counted.
        failure: ServiceError | None = None
        with observe.handling(record, metrics, md):
            try:
                try:
                    request = method.request.FromString(raw)
                except DecodeError:
                    raise InvalidRequest(
                        f"malformed {method.request.DESCRIPTOR.name} message"
                    ) from None
                key = key_from_headers(md.get("authorization"), md.get("x-api-key"))
                if method.admin:
                    runtime.authorize_admin(key, KEY_HOW)
                elif method.auth:
                    runtime.authorize(key, KEY_HOW)
                response = await method.handler(request, context)
                context.set_trailing_metadata(tuple(trailers))
                return response.SerializeToString()
            except asyncio.CancelledError:
                # gRPC cancels the handler when the caller goes away or its deadline passes.
                remaining = context.time_remaining()
                late = remaining is not None and remaining <= 0
                gone: ServiceError = (
                    DeadlineExceeded("deadline passed") if late else ClientClosed("call cancelled")
                )
                code = grpc.StatusCode[gone.grpc_status]
                record.outcome = gone.code
                raise
            except Exception as exc:
                err = as_service_error(exc, f"gRPC {name}")
                code = grpc.StatusCode[err.grpc_status]
                record.outcome = err.code
                trailers.append(("error-code", err.code))
                if (retry_after := err.retry_after_header()) is not None:
                    trailers.append(("retry-after", retry_after))
                context.set_trailing_metadata(tuple(trailers))
                failure = err
            finally:
                record.status = code.name
        assert failure is not None  # every other way out of the block returned or raised
        await context.abort(code, failure.message)
        raise AssertionError("unreachable: abort raises")

    return grpc.unary_unary_rpc_method_handler(call)


def service_handler(runtime: Runtime, service: str, methods: dict[str, Method]) -> Any:
    return grpc.method_handlers_generic_handler(
        service, {name: unary(runtime, f"{service}/{name}", m) for name, m in methods.items()}
    )
