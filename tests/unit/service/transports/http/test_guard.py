"""The guarded protocol, one connection at a time on a recording transport: its bounds
(header size and lines, header and body time limits, open connections) answered in the /v1
envelope and counted; a response's head goes out with its first body message, in one write
(uvicorn alone writes them apart: two sends per answer); a request the gateway can answer
before the app (an admission refusal) is answered from the protocol, its body skipped, the
connection kept; past the refusals' CPU budget, a refused connection pauses."""

from __future__ import annotations

import asyncio
import json

import uvicorn
from uvicorn.server import ServerState

from service.observability.metrics import Metrics
from service.transports.http import guard as http_guard
from service.transports.http.guard import (
    ConnectionLimits,
    Guard,
    GuardedProtocol,
    RefusalBudget,
    _HeldHead,
    guarded_protocol,
)
from tests.helpers.metrics import counted
from tests.helpers.timing import on_virtual_clock, until


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

    protocol_class = guarded_protocol(Guard(ConnectionLimits(), Metrics(), early, budget))
    protocol, transport = open_connection(protocol_class, app)
    return protocol, transport, seen


def open_connection(protocol_class: type[GuardedProtocol], app, state: ServerState | None = None):
    """A connection of ``protocol_class`` serving ``app``, made on a recording transport."""
    config = uvicorn.Config(app, log_config=None, lifespan="off")
    config.load()
    protocol = protocol_class(config=config, server_state=state or ServerState(), app_state={})
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


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


async def test_past_the_refusal_budget_a_refused_connection_is_paused(monkeypatch):
    # The clock stands still: no refill between draining the budget and the refusal, however
    # long this process waits for a core in between.
    monkeypatch.setattr(http_guard.time, "monotonic", lambda: 100.0)
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


# --- the bounds, on the protocol class itself ---------------------------------------------------


class Bounded(GuardedProtocol):
    """The protocol with small bounds, subclassed as :func:`guarded_protocol` does."""

    guard = Guard(
        ConnectionLimits(
            header_timeout_s=5.0,
            body_idle_timeout_s=2.0,
            body_timeout_s=30.0,
            max_header_bytes=256,
            max_headers=4,
            max_connections=2,
        ),
        Metrics(),
    )


async def never_called(scope, receive, send):
    raise AssertionError("the app was called")


def refused(transport: Transport) -> tuple[str, dict[str, str], dict]:
    """The one answer written on ``transport`` before it closed: status line, headers, JSON."""
    assert len(transport.writes) == 1 and transport.closed
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert headers["content-length"] == str(len(body)) and headers["connection"] == "close"
    return status, headers, json.loads(body)


def answered(outcome: str) -> float:
    return counted(
        Bounded.guard.metrics.registry,
        "resnet_serve_requests_total",
        route="unmatched",
        outcome=outcome,
    )


async def test_headers_past_their_size_are_refused_431_unread():
    before = answered("header_too_large")
    protocol, transport = open_connection(Bounded, never_called)
    protocol.data_received(b"GET / HTTP/1.1\r\nx-long: " + b"a" * 300)  # no end of headers yet
    status, headers, body = refused(transport)
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert headers["content-type"] == "application/json"
    assert body == {
        "error": {"code": "header_too_large", "message": "request headers exceed 256 bytes"}
    }
    protocol.data_received(b"more\r\n\r\n")  # the rest is not read
    assert len(transport.writes) == 1
    assert answered("header_too_large") == before + 1


async def test_too_many_header_lines_are_refused_431():
    protocol, transport = open_connection(Bounded, never_called)
    lines = b"".join(b"x-%d: 1\r\n" % i for i in range(5))
    protocol.data_received(b"GET / HTTP/1.1\r\n" + lines + b"\r\n")
    status, _, body = refused(transport)
    assert status.startswith("HTTP/1.1 431 ")
    assert body["error"] == {"code": "header_too_large", "message": "more than 4 header lines"}


async def test_past_the_connection_cap_a_connection_is_refused_503_with_retry_after():
    state = ServerState()
    for _ in range(2):
        _, transport = open_connection(Bounded, never_called, state)
        assert transport.writes == [] and not transport.closed
    _, transport = open_connection(Bounded, never_called, state)
    status, headers, body = refused(transport)
    assert status == "HTTP/1.1 503 Service Unavailable" and headers["retry-after"] == "1"
    assert body["error"]["code"] == "overloaded"


