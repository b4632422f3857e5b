"""The gateway image, built by `make image`'s script and run with podman as the chart runs
it: read-only root, /tmp a tmpfs, uid 10001, the trained demo repository mounted read-only
at /models. It answers over REST and gRPC as this machine's ONNX Runtime does, its
HEALTHCHECK passes, it holds no torch and nothing of the build machine's pip settings, and
SIGTERM during a request answers the request and exits 0 before podman's SIGKILL."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import threading

import grpc
import httpx
import numpy as np
import pytest

from service.host.processes import free_port, free_ports, wait_until
from service.transports.grpc import classifier_pb2 as pb
from service.transports.grpc import classifier_pb2_grpc as pbg
from tests.helpers import containers
from tests.helpers.metrics import scrape

UID = "10001:10001"  # the Dockerfile's USER and the chart's runAsUser
DRAIN_S = 10  # the chart's gateway.config.drainSeconds
GRACE_S = 25  # the chart's terminationGracePeriodSeconds: podman stop's SIGKILL after it


@pytest.fixture(scope="module")
def container(gateway_image, demo, tmp_path_factory):
    """The image running as the chart runs it; yields (name, REST url, gRPC target)."""
    models = tmp_path_factory.mktemp("image") / "models"
    shutil.copytree(demo.repository, models)  # the modes export gave it: 0755 directories
    models.chmod(0o755)  # what a volume's root is
    name = f"resnet-image-test-{free_port()}"
    port, grpc_port = free_ports(2)
    containers.podman(
        "run", "--detach", "--name", name,
        "--read-only", "--tmpfs", "/tmp", "--user", UID,
        "--network", containers.NETWORK,
        "--publish", f"127.0.0.1:{port}:8000", "--publish", f"127.0.0.1:{grpc_port}:50051",
        "--volume", f"{models}:/models:ro",
        "--env", f"RESNET_SERVE_DRAIN_SECONDS={DRAIN_S}",
        gateway_image,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        containers.wait_ready(url, name)
        yield name, url, f"127.0.0.1:{grpc_port}"
    finally:
        containers.podman("rm", "--force", "--time", "0", name, check=False)


def test_the_image_classifies_digits_over_rest_and_grpc_as_onnx_runtime_does(container, demo):
    name, url, target = container
    config = json.loads(containers.podman("inspect", name).stdout)[0]
    assert config["Config"]["User"] == UID and config["HostConfig"]["ReadonlyRootfs"] is True

    for path, expected in containers.digits_it_gets_right(demo, 3):
        r = httpx.post(
            url + "/v1/classify?top_k=3", content=path.read_bytes(),
            headers={"content-type": "image/png"}, timeout=30,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        rest = r.json()["predictions"][0]
        assert [p["index"] for p in rest] == list(np.argsort(-expected)[:3])
        np.testing.assert_allclose(
            [p["score"] for p in rest], np.sort(expected)[::-1][:3], atol=1e-5
        )
        with grpc.insecure_channel(target) as channel:
            answer = pbg.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[path.read_bytes()], top_k=3), timeout=30
            )
        assert [(p.index, p.label) for p in answer.results[0].predictions] == [
            (p["index"], p["label"]) for p in rest
        ]


def test_the_images_healthcheck_passes(container):
    name, _, _ = container
    checked = containers.podman("healthcheck", "run", name, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_image_holds_no_torch_and_nothing_of_the_build_machines_pip(gateway_image):
    found = containers.podman(
        "run", "--rm", "--entrypoint", "python", gateway_image, "-c",
        "import importlib.util as u; print([m for m in ('torch', 'export') if u.find_spec(m)])",
    )  # fmt: skip
    assert found.stdout.strip() == "[]"
    # pip's settings came in as build secrets: no file, no layer, no variable keeps them.
    leftovers = containers.podman(
        "run", "--rm", "--entrypoint", "sh", gateway_image, "-c",
        "find / -xdev \\( -name pip.conf -o -name pip-ca.crt -o -path '*/xdg/pip' \\) -print;"
        " ls -A /run/secrets 2>/dev/null; env | grep '^PIP_' || true",
    )  # fmt: skip
    assert leftovers.stdout.strip() == ""
    history = containers.podman(
        "history", "--no-trunc", "--format", "{{.CreatedBy}}", gateway_image
    )
    assert "cert =" not in history.stdout and "index-url" not in history.stdout


def test_sigterm_during_a_request_answers_it_and_exits_0_before_the_kill(container, demo):
    """The request is held open (half its body sent) until the gateway has begun draining,
    so SIGTERM surely lands during it: it is answered, and the process exits by itself
    (0) before `podman stop` would SIGKILL it (137) after the chart's grace period."""
    name, url, _ = container
    body = containers.digits_it_gets_right(demo, 1)[0][0].read_bytes()
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: gateway\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body[: len(body) // 2]
        )
        # The gateway counts a request in flight once its app has it: this one, and the scrape.
        wait_until(lambda: scrape(url, "resnet_serve_inflight_requests") >= 2, 30, "not in flight")
        stopped: list[int] = []
        stopper = threading.Thread(
            target=lambda: stopped.append(
                containers.podman(
                    "stop", "--time", str(GRACE_S), name, timeout=GRACE_S + 60
                ).returncode
            )
        )
        stopper.start()
        wait_until(
            lambda: httpx.get(url + "/readyz", timeout=5).status_code == 503, 30, "not draining"
        )
        conn.sendall(body[len(body) // 2 :])
        reply = http.client.HTTPResponse(conn)
        reply.begin()
        answer = reply.read()
    stopper.join(GRACE_S + 90)
    assert reply.status == 200, answer[:500]
    assert json.loads(answer)["predictions"][0]
    assert stopped == [0]
    logs = containers.podman("logs", name).stderr
    assert containers.exit_code(name) == 0, logs[-3000:]
    assert "sizing threads for" in logs
    # A write the read-only image refuses shows up as a warning (ONNX Runtime's telemetry,
    # had the image not turned it off, warns that it cannot persist its device id in HOME).
    assert "[W:onnxruntime" not in logs and "Permission denied" not in logs, logs[-3000:]
    assert "Traceback" not in logs, logs[-3000:]
