"""A small, cheap HTTP/1.1 load generator for loopback benchmarks.

Keep-alive connections over raw asyncio sockets: a prebuilt request, a minimal response
parser. It costs a fraction of a millisecond of CPU per request, so on a 2-core machine the
client steals as little as possible from the server it measures. Loopback only; every run
is bounded by a duration and a request count.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class LoadResult:
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    images_per_request: int = 1
    #: Latencies of each status's answers (a fast 503 must not flatter the 200s).
    by_status: dict[int, list[float]] = field(default_factory=dict)

    def record(self, status: int, latency_s: float) -> None:
        self.latencies_s.append(latency_s)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.by_status.setdefault(status, []).append(latency_s)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def images_per_s(self) -> float:
        return self.ok * self.images_per_request / self.duration_s

    def pct(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        lat = sorted(self.latencies_s)
        return lat[min(len(lat) - 1, int(q / 100 * len(lat)))]

    def summary(self) -> dict[str, float | int | dict[int, int]]:
        return {
            "images_per_s": round(self.images_per_s, 2),
            "p50_ms": round(self.pct(50) * 1000, 1),
            "p99_ms": round(self.pct(99) * 1000, 1),
            "mean_ms": round(statistics.fmean(self.latencies_s) * 1000, 1)
            if self.latencies_s
            else 0,
            "requests": len(self.latencies_s),
            "statuses": self.statuses,
        }


def build_request(
    url: str, body: bytes, content_type: str, headers: dict[str, str] | None = None
) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("load tests target loopback only")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Type: {content_type}\r\n"
        f"{extra}Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode()
    return parts.hostname, parts.port or 80, head + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, float]:
    """(status, Retry-After seconds or 0) of the next response; its body is skipped."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length, retry_after = 0, 0.0
    for line in head.split(b"\r\n")[1:]:
        name = line[:15].lower()
        if name == b"content-length:":
            length = int(line[15:])
        elif name.startswith(b"retry-after:"):
            retry_after = float(line[12:])
    if length:
        await reader.readexactly(length)
    return status, retry_after


async def _connection(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def closed_loop(
    url: str,
    body: bytes,
    content_type: str,
    clients: int,
    duration_s: float,
    max_requests: int = 100_000,
    honor_retry_after: bool = False,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """``clients`` connections, each sending the next request when the last one returns.
    ``honor_retry_after``: after a 503, wait what the server's Retry-After says, jittered
    by +-50% as retry policies do (gRPC's, the AWS SDKs'), so clients refused together do
    not come back together."""
    host, port, request = build_request(url, body, content_type, headers)
    result = LoadResult(duration_s)
    end = time.perf_counter() + duration_s
    sent = 0
    rng = random.Random(0)

    async def client() -> None:
        nonlocal sent
        reader, writer = await _connection(host, port)
        try:
            while time.perf_counter() < end and sent < max_requests:
                sent += 1
                t0 = time.perf_counter()
                writer.write(request)
                status, retry_after = await _read_response(reader)
                result.record(status, time.perf_counter() - t0)
                if honor_retry_after and retry_after:
                    pause = retry_after * rng.uniform(0.5, 1.5)
                    await asyncio.sleep(min(pause, max(0.0, end - time.perf_counter())))
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    result.duration_s = time.perf_counter() - start
    return result


async def open_loop(
    url: str, body: bytes, content_type: str, rate_per_s: float, duration_s: float, seed: int = 0
) -> LoadResult:
    """Poisson arrivals at ``rate_per_s``, whatever the server's speed (latency under load)."""
    host, port, request = build_request(url, body, content_type)
    rng = random.Random(seed)
    result = LoadResult(duration_s)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one() -> None:
        t0 = time.perf_counter()  # from arrival, connecting included (no coordinated omission)
        conn = idle.pop() if idle else None
        try:
            if conn is None:
                raise ConnectionError
            conn[1].write(request)
            status, _ = await _read_response(conn[0])
        except (ConnectionError, asyncio.IncompleteReadError):
            # No idle connection, or one the server closed while it sat idle (its keep-alive
            # timeout): send on a fresh one, as HTTP clients do.
            if conn is not None:
                conn[1].close()
            conn = await _connection(host, port)
            conn[1].write(request)
            status, _ = await _read_response(conn[0])
        result.record(status, time.perf_counter() - t0)
        idle.append(conn)

    tasks = []
    start = time.perf_counter()
    next_at = start
    while next_at < start + duration_s:
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        tasks.append(asyncio.create_task(one()))
        next_at += rng.expovariate(rate_per_s)
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    result.duration_s = duration_s
    return result


def main() -> None:
    """``python -m deploy.loadgen``: a closed loop from its own process (so that a client
    in the measuring process does not share the server's GIL), one JSON line out."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--body", type=Path, required=True, help="file sent as the body")
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--honor-retry-after", action="store_true")
    parser.add_argument("--header", action="append", default=[], help="NAME: VALUE")
    args = parser.parse_args()
    headers = dict(h.split(":", 1) for h in args.header)
    result = asyncio.run(
        closed_loop(
            args.url,
            args.body.read_bytes(),
            args.content_type,
            args.clients,
            args.seconds,
            honor_retry_after=args.honor_retry_after,
            headers={k.strip(): v.strip() for k, v in headers.items()},
        )
    )
    print(
        json.dumps(
            {
                "duration_s": result.duration_s,
                "statuses": result.statuses,
                "latencies_s": {str(k): sorted(v) for k, v in result.by_status.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
