"""The request record's pieces that need no server: request ids a client may not forge,
and the flood limit on failures' log lines."""

from __future__ import annotations

import logging
import types

from service.observability import observe
from service.observability.observe import FloodFilter, request_id


def test_a_request_id_is_the_clients_only_if_it_is_a_plain_token():
    assert request_id("abc-123_x.y:z/w+=@") == "abc-123_x.y:z/w+=@"
    for forged in (None, "", 'x" level=error', "a b", "é", "x" * 65, "line\nbreak"):
        made = request_id(forged)
        assert made != forged and len(made) == 32 and made.isalnum()
    made = {request_id(None) for _ in range(10_000)}
    assert len(made) == 10_000  # unique without a random draw each
    assert all(len(m) == 32 and int(m, 16) >= 0 for m in made)


def test_floods_of_one_client_error_are_cut_and_counted(monkeypatch):
    now = [100.0]  # the filter's clock, moved by the test: windows open and close on cue
    monkeypatch.setattr(observe, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    kept: list[logging.LogRecord] = []
    flood = FloodFilter(burst=3, window_s=0.2)

    def line(route: str, status: str, outcome: str) -> None:
        record = logging.LogRecord("service.access", logging.INFO, "", 0, "req", (), None)
        record.route, record.status, record.outcome = route, status, outcome
        if flood.filter(record):
            kept.append(record)

    for _ in range(10):
        line("/v1/classify", "400", "invalid_image")
    assert len(kept) == 3  # the burst, then nothing of that kind
    line("/v2/models/{model}/infer", "400", "invalid_image")  # another kind: its own budget
    line("/v1/classify", "503", "overloaded")
    for _ in range(10):
        line("/v1/classify", "200", "ok")  # successes always pass
    assert len(kept) == 15
    now[0] = 100.1
    line("/v1/classify", "400", "invalid_image")
    assert len(kept) == 15  # the same window: still cut
    now[0] = 100.2  # a new window: the next line says what was dropped
    line("/v1/classify", "400", "invalid_image")
    assert kept[-1].suppressed == 8 and "8 more like it" in kept[-1].getMessage()
    line("/v1/classify", "400", "invalid_image")
    assert not hasattr(kept[-1], "suppressed")  # said once
