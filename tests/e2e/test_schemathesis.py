"""schemathesis against the running gateway's own OpenAPI document: responses match the
schema (status, content type, body), undeclared methods get a 405 with Allow, API keys are
enforced where declared, and nothing it sends is a server error of ours. Bounded: a fixed
seed and a few examples per operation (``SCHEMATHESIS_EXAMPLES=N`` explores more)."""

from __future__ import annotations

import os

import httpx

from service.host.processes import GatewayProcess
from tests.helpers.cli import run_cli


def test_the_api_keeps_its_own_openapi_promises(tiny, tmp_path):
    gw = GatewayProcess.start(
        tmp_path / "gw.log",
        "--repository",
        str(tiny.repository),
        env={"RESNET_SERVE_API_KEYS": "k"},
    )
    try:
        proc = run_cli(
            "schemathesis",
            "run",
            gw.url + "/openapi.json",
            "--max-examples",
            os.environ.get("SCHEMATHESIS_EXAMPLES", "15"),
            "--seed",
            "1",
            # Repeatable: no examples replayed from earlier runs on this machine
            # (.hypothesis/), which the seed alone does not rule out.
            "--generation-database",
            "none",
            "-H",
            "X-API-Key: k",
            # Arbitrary bytes are schema-valid images ("format: binary"), and an arbitrary
            # timeout may be shorter than the model needs (a documented 504): judged below.
            "--exclude-checks",
            "positive_data_acceptance,not_a_server_error",
            timeout=600,
        )
        metrics = httpx.get(gw.url + "/metrics").text
        output = gw.output()
    finally:
        gw.stop()
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "Tested: 24" in proc.stdout  # every operation
    # No error of ours: nothing answered 500, nothing logged as unexpected.
    assert 'status="500"' not in metrics and 'reason="internal"' not in metrics
    assert "Traceback" not in output and "unhandled error" not in output
