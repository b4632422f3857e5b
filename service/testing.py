"""Helpers for testing and benchmarking a gateway: free ports, polling a condition with a
timeout (never sleep-and-hope), a backend made slow on purpose, and the gateway as a real
process. Used by the project's tests and by ``deploy/bench.py``; usable in yours."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

import numpy as np

from service.backends.base import Backend
from service.repository import ModelSpec
from service.runtime import Runtime
from service.settings import Settings

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

T = TypeVar("T")
BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (each socket stays bound until all are chosen: two calls
    of one port each may get the same port back)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def wait_until(
    check: Callable[[], T | None],
    timeout_s: float,
    what: str,
    interval_s: float = 0.05,
    alive: Callable[[], str | None] = lambda: None,
) -> T:
    """Poll ``check`` until it returns something truthy (returned), or fail with ``what``.
    ``alive`` says why waiting is pointless (a dead process), to fail fast."""
    deadline = time.monotonic() + timeout_s
    while True:
        if (value := check()) is not None and value is not False:
            return value
        if (dead := alive()) is not None:
            raise AssertionError(f"{what}: {dead}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout_s}s")
        time.sleep(interval_s)


def fastest_of(work: Callable[[], object], runs: int = 3) -> float:
    """Seconds the fastest of ``runs`` calls of ``work`` took. A test that bounds a time
    derives the bound from this, measured on the same machine in the same run: a constant
    tuned to one CPU fails on a slower one (machines here differ by 2-3x)."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - t0)
    return best


class SlowBackend(Backend):
    """Another backend with ``delay_s`` added to every batch, and each batch's size
    recorded: queues fill and deadlines pass on cue."""

    def __init__(self, inner: Backend, delay_s: float) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.max_inflight_batches = inner.max_inflight_batches
        self.delay_s = delay_s
        self.batches: list[int] = []

    async def start(self, specs: list[ModelSpec]) -> None:
        await self.inner.start(specs)

    async def load(self, spec: ModelSpec) -> None:
        await self.inner.load(spec)

    async def unload(self, spec: ModelSpec) -> None:
        await self.inner.unload(spec)

    def warm_costs(self, spec: ModelSpec) -> dict[int, float]:
        return {n: t + self.delay_s for n, t in self.inner.warm_costs(spec).items()}

    async def infer(self, spec: ModelSpec, batch: np.ndarray, timeout_s: float) -> np.ndarray:
        self.batches.append(len(batch))
        await asyncio.sleep(self.delay_s)
        return await self.inner.infer(spec, batch, timeout_s)

    def is_ready(self) -> bool:
        return self.inner.is_ready()

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class GatewayProcess:
    """``resnet-serve serve`` as a real process on free ports, ready when returned."""

    proc: subprocess.Popen[bytes]
    url: str
    grpc_port: int | None
    log: Path
    _log_file: IO[bytes]

    @classmethod
    def start(
        cls,
        log: Path,
        *args: str,
        grpc: bool = False,
        env: dict[str, str] | None = None,
        timeout_s: float = 120,
    ) -> GatewayProcess:
        import httpx

        port, second = free_ports(2)
        grpc_port = second if grpc else None
        extra = ["--grpc-port", str(grpc_port)] if grpc_port else []
        fh = log.open("wb")
        proc = subprocess.Popen(
            [str(BIN / "resnet-serve"), "serve", "--port", str(port), *extra, *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        gw = cls(proc, f"http://127.0.0.1:{port}", grpc_port, log, fh)

        def ready() -> bool:
            try:
                return httpx.get(gw.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            wait_until(ready, timeout_s, "gateway not ready", 0.2, gw.died)
        except BaseException:
            gw.stop()
            raise
        return gw

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def died(self) -> str | None:
        if self.proc.poll() is None:
            return None
        return f"exited with {self.proc.returncode}:\n{self.output()[-3000:]}"

    def stop(self, timeout_s: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def scrape(url: str, name: str, **labels: str) -> float:
    """The sum of a gateway's /metrics samples ``name`` whose labels include ``labels``
    (``scrape(url, "resnet_serve_requests_total", outcome="overloaded")``), 0 if none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return _sum(text_string_to_metric_families(httpx.get(url + "/metrics").text), name, labels)


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """:func:`scrape` on an in-process registry (a gateway run by a test client)."""
    return _sum(registry.collect(), name, labels)


def _sum(families: Iterable[Metric], name: str, labels: dict[str, str]) -> float:
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


class ThreadedGateway:
    """The gateway served by uvicorn on a thread of this process, configured exactly as
    ``resnet-serve serve`` configures it, for a backend the caller chooses: real sockets,
    scripted costs. A context manager; ready when entered."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        import uvicorn

        from service.app import create_app
        from service.cli import uvicorn_config

        self.settings = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
        self.app = create_app(self.settings, backend)
        self.server = uvicorn.Server(uvicorn_config(self.app, self.app, self.settings))
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)
        self.url = f"http://127.0.0.1:{self.settings.port}"

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        wait_until(
            lambda: self.server.started,
            60,
            "gateway not started",
            alive=lambda: None if self.thread.is_alive() else "the server thread ended",
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
