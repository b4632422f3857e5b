"""The chart's pods, run: its gateway Deployment as Helm renders it, played by `podman kube
play` (the chart's env, securityContext, resources, volumes; the model repository on a
named volume standing for the claim), then classifying through it. Then the GPU sidecar
scenario: the gateway and Triton in one pod sharing its memory-backed /dev/shm, with a
stand-in for NVIDIA's Triton image (the CPU tritonserver of the nvidia-pytriton wheel)
started with the chart's Triton container arguments; a request is answered through shared
memory. In both, the chart's `helm test` pod, run, classifies through the gateway pod.

What the test changes in a rendered object, and why: one replica (kube play starts a pod per
replica; each would want the same loopback port), each container port also published on
this machine's 127.0.0.1 (a hostPort: the test's way in; the chart sets none), each
emptyDir given a volume of its own (tests.helpers.containers.played says why), and Triton's
`$(TRITON_ADMIN_KEY)` argument expanded from its Secret, as the kubelet expands it, and the
test pod's URL, which names this machine's loopback instead of the Service. What podman does not
honour is listed in docs/development.md ("Containers and pods")."""

from __future__ import annotations

import json
import shutil
from typing import Any

import httpx
import numpy as np
import pytest

from tests.helpers import containers

API_KEY = "pod-test-key"
STANDIN = "localhost/resnet-serving-triton-standin:test"


