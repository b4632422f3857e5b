"""An extra is enough for what the docs say it enables. docs/load-testing.md: `pip install
'resnet-serving[bench]'` is all the load tool needs. A fresh virtual environment gets this
project with that extra alone (pip with this machine's own settings), and its `resnet-serve
bench` runs a few requests over each of the four protocols against a gateway on 127.0.0.1
(the gateway runs from the project's own environment: a load test runs from elsewhere).

First with the extra as it was before issue 35 (an HDR histogram, matplotlib and make
bench's peers): the tool stops at its first read of the gateway's /metrics. Then the extra
of today, installed over it (a superset: the environment then holds what `.[bench]` alone
installs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.host.processes import GatewayProcess
from tests.helpers.images import image_bytes
from tests.helpers.paths import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.external]

#: The bench extra before issue 35 (`git show 3053d41:pyproject.toml`).
BENCH_BEFORE = """bench = [
    "hdrhistogram==0.10.8",
    "matplotlib>=3.8,<4",
    "litserve==0.2.19",
    "simplejpeg>=1.7,<2",
]
"""


def project_copy(dest: Path, bench: str | None = None) -> Path:
    """What pip builds the distribution from (pyproject.toml, README.md, the packages), in a
    folder of its own: building in the working tree would leave setuptools' build/ there.
    ``bench`` replaces the bench extra."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    for package in ("service", "export"):
        shutil.copytree(
            ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    if bench is not None:
        text = (dest / "pyproject.toml").read_text()
        text, n = re.subn(r"^bench = \[\n.*?^\]\n", bench, text, count=1, flags=re.M | re.S)
        assert n == 1, "pyproject.toml has no bench extra"
        (dest / "pyproject.toml").write_text(text)
    return dest


def pip_install(venv: Path, requirement: str) -> None:
    proc = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", requirement],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.fixture(scope="module")
def gateway(tiny, tmp_path_factory):
    gw = GatewayProcess.start(
        tmp_path_factory.mktemp("extras") / "gw.log",
        "--repository",
        str(tiny.repository),
        grpc=True,
    )
    yield gw
    gw.stop()


def smoke(
    venv: Path, gw: GatewayProcess, model: str, protocol: str, tmp: Path
) -> subprocess.CompletedProcess[str]:
    """The load tool's smoke check: one client, three requests, no warm-up."""
    images = tmp / "images"
    if not images.exists():
        images.mkdir(parents=True)
        (images / "a.png").write_bytes(image_bytes(size=(40, 36)))
    url = gw.url if protocol in ("rest", "kserve-http") else gw.grpc_target
    return subprocess.run(
        [str(venv / "bin" / "resnet-serve"), "bench", "--quiet", "--url", url, "--protocol", protocol,
         "--model", model, "--images", str(images), "--output", str(tmp / protocol),
         "--concurrency", "1", "--duration", "30", "--max-requests", "3", "--warmup", "0",
         "--metrics-url", gw.url + "/metrics"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def test_the_bench_extra_alone_runs_the_load_tool(gateway, tiny, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip_install(venv, f"{project_copy(tmp_path / 'before', BENCH_BEFORE)}[bench]")
    before = smoke(venv, gateway, tiny.name, "rest", tmp_path / "b")
    assert before.returncode != 0
    assert "prometheus_client" in before.stderr, before.stderr[-2000:]

    pip_install(venv, f"{project_copy(tmp_path / 'now')}[bench]")
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, timeout=120
    )
    assert listed.returncode != 0  # the bench extra brings no torch (nor the export side)
    for protocol in ("rest", "kserve-http", "grpc", "kserve-grpc"):
        proc = smoke(venv, gateway, tiny.name, protocol, tmp_path / "n")
        assert proc.returncode == 0, (protocol, proc.stderr[-3000:])
        (step,) = json.loads((tmp_path / "n" / protocol / "report.json").read_text())["steps"]
        assert step["requests"] == 3 and step["errors"] == {}, (protocol, step)
        assert step["server"]["requests"] == 3  # the gateway's /metrics, read by the tool
