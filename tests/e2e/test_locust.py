"""deploy/loadtest/locustfile.py run by locust itself, headless for 3 s, against a real
gateway on the tiny model (API keys on): every route gets requests and none fails, and the
gateway's own /metrics counted at least what locust reported, per route; a failure is
named by status and the gateway's error code. Bad settings stop locust at load time with
one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.host.processes import BIN, GatewayProcess
from tests.helpers.images import image_bytes
from tests.helpers.paths import ROOT

LOCUSTFILE = ROOT / "deploy" / "loadtest" / "locustfile.py"
KEY = "locust-test-key"
USERS = 4


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("locust-images")
    for i in range(3):
        (folder / f"{i}.png").write_bytes(image_bytes(size=(40 + i, 36), seed=i))
    (folder / "sub").mkdir()
    (folder / "sub" / "3.jpg").write_bytes(image_bytes("JPEG", seed=3))
    (folder / ".hidden").write_bytes(b"never sent")
    return folder


@pytest.fixture(scope="module")
def gateway(tiny, tmp_path_factory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess.start(
        tmp_path_factory.mktemp("locust-gw") / "gw.log",
        "--repository",
        str(tiny.repository),
        env={"RESNET_SERVE_API_KEYS": KEY},
    )
    yield gw
    gw.stop()


def locust(
    host: str, env: dict[str, str], *extra: str, seconds: int = 3
) -> subprocess.CompletedProcess[str]:
    cmd = [str(BIN / "locust"), "-f", str(LOCUSTFILE), "--headless", "--host", host]
    cmd += ["-u", str(USERS), "-r", str(USERS), "-t", f"{seconds}s", *extra]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        # Only the settings given: none of the caller's RESNET_* leak in.
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RESNET_")}, **env},
        cwd=ROOT,
    )


def requests_by_route(url: str) -> dict[str, float]:
    """route -> resnet_serve_requests_total summed over outcomes."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == "resnet_serve_requests_total":
                out[s.labels["route"]] = out.get(s.labels["route"], 0.0) + s.value
    return out


def stats(proc: subprocess.CompletedProcess[str]) -> dict[tuple[str, str], dict]:
    """(method, name) -> locust's final numbers, as --json prints them. Not the --csv files:
    locust rewrites those once a second and not at exit, so they miss the run's last second
    (locust issue #2299)."""
    try:
        entries = json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"no stats from locust:\n{proc.stderr[-3000:]}") from None
    return {(e["method"], e["name"]): e for e in entries}


def error_report(stderr: str) -> set[tuple[str, str, str]]:
    """(method, name, error) of each line of the error table locust prints at exit."""
    assert "Error report" in stderr, stderr[-3000:]
    table = stderr.split("Error report", 1)[1]
    lines = re.finditer(r"^\d+ +(GET|POST) (.+?): (.+?) *$", table, re.MULTILINE)
    return {(m[1], m[2], m[3]) for m in lines}


@pytest.mark.parametrize(
    ("model", "classify_route"),
    [(None, "/v1/classify"), ("tiny", "/v1/models/{model}/classify")],
    ids=["default-model", "named-model"],
)
def test_every_route_served_without_failure_and_counted_by_the_gateway(
    gateway, images, model, classify_route
):
    env = {"RESNET_IMAGES": str(images), "RESNET_API_KEY": KEY}
    if model:
        env["RESNET_MODEL"] = model
    before = requests_by_route(gateway.url)
    proc = locust(gateway.url, env, "--json")
    after = requests_by_route(gateway.url)
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = stats(proc)
    multipart = f"{classify_route} (multipart, 2 images)"
    assert set(rows) == {
        ("POST", classify_route),
        ("POST", multipart),
        ("POST", "/v2/models/{model}/infer"),
        ("GET", "/v1/models"),
    }  # route templates, never raw paths
    for key, row in rows.items():
        assert row["num_requests"] > 0 and row["num_failures"] == 0, key
    assert "Error report" not in proc.stderr

    # The gateway counted every request locust reported, plus at most the ones in flight
    # when locust stopped (a user has one request out at a time).
    for method, route, names in [
        ("POST", classify_route, (classify_route, multipart)),
        ("POST", "/v2/models/{model}/infer", ("/v2/models/{model}/infer",)),
        ("GET", "/v1/models", ("/v1/models",)),
    ]:
        served = after.get(route, 0) - before.get(route, 0)
        reported = sum(rows[method, name]["num_requests"] for name in names)
        assert reported <= served <= reported + USERS, (method, route, served, reported)


def test_failures_are_named_by_status_and_error_code(gateway, images):
    """A model the gateway does not serve: every classification fails, each named by the
    status and the gateway's code (both error dialects, /v1 and /v2); the model list works."""
    env = {"RESNET_IMAGES": str(images), "RESNET_API_KEY": KEY, "RESNET_MODEL": "nope"}
    proc = locust(gateway.url, env, "--json", seconds=1)
    assert proc.returncode == 1  # locust's own verdict on a run with failures
    rows = stats(proc)
    for (method, name), row in rows.items():
        failed = row["num_requests"] if method == "POST" else 0
        assert row["num_requests"] > 0 and row["num_failures"] == failed, name
    assert error_report(proc.stderr) == {
        ("POST", "/v1/models/{model}/classify", "404 model_not_found"),
        ("POST", "/v1/models/{model}/classify (multipart, 2 images)", "404 model_not_found"),
        ("POST", "/v2/models/{model}/infer", "404 model_not_found"),
    }


def test_a_missing_api_key_is_a_401_failure(gateway, images):
    env = {"RESNET_IMAGES": str(images), "RESNET_API_KEY": "", "RESNET_WEIGHT_CLASSIFY": "0"}
    env |= {"RESNET_WEIGHT_MULTIPART": "0", "RESNET_WEIGHT_KSERVE": "0"}
    proc = locust(gateway.url, env, seconds=1)
    assert proc.returncode == 1
    assert error_report(proc.stderr) == {("GET", "/v1/models", "401 unauthorized")}


@pytest.mark.parametrize(
    ("folder", "weights", "message"),
    [
        ("", {}, "set RESNET_IMAGES to a folder of image files"),
        ("/nonexistent/images", {}, "RESNET_IMAGES /nonexistent/images: no such directory"),
        ("{empty}", {}, "RESNET_IMAGES {empty}: holds no files"),
        ("{images}", {"KSERVE": "-1"}, "RESNET_WEIGHT_KSERVE='-1': expected a whole number >= 0"),
        (
            "{images}",
            dict.fromkeys(("CLASSIFY", "MULTIPART", "KSERVE", "MODELS"), "0"),
            "every RESNET_WEIGHT_* is 0: nothing to send",
        ),
    ],
    ids=["unset", "missing", "empty", "negative-weight", "all-weights-0"],
)
def test_bad_settings_stop_locust_with_one_line(images, tmp_path, folder, weights, message):
    where = {"empty": tmp_path, "images": images}
    env = {"RESNET_IMAGES": folder.format(**where)}
    env |= {f"RESNET_WEIGHT_{name}": value for name, value in weights.items()}
    # Port 9 (discard) is never reached: locust stops while it loads the file.
    proc = locust("http://127.0.0.1:9", env, seconds=1)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"locustfile: {message.format(**where)}"]