def deployment(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = [o for o in objs if o["kind"] == "Deployment"]
    dep["spec"]["replicas"] = 1
    return dep


def container(dep: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def inspect(name: str) -> dict[str, Any]:
    return json.loads(containers.podman("inspect", name).stdout)[0]


def classify(url: str, path, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(
        url + "/v1/classify?top_k=1",
        content=path.read_bytes(),
        headers={"content-type": "image/png", **(headers or {})},
        timeout=30,
    )


@pytest.fixture
def demo_claim(demo):
    """The demo repository on a volume named as the claim the scenario mounts."""
    with containers.volume(demo.repository) as name:
        yield name


def test_the_cpu_scenarios_gateway_pod_classifies(gateway_image, demo, demo_claim, tmp_path):
    values = containers.scenario("default")
    values["modelRepository"]["pvc"]["existingClaim"] = demo_claim
    objs = containers.render_chart(values)
    dep = deployment(objs)
    gateway = container(dep, "gateway")
    assert gateway["image"] == gateway_image  # the chart's default image is what make image tags
    ports = containers.publish_loopback(gateway)
    with containers.played([dep], tmp_path) as (name,):
        url = f"http://127.0.0.1:{ports['http']}"
        containers.wait_ready(url, name)
        (path, expected), *_ = containers.digits_it_gets_right(demo, 1)
        r = classify(url, path)
        assert r.status_code == 200, r.text
        (top,) = r.json()["predictions"][0]
        assert top["index"] == int(np.argmax(expected))
        np.testing.assert_allclose(top["score"], expected.max(), atol=1e-5)

        # The pod's security context and resources, as podman applied them.
        config = inspect(name)
        host = config["HostConfig"]
        assert config["Config"]["User"] == "10001:10001"
        assert host["ReadonlyRootfs"] is True
        assert "no-new-privileges" in host["SecurityOpt"]  # allowPrivilegeEscalation: false
        assert config["EffectiveCaps"] in (None, [])  # capabilities: drop ALL
        assert host["Memory"] == 4 * 2**30 and host["NanoCpus"] == 2 * 10**9
        mounts = {m["Destination"]: m for m in config["Mounts"]}
        assert mounts["/models"]["RW"] is False and mounts["/tmp"]["RW"] is True
        env = dict(e.split("=", 1) for e in config["Config"]["Env"])
        assert {
            e["name"]: e["value"] for e in gateway["env"] if "value" in e
        }.items() <= env.items()
        # The root filesystem refuses writes; /tmp (the emptyDir) takes them.
        wrote = containers.podman(
            "exec", name, "sh", "-c", "touch /opt/x 2>&1; touch /tmp/x && echo tmp-ok"
        )
        assert "Read-only file system" in wrote.stdout and "tmp-ok" in wrote.stdout

        # `helm test`: the chart's test pod, run, classifies through the gateway pod.
        code, out = containers.helm_test(objs, tmp_path, ports["http"])
        assert code == 0 and out.startswith("ok: digits version 1: "), out


@pytest.fixture(scope="module")
def triton_standin() -> str:
    return containers.build_context(containers.ROOT / "tests" / "data" / "triton-standin", STANDIN)


@pytest.fixture
def sidecar_claim(demo, tmp_path):
    """The demo's model republished as flavor python-ort (what the CPU tritonserver runs)."""
    from export.repository import republish

    repo = tmp_path / "repo"
    repo.mkdir()
    republish(demo.model_dir, repo, "python-ort")
    with containers.volume(repo) as name:
        yield name
    shutil.rmtree(repo)


def test_the_sidecar_pod_answers_through_shared_memory(
    gateway_image, triton_standin, demo, sidecar_claim, tmp_path
):
    values = containers.scenario("gpu-sidecar")
    values["modelRepository"]["pvc"]["existingClaim"] = sidecar_claim
    values["gateway"]["config"]["models"] = ["digits"]
    repository, tag = STANDIN.rsplit(":", 1)
    values["triton"]["image"] = {"repository": repository, "tag": tag}
    objs = containers.render_chart(values)
    dep = deployment(objs)
    gateway, triton = container(dep, "gateway"), container(dep, "triton")
    assert triton["command"] == ["tritonserver"] and "--grpc-address=127.0.0.1" in triton["args"]
    ports = {**containers.publish_loopback(gateway), **containers.publish_loopback(triton)}
    # The Secrets the pod reads: the chart's own (Triton's admin key) and the API keys the
    # scenario names as an existing Secret.
    secrets = [o for o in objs if o["kind"] == "Secret"]
    keys = {"metadata": {"name": values["gateway"]["apiKeys"]["existingSecret"]},
            "stringData": {"api-keys": API_KEY}}  # fmt: skip
    (admin,) = [s for s in secrets if "admin-key" in s.get("data", {})]
    import base64

    admin_key = base64.b64decode(admin["data"]["admin-key"]).decode()
    # The kubelet expands $(VAR) in args from the container's env; podman passes it as is.
    triton["args"] = [a.replace("$(TRITON_ADMIN_KEY)", admin_key) for a in triton["args"]]
    with containers.secrets([*secrets, keys]), containers.played([dep], tmp_path) as names:
        (gw_name,) = [n for n in names if n.endswith("-gateway")]
        url = f"http://127.0.0.1:{ports['http']}"
        triton_url = f"http://127.0.0.1:{ports['triton-http']}"
        containers.wait_ready(url, gw_name, pod=names)

        # The regions the gateway made in the pod's /dev/shm, registered with Triton under
        # the admin key the chart restricts the shared-memory protocol to.
        status = httpx.get(
            triton_url + "/v2/systemsharedmemory/status",
            headers={"triton-admin-key": admin_key},
            timeout=10,
        )
        assert status.status_code == 200, status.text
        regions = {r["name"] for r in status.json()}
        assert len(regions) == 4 and all(r.startswith("resnet-serving-") for r in regions)
        in_shm = containers.podman("exec", gw_name, "ls", "/dev/shm").stdout.split()
        assert regions <= set(in_shm)
        refused = httpx.get(triton_url + "/v2/systemsharedmemory/status", timeout=10)
        assert refused.status_code != 200  # restricted: no key, no answer

        (path, expected), *_ = containers.digits_it_gets_right(demo, 1)
        assert classify(url, path).status_code == 401  # the scenario's API keys are on
        before = triton_successes(triton_url)
        r = classify(url, path, {"X-API-Key": API_KEY})
        assert r.status_code == 200, r.text
        (top,) = r.json()["predictions"][0]
        assert top["index"] == int(np.argmax(expected))
        np.testing.assert_allclose(top["score"], expected.max(), atol=1e-4)
        assert triton_successes(triton_url) == before + 1  # Triton ran it

        # `helm test` in the sidecar scenario, API keys on (the pod reads one from the
        # Secret): the chart's test pod, run. (podman enforces no NetworkPolicy: that every
        # scenario's policies admit this pod is tests/deploy/test_chart.py's.)
        code, out = containers.helm_test(objs, tmp_path, ports["http"])
        assert code == 0 and out.startswith("ok: digits version 1: "), out
        assert triton_successes(triton_url) == before + 2


def triton_successes(triton_url: str) -> float:
    stats = httpx.get(triton_url + "/v2/models/digits/stats", timeout=10).json()
    (model,) = stats["model_stats"]
    return model["inference_stats"]["success"]["count"]
