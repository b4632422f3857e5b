"""Real processes: the gateway (``service.host.processes.GatewayProcess``) and a real Triton."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from service.host.processes import GatewayProcess
from tests.helpers.triton import start_real_triton


@pytest.fixture(scope="session")
def gateway_image() -> str:
    """The gateway image (CPU target), built once a session by `make image`'s script."""
    from tests.helpers import containers

    return containers.build()


@pytest.fixture(scope="module")
def server(demo, tmp_path_factory) -> Iterator[GatewayProcess]:
    """The trained demo model behind a real gateway process (accuracy tests)."""
    log = tmp_path_factory.mktemp("srv") / "gateway.log"
    gw = GatewayProcess.start(log, "--repository", str(demo.repository))
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def triton_repo(demo, tiny, tiny_pixels, tmp_path_factory) -> Path:
    """The demo's and the tiny model's ONNX files (the tiny one also taking uint8 pixels)
    republished as flavor python-ort (what the CPU tritonserver runs): one Triton serves
    them all."""
    from export.repository import republish

    repo = tmp_path_factory.mktemp("triton") / "repo"
    for model_dir in (demo.model_dir, tiny.model_dir, tiny_pixels.model_dir):
        republish(model_dir, repo, "python-ort")
    return repo


@pytest.fixture(scope="module")
def triton(triton_repo, tmp_path_factory):
    """A real tritonserver on free ports; fails fast (with its log) if it dies."""
    server = start_real_triton(triton_repo, tmp_path_factory.mktemp("tlog") / "triton.log")
    yield server
    server.stop()
