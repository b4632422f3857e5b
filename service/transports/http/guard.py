"""Bounds uvicorn does not have, at the HTTP protocol level: how long a client may take to
send its headers and its body, how large its headers may be, how many connections may be
open. uvicorn (httptools) alone holds a connection that dribbles a byte a second forever,
and buffers an unterminated header of any size.

``GuardedProtocol`` is uvicorn's httptools protocol with these bounds, set by a ``Guard``
(``guarded_protocol(guard)`` is the class uvicorn takes):

* a header timeout: the request line and headers must arrive within ``header_timeout_s`` of
  the connection opening (or of the request's first byte): else 408 and close;
* body timeouts: no gap of more than ``body_idle_timeout_s`` between body bytes, and the
  whole body within ``body_timeout_s``: else the connection is closed and the request is
  answered (and counted) as ``request_timeout``;
* a header size and count limit: more than ``max_header_bytes`` before the end of the
  headers, or more than ``max_headers`` header lines: 431 and close, the rest unread;
* a connection limit: past ``max_connections`` open connections, 503 + Retry-After and
  close at once;
* malformed framing: bytes the HTTP parser refuses (a negative or repeated Content-Length,
  Content-Length with Transfer-Encoding, CR, LF or NUL inside a header, a bad chunk size,
  an unknown method or HTTP version) are answered 400 ``invalid_request`` in the envelope,
  saying what the parser found, and the connection is closed (uvicorn's own answer is a
  plain-text "Invalid HTTP request received.");
* refusals before the app: a classify request its model cannot take now (the app's own
  admission check, ``service.transports.http.middleware.Admission.refuse_early``) is answered 503 as
  soon as its headers are parsed, without an ASGI task, the app's middleware or reading
  its body (the rest of which is discarded): tens of microseconds of CPU;
* backpressure on clients that ignore Retry-After, once refusals cost more than
  ``REFUSAL_CPU_SHARE`` of a core (their measured CPU time, over about a second): then,
  after a 503 on a connection, its next request is not read until a good part of the
  Retry-After has passed (at most ``MAX_PAUSE_S``). The 503 itself goes out at once; a
  client that waits as asked never notices; clients that retry at once get their
  refusals at once while those are cheap, and cannot turn them into a flood that starves
  the requests being served when they are not.

Answers from here use the gateway's error envelope and are counted like every rejection.
What an ingress in front adds (TLS, its own header/body timeouts, per-client rate limits)
is docs/guarantees.md.
"""

from __future__ import annotations

import asyncio
import http
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from service.errors import (
    HeaderTooLarge,
    InvalidRequest,
    Overloaded,
    RequestTimeout,
    ServiceError,
)
from service.observability import observe
from service.observability.metrics import Metrics
from service.transports.http.error_responses import error_body, error_json

#: The longest a connection is left unread after a 503 (see the module's docstring).
MAX_PAUSE_S = 2.0
#: The share of one core refusals may take before their connections are slowed.
REFUSAL_CPU_SHARE = 0.05
#: What an answer before the app is: (status, headers, body), or None to go on to the app.
EarlyAnswer = Callable[[dict[str, Any]], tuple[int, list[tuple[bytes, bytes]], bytes] | None]


class RefusalBudget:
    """CPU time refusals may take: ``share`` of a core, as a bucket of ``share`` x
    ``window_s`` seconds that refills at ``share`` per second. Each refusal is charged its
    measured CPU time (one answered by the app: the average of those measured)."""

    def __init__(self, share: float = REFUSAL_CPU_SHARE, window_s: float = 1.0) -> None:
        self.capacity = share * window_s
        self.share = share
        self._left = self.capacity
        self._at = time.monotonic()
        #: An average of what a refusal before the app costs (0.5 ms before one is seen:
        #: what a refusal through the app measured).
        self.cost_s = 0.0005

    def spend(self, cost_s: float | None = None) -> bool:
        """Charge one refusal (``cost_s``: its measured CPU time); whether the budget
        covered it."""
        if cost_s is not None:
            self.cost_s += 0.1 * (cost_s - self.cost_s)
        now = time.monotonic()
        self._left = min(self.capacity, self._left + (now - self._at) * self.share)
        self._at = now
        self._left -= self.cost_s if cost_s is None else cost_s
        return self._left >= 0


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 5.0
    body_idle_timeout_s: float = 5.0
    body_timeout_s: float = 30.0
    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    max_connections: int = 1000


