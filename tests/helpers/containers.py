"""podman for the tests: the images built by the project's own script (deploy/image.sh, as
`make image` builds them), containers and pods run with the project's containers.conf and
reached on this machine's loopback only, and removed afterwards."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from service.host.processes import free_port, wait_until
from tests.helpers.paths import CHART, ROOT

if TYPE_CHECKING:
    from tests.helpers.models import Demo

# podman, whatever else is installed: the tests use its kube play, secrets and healthchecks.
# (IMAGE, TARGET and OPENVINO, deploy/image.sh's other settings, come from the tests alone.)
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("IMAGE", "TARGET", "OPENVINO")},
    "ENGINE": "podman",
    "CONTAINERS_CONF": str(ROOT / "deploy" / "podman" / "containers.conf"),
}
# netavark publishes a port with DNAT, which a client on 127.0.0.1 does not get through
# unless the kernel routes loopback traffic (route_localnet); slirp4netns's own port handler
# listens on this machine's loopback instead, and nothing else reaches the container.
NETWORK = "slirp4netns:port_handler=slirp4netns"


def podman(*args: str, timeout: float = 300, check: bool = True, input: str | None = None):
    proc = subprocess.run(
        ["podman", *args], env=ENV, capture_output=True, text=True, timeout=timeout, input=input
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}: {proc.stderr.strip()[-3000:]}")
    return proc


def _image_sh(*args: str, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "image.sh"), *args],
        env={**ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stdout.strip().splitlines()[-1]


def build(target: str = "cpu") -> str:
    """The gateway image as `make image` builds it (the stand-in base made if need be)."""
    return _image_sh("build", env={"TARGET": target})


def build_context(context: Path, tag: str) -> str:
    """An image of the tests' own (``context``'s Dockerfile) on the gateway's base, built by
    the same script with the same access to the package index."""
    return _image_sh("context", str(context), tag)


def running(name: str) -> bool:
    out = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
    return out.stdout.strip() == "true"


def exit_code(name: str) -> int:
    return int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout)


def logs(*names: str, chars: int = 3000) -> str:
    """The last ``chars`` of each container's output, for a failure's message."""
    return "\n".join(
        f"--- {n}:\n" + podman("logs", n, check=False).stderr[-chars:] for n in dict.fromkeys(names)
    )


def wait_ready(url: str, container: str, timeout_s: float = 180, pod: Sequence[str] = ()) -> None:
    """Until ``url``/readyz answers 200; fails with the logs of ``container`` and ``pod``'s
    other containers when it exits or the time is up."""
    import httpx

    def ready() -> bool:
        try:
            return httpx.get(url + "/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def died() -> str | None:
        return None if running(container) else f"{container} exited"

    try:
        wait_until(ready, timeout_s, f"{container} not ready", 0.3, died)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{logs(container, *pod)}") from None


@contextlib.contextmanager
def volume(files: Path | None = None, empty_dir_of: str | None = None) -> Iterator[str]:
    """A named volume (what podman makes of a PersistentVolumeClaim or an emptyDir): a copy
    of ``files`` (their modes kept), its root 0755; or, with ``empty_dir_of`` (an image),
    an empty one writable by every uid, as Kubernetes makes an emptyDir (0777). podman
    gives a new volume the owner and mode of the mount point it first lands on (0755 root
    for /dev/shm), so that one is mounted once, in a throwaway container, before its mode
    is set."""
    name = f"resnet-test-{uuid.uuid4().hex[:8]}"
    podman("volume", "create", name)
    try:
        root = Path(podman("volume", "inspect", "--format", "{{.Mountpoint}}", name).stdout.strip())
        if files is not None:
            subprocess.run(["cp", "-a", f"{files}/.", str(root)], check=True)
        if empty_dir_of is not None:
            podman("run", "--rm", "--entrypoint", "true", "-v", f"{name}:/x", empty_dir_of)
        root.chmod(0o777 if empty_dir_of else 0o755)
        yield name
    finally:
        podman("volume", "rm", "--force", name, check=False)


@contextlib.contextmanager
def secrets(objs: Sequence[dict[str, Any]]) -> Iterator[None]:
    """Kubernetes Secrets as podman secrets of the same names, which `kube play` resolves
    secretKeyRefs against. podman 4.3 reads a secret as a JSON map of base64 values: handed
    the Secret object itself (in the played YAML or as a secret), it refuses to start the pod."""
    names = []
    try:
        for obj in objs:
            data = dict(obj.get("data") or {})
            for key, value in (obj.get("stringData") or {}).items():
                data[key] = base64.b64encode(value.encode()).decode()
            name = obj["metadata"]["name"]
            podman("secret", "rm", name, check=False)
            podman("secret", "create", name, "-", input=json.dumps(data))
            names.append(name)
        yield
    finally:
        for name in names:
            podman("secret", "rm", name, check=False)


def publish_loopback(container: dict[str, Any]) -> dict[str, int]:
    """Each of the container's ports also on a free port of this machine's 127.0.0.1 (a
    hostPort, which the chart never sets: how the test reaches the pod); port name -> port."""
    ports = {}
    for port in container["ports"]:
        port["hostIP"], port["hostPort"] = "127.0.0.1", free_port()
        ports[port["name"]] = port["hostPort"]
    return ports


@contextlib.contextmanager
def played(
    objs: Sequence[dict[str, Any]], tmp: Path, network: str = NETWORK
) -> Iterator[list[str]]:
    """`podman kube play` of ``objs`` (Deployments, Pods); yields the names of the containers
    it started, and tears the pods down (`kube down`) afterwards.

    podman makes an emptyDir a named volume: shared by every pod that names it, root-owned
    0755 where Kubernetes gives each pod its own, writable by any uid (0777). Each one here
    gets a volume of its own, made as Kubernetes makes it (see ``volume``)."""
    with contextlib.ExitStack() as stack:
        for obj in objs:
            pod = obj["spec"]["template"]["spec"] if obj["kind"] == "Deployment" else obj["spec"]
            renamed = {}
            for vol in pod.get("volumes", []):
                if "emptyDir" in vol:
                    image = pod["containers"][0]["image"]
                    made = stack.enter_context(volume(empty_dir_of=image))
                    renamed[vol["name"]] = vol["name"] = made
            for container in pod["containers"]:
                for mount in container.get("volumeMounts", []):
                    mount["name"] = renamed.get(mount["name"], mount["name"])
        spec = tmp / f"play-{uuid.uuid4().hex[:8]}.yaml"  # one per play: they may nest
        spec.write_text(yaml.safe_dump_all(objs))
        stack.callback(podman, "kube", "down", str(spec), check=False, timeout=120)
        podman("kube", "play", "--network", network, str(spec), timeout=300)
        # A Deployment's (one replica) pod is <name>-pod-0; a Pod keeps its name.
        pods = [
            o["metadata"]["name"] + ("-pod-0" if o["kind"] == "Deployment" else "") for o in objs
        ]
        names = podman(
            "ps", "-a", "--format", "{{.Names}}", *(f"--filter=pod={p}" for p in pods)
        ).stdout.split()
        yield [n for n in names if not n.endswith("-infra")]


def helm_test(objs: Sequence[dict[str, Any]], tmp: Path, http_port: int) -> tuple[int, str]:
    """The chart's `helm test` pod, played: its image, command, securityContext and env
    (API_KEY from the Secret, which ``secrets`` must hold), reaching the gateway's HTTP port
    published on this machine's 127.0.0.1 as ``http_port`` (podman has no Service and no
    cluster DNS: the pod's URL names this machine's loopback, which slirp4netns shows the pod
    as 10.0.2.2). Returns its exit code and output, once it has exited."""
    (pod,) = [copy.deepcopy(o) for o in objs if o["kind"] == "Pod"]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    (url,) = [e for e in container["env"] if e["name"] == "URL"]
    url["value"] = f"http://10.0.2.2:{http_port}"
    with played([pod], tmp, "slirp4netns:allow_host_loopback=true") as (name,):
        wait_until(lambda: not running(name), 180, f"{name} still running", 0.3)
        out = podman("logs", name, check=False)
        return exit_code(name), out.stdout + out.stderr


def render_chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects for ``values`` (release "rel", namespace "ml"), by Helm's engine."""
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        out = chart.render(values=values, name="rel", namespace="ml")
    return [
        d for p, t in out.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d
    ]


def scenario(name: str) -> dict[str, Any]:
    """One of the chart's ci/ scenarios' values."""
    return yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def digits_it_gets_right(demo: Demo, n: int) -> list[tuple[Path, np.ndarray]]:
    """The first ``n`` held-out digits that this machine's ONNX Runtime, fed through the
    contract, classifies as their label, with its probabilities: what a container serving
    the same file must answer."""
    import onnxruntime as ort

    from service.dataplane.preprocess import preprocess

    session = ort.InferenceSession(
        str(demo.model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    out = []
    for path, label in demo.pngs():
        x = preprocess(path.read_bytes(), demo.contract)[None]
        (logits,) = session.run(None, {"input": x})[0]
        if int(logits.argmax()) == label:
            e = np.exp(logits - logits.max())
            out.append((path, e / e.sum()))
        if len(out) == n:
            return out
    raise AssertionError("the demo model gets too few digits right")
