"""What every part of the Triton backend shares about talking to Triton: the gRPC channel's
arguments, the admin key's header, and Triton's errors read in one line."""

from __future__ import annotations

from typing import Any

from tritonclient.utils import InferenceServerException

from service.errors import brief
from service.model.repository import ModelSpec

#: The header Triton reads the key of a restricted gRPC protocol from (key name
#: "triton-admin-key", as the Helm chart restricts repository control).
ADMIN_HEADER = "triton-grpc-protocol-triton-admin-key"
#: What Triton 2.51 answers a call of a protocol restricted to a key (UNAVAILABLE, with no
#: key or another one), naming only its header.
RESTRICTED = "This protocol is restricted"
Key = tuple[str, str]  # (model, version)


def version_key(spec: ModelSpec) -> Key:
    return spec.name, spec.version


def reason(exc: InferenceServerException) -> str:
    """Triton's message in one line (a failed python-backend load appends a traceback)."""
    return brief(exc, limit=500)


def status_code(exc: InferenceServerException) -> str:
    """'StatusCode.UNAVAILABLE' -> 'UNAVAILABLE' (empty if the client raised it itself)."""
    return str(exc.status() or "").rsplit(".", 1)[-1]


def admin_headers(admin_key: str | None) -> dict[str, str] | None:
    """What calls of Triton's restricted protocols send along (none without a key)."""
    return {ADMIN_HEADER: admin_key} if admin_key else None


def key_sent(headers: dict[str, str] | None) -> str:
    """What the gateway sent a Triton that refused a restricted call, in its error."""
    return "a key Triton does not accept" if headers else "none"


def channel_args(max_message_bytes: int) -> list[tuple[str, Any]]:
    """The arguments of the serving channel, which balances calls over every Triton."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Spread calls over every address the target resolves to: with a headless
        # Service (dns:///triton-headless:8001, as the Helm chart sets it) that is every
        # Triton pod. One long-lived channel behind a ClusterIP would pin each gateway to
        # one Triton. A plain host:port resolves to one address: nothing changes.
        ("grpc.lb_policy_name", "round_robin"),
        # Reconnect quickly once Triton is back.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]