def test_headers_not_received_in_time_are_answered_408_and_an_idle_connection_closed():
    async def main():
        slow, slow_transport = open_connection(Bounded, never_called)
        _, idle_transport = open_connection(Bounded, never_called)
        slow.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n")  # and nothing more
        await asyncio.sleep(4.9)
        assert slow_transport.writes == [] and not idle_transport.closed
        await asyncio.sleep(0.2)
        status, _, body = refused(slow_transport)
        assert status == "HTTP/1.1 408 Request Timeout"
        assert body["error"]["code"] == "request_timeout"
        assert idle_transport.closed and idle_transport.writes == []  # nothing to answer

    on_virtual_clock(main())


def reads_until_disconnect(scopes: list[dict]):
    """An app that records its scope and reads its request until the client is gone."""

    async def app(scope, receive, send):
        scopes.append(scope)
        while (await receive())["type"] != "http.disconnect":
            pass

    return app


def test_a_body_that_stops_coming_closes_the_connection_and_marks_its_request():
    scopes: list[dict] = []
    app = reads_until_disconnect(scopes)

    async def main():
        protocol, transport = open_connection(Bounded, app)
        protocol.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc")
        await asyncio.sleep(1.9)
        protocol.data_received(b"def")  # a gap under body_idle_timeout_s
        await asyncio.sleep(1.9)
        assert not transport.closed
        await asyncio.sleep(0.2)  # 2 s without a byte
        assert transport.closed and transport.writes == []  # the app answers the timeout
        assert scopes[0]["state"]["body_timed_out"] is True
        protocol.connection_lost(None)  # the app sees the disconnect and ends

    on_virtual_clock(main())


def test_a_body_that_trickles_past_its_whole_time_closes_the_connection():
    scopes: list[dict] = []
    app = reads_until_disconnect(scopes)

    async def main():
        protocol, transport = open_connection(Bounded, app)
        protocol.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n")
        for _ in range(19):  # a byte every 1.5 s: never idle for body_idle_timeout_s
            await asyncio.sleep(1.5)
            protocol.data_received(b"a")
        assert not transport.closed  # 28.5 s
        await asyncio.sleep(1.6)  # past body_timeout_s (30 s) since the headers
        assert transport.closed and scopes[0]["state"]["body_timed_out"] is True
        protocol.connection_lost(None)

    on_virtual_clock(main())


# --- framing the HTTP parser refuses ------------------------------------------------------------


async def test_framing_the_parser_refuses_is_answered_400_in_the_envelope():
    before = answered("invalid_request")
    protocol, transport = open_connection(Bounded, never_called)
    protocol.data_received(b"POST /v1/classify HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n")
    status, headers, body = refused(transport)
    assert status == "HTTP/1.1 400 Bad Request" and headers["content-type"] == "application/json"
    assert body == {
        "error": {
            "code": "invalid_request",
            "message": "malformed HTTP request: Invalid character in Content-Length",
        }
    }
    assert answered("invalid_request") == before + 1
    protocol.data_received(b"GET / HTTP/1.1\r\n\r\n")  # nothing more is read
    assert len(transport.writes) == 1


async def test_on_a_kserve_path_the_answer_is_in_kserves_shape():
    protocol, transport = open_connection(Bounded, never_called)
    protocol.data_received(b"GET /v2/models/x HTTP/1.1\r\nhost: x\r\nx-a: a\x00b\r\n\r\n")
    _, _, body = refused(transport)
    assert body == {
        "error": "malformed HTTP request: Invalid header value char",
        "code": "invalid_request",
    }


async def test_a_body_the_parser_refuses_ends_its_request_with_that_error():
    """The app reading the body is told the client went away, and why (its outcome); the
    client gets the 400, once."""
    seen: list[dict] = []
    done = asyncio.Event()

    async def app(scope, receive, send):
        seen.append(scope)
        while (await receive())["type"] != "http.disconnect":
            pass
        await send({"type": "http.response.start", "status": 499, "headers": []})
        done.set()

    protocol, transport = open_connection(Bounded, app)
    protocol.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n")
    await until(lambda: seen)  # the app is waiting for the body
    protocol.data_received(b"zz\r\n")  # not a chunk size
    _, _, body = refused(transport)
    assert body["error"]["message"] == "malformed HTTP request: Invalid character in chunk size"
    assert seen[0]["state"]["malformed"].code == "invalid_request"
    await asyncio.wait_for(done.wait(), 10)  # the app ends; what it sent went nowhere
    assert len(transport.writes) == 1
