"""The guarded protocol: a response's head goes out with its first body message, in one
write (uvicorn alone writes them apart: two sends per answer); a request the gateway can
answer before the app (an admission refusal) is answered from the protocol, its body
skipped, the connection kept; past the refusals' CPU budget, a refused connection pauses."""

from __future__ import annotations

import uvicorn
from uvicorn.server import ServerState

from service import http_guard
from service.http_guard import ConnectionLimits, RefusalBudget, _HeldHead, guarded_protocol
from service.metrics import Metrics
from tests.helpers import until


class Recording:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_the_head_is_written_with_the_first_body():
    transport = Recording()
    held = _HeldHead(transport)  # type: ignore[arg-type]
    held.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    assert transport.writes == []
    held.write(b"{}")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]


def test_a_head_without_a_body_is_flushed_and_close_sends_what_is_held():
    transport = Recording()
    held = _HeldHead(transport)  # type: ignore[arg-type]
    held.write(b"HTTP/1.1 204 No Content\r\n\r\n")
    held.flush()
    assert transport.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]
    held.write(b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    held.close()
    assert transport.writes[-1].startswith(b"HTTP/1.1 500") and transport.closed


# --- answers before the app -------------------------------------------------------------------


class Transport(Recording):
    def __init__(self) -> None:
        super().__init__()
        self.paused = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:
        self.paused += 1

    def resume_reading(self) -> None: ...


REFUSED = (
    503,
    [(b"content-type", b"application/json"), (b"content-length", b"2"), (b"retry-after", b"3")],
    b"{}",
)


def connection(budget: RefusalBudget):
    """A guarded protocol on a recording transport; its app records the paths it is given;
    ``early`` refuses every POST to /refuse."""
    seen: list[str] = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def early(scope):
        return REFUSED if scope["path"] == "/refuse" else None

    config = uvicorn.Config(app, log_config=None, lifespan="off")
    config.load()
    cls = guarded_protocol(ConnectionLimits(), Metrics(), early, budget)
    protocol = cls(config=config, server_state=ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)
    return protocol, transport, seen


REFUSE = b"POST /refuse HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\nhello world"


async def test_an_early_answer_skips_the_app_and_the_body_and_keeps_the_connection():
    protocol, transport, seen = connection(RefusalBudget())
    # The refused request, its body, then another request: all in one read.
    protocol.data_received(REFUSE + b"GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
    await until(lambda: len(transport.writes) >= 2)  # the app's task for /next answered
    assert seen == ["/next"]  # the app never saw /refuse; its body was not a request
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n") and body == b"{}"
    assert b"retry-after: 3" in head and b"connection: close" not in head
    assert transport.writes[1].startswith(b"HTTP/1.1 200") and not transport.closed
    assert transport.paused == 0  # within the refusal budget: no pause


async def test_past_the_refusal_budget_a_refused_connection_is_paused():
    budget = RefusalBudget(share=0.05)
    while budget.spend(0.01):  # refusals have taken their share of the CPU
        pass
    protocol, transport, seen = connection(budget)
    protocol.data_received(REFUSE)
    assert transport.writes[0].startswith(b"HTTP/1.1 503")  # still answered at once
    assert transport.paused == 1  # then its connection is left unread for a while
    assert seen == []


def test_the_refusal_budget_is_a_share_of_a_core(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(http_guard.time, "monotonic", lambda: now[0])
    budget = RefusalBudget(share=0.05, window_s=1.0)  # 50 ms of CPU, 50 ms more a second
    assert all(budget.spend(0.002) for _ in range(24))  # 48 ms
    assert not budget.spend(0.004)  # 52 ms: over
    now[0] += 0.1  # 5 ms more: 3 ms left
    assert budget.spend(0.002) and not budget.spend(0.002)
    now[0] += 10  # a quiet while refills it, no further than its window's worth
    assert sum(budget.spend(0.002) for _ in range(100)) in (24, 25)  # 50 ms, float-rounded
    assert 0.0005 < budget.cost_s < 0.004  # the average of the costs measured
    assert not budget.spend()  # one the app answered is charged that average