@dataclass(frozen=True)
class Guard:
    """What a guarded connection enforces (``limits``), where its refusals are counted
    (``metrics``), what answers a request before the app (``early``, the gateway's admission
    check, or None) and the refusals' CPU budget, shared by every connection of a server."""

    limits: ConnectionLimits
    metrics: Metrics
    early: EarlyAnswer | None = None
    refusals: RefusalBudget = field(default_factory=RefusalBudget)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of the module's docstring, for one
    connection; what it enforces is the class's :attr:`guard` (see :func:`guarded_protocol`)."""

    guard: ClassVar[Guard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.TimerHandle | None = None
        self._in_headers = True
        self._header_bytes = 0
        self._header_count = 0
        self._refused = False
        self._pause_s = 0.0  # after this response: its 503's Retry-After
        # Framing the parser refused (send_400_response): the error, and the request whose
        # body it was in (None: it was in a request line or headers).
        self._in_body = False
        self._malformed: InvalidRequest | None = None
        self._failing: RequestResponseCycle | None = None
        self._rng = random.Random()

    # --- connection ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.guard.limits.max_connections:
            self._refuse(Overloaded("too many open connections; retry later", retry_after=1))
            return
        self._arm(self.guard.limits.header_timeout_s, self._headers_too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered already; the rest is not read
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._in_headers and self._header_bytes > self.guard.limits.max_header_bytes:
            self._refuse(
                HeaderTooLarge(f"request headers exceed {self.guard.limits.max_header_bytes} bytes")
            )

    # --- parser callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._in_body = False
        self._header_count = 0
        if self._timer is None:  # a keep-alive connection's next request
            self._arm(self.guard.limits.header_timeout_s, self._headers_too_slow)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._in_headers = False
        self._header_bytes = 0
        if self._header_count > self.guard.limits.max_headers:
            self._refuse(HeaderTooLarge(f"more than {self.guard.limits.max_headers} header lines"))
            return
        super().on_headers_complete()
        self._in_body = True
        self._watch_status()
        self._arm(self.guard.limits.body_idle_timeout_s, self._body_too_slow)
        self._body_deadline = self.loop.call_later(
            self.guard.limits.body_timeout_s, self._body_too_slow
        )

    def on_body(self, body: bytes) -> None:
        if self._refused:
            return  # the rest of a refused request, still in the parser's buffer
        self._arm(self.guard.limits.body_idle_timeout_s, self._body_too_slow)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._in_body = False
        self._disarm()
        super().on_message_complete()

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """The request's headers are complete and no earlier response is pending: answer
        it here if ``early`` can, else start the app on it."""
        if (early := self.guard.early) is not None and app is self.app:
            start = time.thread_time()
            if (answer := early(cycle.scope)) is not None:
                self._answer(cycle, *answer)
                if answer[0] == 503:
                    self._after_refusal(answer[1], time.thread_time() - start)
                cycle.on_response()
                return
        super()._start_asgi_task(cycle, app)

    def _answer(
        self, cycle: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes
    ) -> None:
        """Write a whole response for ``cycle`` as uvicorn would (its default headers,
        keep-alive), and mark it complete: the rest of its body is not read into it."""
        content = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            content += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content += [b"\r\n", body]  # the headers carry its content-length
        self.transport.write(b"".join(content))
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()

    def _after_refusal(self, headers: Any, cost_s: float | None = None) -> None:
        """Charge a 503 to the refusal budget; past it, pause its connection after the
        response for part of its Retry-After (on_response_complete)."""
        if self.guard.refusals.spend(cost_s):
            return
        for name, value in headers:
            if name.lower() == b"retry-after":
                self._pause_s = float(value)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._malformed is not None:
            self._answer_malformed()
            return
        if self._pause_s and not self.transport.is_closing():
            self.transport.pause_reading()
            # A quarter to a half of it: a client that waits as asked (even with the
            # usual -50% jitter) comes back after the pause and never notices it.
            pause = min(self._pause_s, MAX_PAUSE_S) * self._rng.uniform(0.25, 0.5)
            self.loop.call_later(pause, self._resume_reading)
        self._pause_s = 0.0

    def _resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def _watch_status(self) -> None:
        """Wrap the request's own cycle's send: note a 503's Retry-After as the response
        starts, and write the response's head with its first body message (uvicorn
        writes each on its own: two sends on the socket for every response)."""
        cycle = self.cycle
        if cycle is None:
            return
        send = cycle.send
        held = _HeldHead(cycle.transport)

        async def watched(message: Any) -> None:
            start = message["type"] == "http.response.start"
            if start and message["status"] == 503:
                self._after_refusal(message.get("headers", ()))
            if not start and not held.head:  # the head has gone out: write through
                await send(message)
                return
            cycle.transport = held  # type: ignore[assignment]
            try:
                await send(message)
            finally:
                cycle.transport = held.transport
                if not start:
                    held.flush()  # nothing written (a HEAD response): the head alone

        cycle.send = watched  # type: ignore[method-assign]

    # --- timers and refusals ------------------------------------------------------

    def _arm(self, seconds: float, then: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(seconds, then)

    def _disarm(self) -> None:
        for timer in (self._timer, self._body_deadline):
            if timer is not None:
                timer.cancel()
        self._timer = self._body_deadline = None

    def _headers_too_slow(self) -> None:
        self._timer = None
        if self._header_bytes == 0 and self.cycle is None:
            self.transport.close()  # an idle connection that never asked anything
            return
        self._refuse(RequestTimeout("request headers not received in time"))

    def _body_too_slow(self) -> None:
        """The app is waiting for this body: mark the request as timed out and close;
        the app sees the disconnect and answers (and counts) request_timeout."""
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.scope["state"]["body_timed_out"] = True
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its HTTP parser refuses (it calls this while handling
        the parser's error): that error's reason, in the envelope (the module's docstring),
        after every earlier request's answer. Nothing more is read."""
        self._refused = True
        self._disarm()
        self._malformed = malformed(sys.exc_info()[1])
        cycle = self.cycle
        if self._in_body and cycle is not None:
            # The body of the newest request: its app (running, or queued behind earlier
            # requests) is told the client went away, and why (its outcome is this error:
            # service.transports.http.error_responses); it answers nothing more.
            cycle.scope["state"]["malformed"] = self._malformed
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()  # it has an answer, or part of one: nothing to add
                return
            self._failing = cycle
        self._answer_malformed()

    def _answer_malformed(self) -> None:
        """Answer the malformed request and close, once every request before it has had its
        answer (answers go out in order; on_response_complete calls again until then)."""
        cycle = self.cycle
        if self.pipeline or not (
            cycle is None or cycle.response_complete or cycle is self._failing
        ):
            return
        assert self._malformed is not None
        if self._failing is None:
            self._refuse(self._malformed)  # counted here: no app saw it
        else:  # its app's account counts it
            self.transport.write(closing_answer(self._malformed, self._failing.scope["path"]))
            self.transport.close()

    def _refuse(self, err: ServiceError) -> None:
        """Answer before any route is known and close."""
        self._refused = True
        self._disarm()
        record = observe.Record("http", "unmatched", observe.request_id(None))
        record.outcome, record.status = err.code, str(err.http_status)
        record.finish(self.guard.metrics)
        self.transport.write(closing_answer(err, self._path()))
        self.transport.close()

    def _path(self) -> str:
        """The path of the request being read, as far as it has come (what chooses an error's
        dialect: ``/v2...`` is KServe's); "" before its request line."""
        url: bytes = getattr(self, "url", b"")  # set by uvicorn as a request begins
        return url.split(b"?", 1)[0].decode("latin-1")


def guarded_protocol(guard: Guard) -> type[GuardedProtocol]:
    """The protocol class uvicorn's ``http`` takes for ``guard``: uvicorn instantiates it per
    connection with its own arguments only, so the guard is the subclass's attribute."""
    protocol: type[GuardedProtocol] = type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})
    return protocol


def malformed(exc: BaseException | None) -> InvalidRequest:
    """The error for bytes the HTTP parser refused with ``exc`` (httptools'
    ``HttpParserError``, whose message is llhttp's reason: "Invalid character in
    Content-Length", "Transfer-Encoding can't be present with Content-Length", ...)."""
    reason = str(exc).strip() if exc is not None else ""
    return InvalidRequest(f"malformed HTTP request: {reason or 'the parser refused it'}"[:200])


def closing_answer(err: ServiceError, path: str = "") -> bytes:
    """The whole response to a request refused before any route is known: ``err`` in the
    dialect of ``path`` (the /v1 envelope, or KServe v2's), with its Retry-After, closing
    the connection."""
    body = error_json(error_body(err, path))
    head = [
        f"HTTP/1.1 {err.http_status} {http.HTTPStatus(err.http_status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if (retry_after := err.retry_after_header()) is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _HeldHead:
    """The transport a response's cycle writes through while its head and first body
    message are sent: the head is held and goes out with that body, in one write."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.head = b""

    def write(self, data: bytes) -> None:
        if self.head:
            self.transport.write(self.head + data)
            self.head = b""
        else:
            self.head = data  # uvicorn writes the head once as the response starts

    def flush(self) -> None:
        if self.head:
            self.transport.write(self.head)
            self.head = b""

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:
        return self.transport.is_closing()
