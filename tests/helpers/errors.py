"""What an error answer must look like: the HTTP envelope and the gRPC status."""

from __future__ import annotations

import grpc
import pytest


def assert_error(resp, status: int, code: str, fragment: str = "") -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert fragment in body["error"]["message"]
    assert "Traceback" not in resp.text


def code_of(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()
