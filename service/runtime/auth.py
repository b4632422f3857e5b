"""API keys: kept as SHA-256 digests, compared in constant time. Shared by REST and gRPC."""

from __future__ import annotations

import hashlib
import hmac

from service.errors import Unauthorized


def hash_keys(keys: list[str]) -> list[bytes]:
    return [hashlib.sha256(k.encode()).digest() for k in keys]


def key_from_headers(authorization: str | None, x_api_key: str | None) -> str | None:
    """The caller's key: ``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
    if x_api_key:
        return x_api_key
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


def check_key(key: str | None, hashes: list[bytes], how: str) -> None:
    """Raise Unauthorized unless ``key`` is one of the configured keys (none configured: open)."""
    if not hashes:
        return
    if not key:
        raise Unauthorized(f"an API key is required ({how})")
    candidate = hashlib.sha256(key.encode()).digest()
    ok = False
    for h in hashes:  # no early exit: the time taken does not depend on which key matched
        ok |= hmac.compare_digest(h, candidate)
    if not ok:
        raise Unauthorized("invalid API key")
