"""What the Helm chart tells the processes to do, done by the real processes: Triton started
with the chart's own flags, the `helm test` script against a real gateway, and the
gateway's Triton target spreading calls over several servers (the chart's headless Service
resolves to every Triton pod). No cluster here: the processes run on loopback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from service.host.processes import GatewayProcess
from tests.helpers.containers import render_chart
from tests.helpers.images import image_bytes
from tests.helpers.metrics import scrape
from tests.helpers.triton import start_real_triton

ADMIN_KEY = "s3cret-admin-key"
# Flags service.tools.triton_launcher sets for loopback ports and the local repository, and for
# the model control mode (control="explicit": the chart's --model-control-mode=explicit
# --load-model=*).
LAUNCHER_FLAGS = (
    "--model-repository",
    "--http-port",
    "--grpc-port",
    "--metrics-port",
    "--model-control-mode",
    "--load-model",
    "--strict-readiness",
    "--exit-on-error",
    "--allow-metrics",
)


def pod_container(objs: list[dict[str, Any]], kind: str, component: str) -> dict[str, Any]:
    (obj,) = [
        o
        for o in objs
        if o["kind"] == kind and o["metadata"]["labels"]["app.kubernetes.io/component"] == component
    ]
    spec = obj["spec"]["template"]["spec"] if kind == "Deployment" else obj["spec"]
    return spec["containers"][0]


@pytest.fixture(scope="module")
def chart_triton(triton_repo, tmp_path_factory):
    """A real tritonserver started with the chart's hardening flags."""
    args = pod_container(render_chart({"triton": {"enabled": True}}), "Deployment", "triton")[
        "args"
    ]
    extra = tuple(
        a.replace("$(TRITON_ADMIN_KEY)", ADMIN_KEY)
        for a in args
        if not a.startswith(LAUNCHER_FLAGS)
    )
    assert any(a.startswith("--grpc-restricted-protocol=") for a in extra)
    assert {"--model-control-mode=explicit", "--load-model=*"} <= set(args)
    server = start_real_triton(
        triton_repo,
        tmp_path_factory.mktemp("ct") / "triton.log",
        extra_args=extra,
        control="explicit",
    )
    yield server
    server.stop()


