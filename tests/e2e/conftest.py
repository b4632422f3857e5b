"""Start the real gateway as a process on a free port; poll readiness; fail fast if it dies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str
    log: Path
    log_file: IO[str]

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_ready(proc: subprocess.Popen[str], url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def start_server(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    fh = log.open("w")
    proc = subprocess.Popen(
        [str(BIN / "resnet-serve"), "serve", "--port", str(port), *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    server = Server(proc, url, log, fh)
    try:
        wait_ready(proc, url, log)
    except BaseException:
        stop(server)
        raise
    return server


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.terminate()
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
    server.log_file.close()


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("srv"), "--repository", str(demo.repository))
    yield s
    stop(s)


@pytest.fixture(scope="session")
def triton_repo(demo, tmp_path_factory) -> Path:
    """The demo's ONNX file published as flavor python-ort (what the CPU tritonserver runs)."""
    import json

    from export.repository import Publication, ServingConfig, publish
    from service.contract import PreprocessContract, read_labels

    repo = tmp_path_factory.mktemp("triton") / "repo"
    src = demo.model_dir
    publish(
        repo,
        Publication(
            "digits",
            PreprocessContract.load(src / "preprocess.json"),
            read_labels(src / "labels.txt"),
            src / "1" / "model.onnx",
            "python-ort",
            ServingConfig(max_batch_size=32, instance_kind="cpu"),
            json.loads((src / "1" / "export_report.json").read_text()),
        ),
    )
    return repo


@dataclass
class TritonPorts:
    http: int
    grpc: int
    metrics: int


def start_real_triton(repo: Path, ports: TritonPorts, log: Path):
    from service.triton_launcher import start_triton

    server = start_triton(repo, ports.http, ports.grpc, ports.metrics, log_path=log)
    server.wait_ready(180)
    return server


@pytest.fixture(scope="module")
def triton(triton_repo, tmp_path_factory):
    """A real tritonserver on free ports; fails fast (with its log) if it dies."""
    ports = TritonPorts(free_port(), free_port(), free_port())
    server = start_real_triton(triton_repo, ports, tmp_path_factory.mktemp("tlog") / "triton.log")
    server.ports = ports  # type: ignore[attr-defined]
    yield server
    server.stop()
