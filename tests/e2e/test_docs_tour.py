"""The README's five-minute tour and the API page's serving examples, run as a reader runs
them, against the trained demo model behind a real gateway on 127.0.0.1 (the docs' host and
ports replaced by the gateway's free ones, `.venv/bin/` by this interpreter's scripts), in a
folder of their own. Each command's output is compared with the output the docs show, for
shape: the same JSON keys and nesting, the same metric series, the same table columns and
rows. `make serve` stands for the gateway here: its recipe is checked to be the command the
gateway runs (running it would set up .venv and train into model_repository/)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from service.host.processes import GatewayProcess
from tests.helpers import docs_commands as dc
from tests.helpers.paths import BIN, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.external]


@pytest.fixture(scope="module")
def gateway(demo, tmp_path_factory):
    """What `make serve` starts: the demo model, served with the embedded backend (and gRPC,
    which the API page's examples use)."""
    log = tmp_path_factory.mktemp("tour") / "gateway.log"
    gw = GatewayProcess.start(
        log, "--repository", str(demo.repository), "--host", "127.0.0.1", grpc=True
    )
    yield gw
    gw.stop()


def substitute(text: str, gw: GatewayProcess) -> str:
    port = gw.url.rsplit(":", 1)[1]
    for host in ("localhost:8000", "127.0.0.1:8000"):
        text = text.replace(host, f"127.0.0.1:{port}")
    for target in ("127.0.0.1:50051", "HOST:50051"):
        text = text.replace(target, gw.grpc_target)
    return text.replace(".venv/bin/", f"{BIN}/")


def run(line: dc.Line, gw: GatewayProcess, cwd: Path) -> str:
    proc = subprocess.run(
        ["bash", "-c", "set -o pipefail; " + substitute(line.text, gw)],
        cwd=cwd, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"{line.where}: {line.text}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    )
    return proc.stdout


def shape(value: Any, lengths: bool) -> Any:
    """JSON's structure: keys, nesting and types (and list lengths where ``lengths``)."""
    if isinstance(value, dict):
        return {k: shape(v, lengths) for k, v in sorted(value.items())}
    if isinstance(value, list):
        items = [shape(v, lengths) for v in value]
        return items if lengths else sorted({json.dumps(i, sort_keys=True) for i in items})
    return (
        "number"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else type(value).__name__
    )


def series(lines: list[str]) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if line.strip()}


def table(lines: list[str]) -> tuple[list[str], list[tuple[str, int]], list[str]]:
    """A bench table: its header, each row's label and column count, and the lines under it
    (paths and legend) as they are."""
    rows = [line for line in lines if re.match(r"\s*\d+ clients", line)]
    header = lines[0].split()
    tail = [line for line in lines[1:] if line not in rows]
    return header, [(" ".join(r.split()[:2]), len(r.split())) for r in rows], tail


def compare(step: dc.Step, out: str) -> None:
    shown = [line for line in step.output if line.strip()]
    if step.output_lang == "json":
        assert shape(json.loads(out), True) == shape(json.loads("".join(shown)), True), out
    elif shown and shown[0].split()[0] == "load":
        assert table(out.splitlines()) == table(shown), out
    elif shown:
        # The test's own wait for readiness polled /readyz; a reader's `make serve` has none.
        got = [line for line in out.splitlines() if 'route="/readyz"' not in line]
        assert series(got) == series(shown), out


def test_the_makefile_serves_as_the_docs_say():
    make = (ROOT / "Makefile").read_text()
    assert "$(BIN)/resnet-serve serve --repository $(REPO) --host $(HOST) --port $(PORT)" in make
    assert re.search(r"^HOST \?= 127\.0\.0\.1$", make, re.M) and re.search(
        r"^PORT \?= 8000$", make, re.M
    )


def test_the_readme_tour_runs_as_written(gateway, tmp_path):
    page = dc.Page("README.md", (ROOT / "README.md").read_text())
    steps = dc.walkthrough(page, "A five-minute tour")
    assert [s.lines[0].text for s in steps[:1]] == ["make serve"]  # the gateway above
    ran = 0
    for step in steps[1:]:
        out = ""
        for line in step.lines:
            if line.commands[0].name == "resnet-export":
                continue  # "Your own model": test_your_own_model_exports_as_written
            out = run(line, gateway, tmp_path)
            ran += 1
        if step.output_lang is not None:
            compare(step, out)
    assert ran == 4  # write the digits, classify one, read /metrics, load it
    assert (tmp_path / "bench-out" / "report.json").is_file()


def test_the_api_pages_examples_run_as_written(gateway, demo, tmp_path):
    """Its curl examples (multipart, raw body, JSON), the gRPC example client, the KServe v2
    statistics, and its Python examples (tritonclient over gRPC and HTTP, the Classifier
    stub), on the reader's own images: two held-out digits as seven.png and three.png."""
    shutil.copy(sorted((demo.images / "7").glob("*.png"))[0], tmp_path / "seven.png")
    shutil.copy(sorted((demo.images / "3").glob("*.png"))[0], tmp_path / "three.png")
    page = dc.Page("docs/api.md", (ROOT / "docs" / "api.md").read_text())
    ran = 0
    for step in dc.walkthrough(page, "Serving"):
        out = ""
        for line in step.lines:
            if line.commands[0].name in ("make", "resnet-serve"):
                continue  # `make serve` and `resnet-serve serve`: the gateway above
            out = run(line, gateway, tmp_path)
            ran += 1
            if out.lstrip().startswith("{"):
                json.loads(out)
        if step.output_lang == "json":
            compare(step, out)  # the last example's answer: JSON, top_k 2
    assert ran == 5
    for where, code in dc.python_blocks(page, "Serving"):
        proc = subprocess.run(
            [str(BIN / "python"), "-c", substitute(code, gateway)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"{where}\n{proc.stderr[-3000:]}"
        for shown in re.findall(r"^# (\[\[.*?\]\])", code, re.M):  # an output the docs show
            number = re.compile(r"-?\d+(\.\d+)?")
            assert number.sub("N", shown) in number.sub("N", proc.stdout), (where, proc.stdout)


def test_your_own_model_exports_as_written(tmp_path):
    """The tour's last command on a ResNet-50 checkpoint of the reader's (random weights,
    torchvision's key names)."""
    import torch

    from export.models import build_model

    torch.save(build_model("resnet50", num_classes=1000).state_dict(), tmp_path / "resnet50.pth")
    page = dc.Page("README.md", (ROOT / "README.md").read_text())
    (line,) = [
        line for s in dc.walkthrough(page, "A five-minute tour") for line in s.lines
        if line.commands[0].name == "resnet-export"
    ]  # fmt: skip
    proc = subprocess.run(
        ["bash", "-c", line.text.replace(".venv/bin/", f"{BIN}/")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "published resnet50 version 1 -> model_repository/resnet50" in proc.stdout