def test_triton_accepts_the_charts_flags_and_restricts_shared_memory(chart_triton, tiny):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    base = f"http://127.0.0.1:{chart_triton.http_port}"
    # Shared memory and repository control answer only to the admin key.
    for path in ("/v2/systemsharedmemory/status", "/v2/repository/index"):
        method = httpx.get if path.endswith("status") else httpx.post
        refused = method(base + path)
        assert refused.status_code == 403, (path, refused.status_code, refused.text)
        allowed = method(base + path, headers={"triton-admin-key": ADMIN_KEY})
        assert allowed.status_code == 200, (path, allowed.status_code, allowed.text)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{chart_triton.grpc_port}")
    with pytest.raises(InferenceServerException, match="This protocol is restricted"):
        client.get_system_shared_memory_status()
    # Over gRPC Triton prefixes the header: triton-grpc-protocol-<key>.
    admin = {"triton-grpc-protocol-triton-admin-key": ADMIN_KEY}
    assert client.get_system_shared_memory_status(headers=admin) is not None
    # Inference, metadata and health stay open: what the gateway needs.
    assert client.is_server_ready() and client.is_model_ready(tiny.name)
    x = np.zeros((1, *tiny.contract.input_shape), dtype=np.float32)
    inp = grpcclient.InferInput(tiny.contract.input_name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = client.infer(tiny.name, [inp]).as_numpy(tiny.contract.output_name)
    assert out.shape == (1, tiny.contract.num_classes)


async def test_the_gateway_loads_into_the_charts_triton_with_the_key_the_chart_gives_it(
    chart_triton, triton_repo, tiny
):
    """The chart gives the gateway Triton's admin key (Triton's own Secret key): its load
    requests pass Triton's restriction of repository control; without the key they do not."""
    from service.backends.triton.backend import TritonBackend
    from service.model.repository import RepositoryError, load_spec

    objs = render_chart({"triton": {"enabled": True}})
    gateway = {e["name"]: e for e in pod_container(objs, "Deployment", "gateway")["env"]}
    triton = {e["name"]: e for e in pod_container(objs, "Deployment", "triton")["env"]}
    given = gateway["RESNET_SERVE_TRITON_ADMIN_KEY"]
    assert "value" not in given and given["valueFrom"] == triton["TRITON_ADMIN_KEY"]["valueFrom"]
    spec = load_spec(triton_repo / tiny.name)
    x = np.zeros((1, *tiny.contract.input_shape), dtype=np.float32)

    async def load(key: str | None) -> None:
        backend = TritonBackend(chart_triton.grpc_url, admin_key=key)
        try:
            await backend.start([])
            await backend.load(spec)  # Triton loads the version anew: a load request
            assert (await backend.infer(spec, x, 30)).shape == (1, tiny.contract.num_classes)
        finally:
            await backend.close()

    with pytest.raises(RepositoryError, match="needs its admin key"):
        await load(None)
    await load(ADMIN_KEY)


def run_helm_test(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    objs = render_chart({"gateway": {"apiKeys": {"keys": ["k1"]}}})
    c = pod_container(objs, "Pod", "test")
    assert c["command"] == ["python", "-c"]
    return subprocess.run(
        [sys.executable, "-c", *c["args"]], env=env, capture_output=True, text=True, timeout=60
    )


def test_helm_test_pod_classifies_through_a_real_gateway(tiny, tmp_path):
    gw = GatewayProcess.start(
        tmp_path / "gw.log",
        "--repository",
        str(tiny.repository),
        env={"RESNET_SERVE_API_KEYS": "k1,k2"},
    )
    try:
        ok = run_helm_test({"URL": gw.url, "API_KEY": "k2,k1"})
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert ok.stdout.startswith(f"ok: {tiny.name} version 1: ")
        assert scrape(gw.url, "resnet_serve_images_total", model=tiny.name) == 1
        wrong = run_helm_test({"URL": gw.url, "API_KEY": "nope"})
        assert wrong.returncode == 1 and "401" in wrong.stderr, wrong.stderr
        assert len(wrong.stderr.strip().splitlines()) == 1  # one line, no traceback
    finally:
        gw.stop()
    gone = run_helm_test({"URL": gw.url, "API_KEY": "k1"})
    assert gone.returncode == 1 and gone.stderr.startswith("FAIL: "), gone.stderr


def test_gateway_spreads_triton_calls_over_every_address(tiny, tmp_path):
    """The chart points the gateway at a headless Service (every Triton pod's address); the
    gateway must balance calls over them, not pin its one channel to the first. Two
    KServe v2 gRPC servers stand in for two Triton pods (the gateway speaks Triton's
    protocol, and counts what it serves)."""
    upstreams = [
        GatewayProcess.start(
            tmp_path / f"up{i}.log", "--repository", str(tiny.repository), grpc=True
        )
        for i in range(2)
    ]
    front = None
    try:
        target = "ipv4:" + ",".join(u.grpc_target for u in upstreams)
        front = GatewayProcess.start(
            tmp_path / "front.log",
            "--repository",
            str(tiny.repository),
            "--backend",
            "triton",
            "--triton-url",
            target,
        )
        png = image_bytes()

        def served() -> list[float]:
            return [scrape(u.url, "resnet_serve_images_total", model=tiny.name) for u in upstreams]

        warm = served()  # the front's warm-up batches, timed through the upstreams at start
        for _ in range(20):
            r = httpx.post(
                f"{front.url}/v1/models/{tiny.name}/classify",
                content=png,
                headers={"content-type": "image/png"},
            )
            assert r.status_code == 200, r.text
        served_now = [n - w for n, w in zip(served(), warm, strict=True)]
        assert sum(served_now) == 20
        assert min(served_now) >= 5, f"calls not spread over both servers: {served_now}"
    finally:
        for gw in [*upstreams, *([front] if front else [])]:
            gw.stop()


def test_sidecar_mode_the_gateway_and_triton_share_memory_as_the_chart_runs_them(
    triton_repo, tiny, tmp_path
):
    """The chart's sidecar pod, run as its two processes: Triton with the sidecar
    container's flags (gRPC on loopback, shared memory restricted to the admin key), the
    gateway with the environment the chart gives it. The gateway registers its regions
    with the key, answers through them, and releases them when it stops (SIGTERM, as the
    kubelet sends it)."""
    from tests.helpers.triton import registered

    objs = render_chart({"triton": {"enabled": True, "sidecar": {"enabled": True}}})
    (pod,) = [o for o in objs if o["kind"] == "Deployment"]
    containers = {c["name"]: c for c in pod["spec"]["template"]["spec"]["containers"]}
    args = containers["triton"]["args"]
    assert "--grpc-address=127.0.0.1" in args
    extra = tuple(
        a.replace("$(TRITON_ADMIN_KEY)", ADMIN_KEY)
        for a in args
        if not a.startswith(LAUNCHER_FLAGS)
    )
    triton = start_real_triton(
        triton_repo, tmp_path / "triton.log", extra_args=extra, control="explicit"
    )
    chart_env = {e["name"]: e.get("value") for e in containers["gateway"]["env"]}
    assert chart_env["RESNET_SERVE_TRITON_URL"].startswith("127.0.0.1:")
    gw = None
    try:
        gw = GatewayProcess.start(
            tmp_path / "gw.log",
            "--repository",
            str(triton_repo),
            "--backend",
            "triton",
            "--triton-url",
            triton.grpc_url,  # the launcher's free port on loopback, where the chart has 8101
            env={
                "RESNET_SERVE_TRITON_SHARED_MEMORY": chart_env["RESNET_SERVE_TRITON_SHARED_MEMORY"],
                "RESNET_SERVE_TRITON_ADMIN_KEY": ADMIN_KEY,  # what the chart's secretKeyRef gives
            },
        )
        regions = registered(triton, ADMIN_KEY)
        assert len(regions) == 4 and all(r.startswith("resnet-serving-") for r in regions)
        assert {p.name for p in Path("/dev/shm").iterdir()} >= regions
        before = scrape(gw.url, "resnet_serve_images_total", model=tiny.name)
        r = httpx.post(
            f"{gw.url}/v1/models/{tiny.name}/classify",
            content=image_bytes(),
            headers={"content-type": "image/png"},
        )
        assert r.status_code == 200, r.text
        (top,) = r.json()["predictions"]  # one image; what its values are is tested with
        assert top and top[0]["label"]  # ONNX Runtime's answer in test_triton_lifecycle
        assert scrape(gw.url, "resnet_serve_images_total", model=tiny.name) == before + 1
        assert gw.stop() == 0
        gw = None
        assert registered(triton, ADMIN_KEY) == set()
        assert not {p.name for p in Path("/dev/shm").iterdir()} & regions
    finally:
        if gw is not None:
            gw.stop()
        triton.stop()
