"""The gateway as a real process on free loopback ports, and the polling it is waited on
with (never sleep-and-hope): what ``resnet-serve tune``, ``make bench`` and the tests start
gateways with."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")
BIN = Path(sys.executable).parent


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float, group: bool = False) -> None:
    """SIGTERM (a server drains on it), then SIGKILL if it has not exited in ``timeout_s``.
    ``group``: ``proc`` leads a session of its own (``start_new_session``), and every process
    in it is signalled and waited for (a server that runs processes of its own)."""
    if not group:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(WaitFailed):
            wait_until(lambda: proc.poll() is not None and not group_alive(proc.pid), timeout_s, "")
            return
    proc.wait()


def group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` is still running."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class WaitFailed(AssertionError):
    """:func:`wait_until` gave up: what was awaited, and why (an assertion to a test)."""


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
            raise WaitFailed(f"{what}: {dead}")
        if time.monotonic() >= deadline:
            raise WaitFailed(f"{what}: not within {timeout_s}s")
        time.sleep(interval_s)


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
        # The ports are free when picked and bound seconds later, once the model is loaded:
        # another process may take one in between. Then the gateway exits saying so, and
        # is started again on other ports (three tries in all).
        for _ in range(2):
            try:
                return cls._launch(log, args, grpc, env, timeout_s)
            except WaitFailed as exc:
                if "address already in use" not in str(exc).lower():
                    raise
        return cls._launch(log, args, grpc, env, timeout_s)

    @classmethod
    def _launch(
        cls,
        log: Path,
        args: tuple[str, ...],
        grpc: bool,
        env: dict[str, str] | None,
        timeout_s: float,
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
        stop_process(self.proc, timeout_s)
        self._log_file.close()
        return self.proc.returncode
