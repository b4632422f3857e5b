"""The guarded protocol's response writes: a response's head goes out with its first body
message, in one write (uvicorn alone writes them apart: two sends per answer)."""

from __future__ import annotations

from service.http_guard import _HeldHead


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
