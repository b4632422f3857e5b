"""The gateway image's command, run for real without a Docker engine: the final stage's
ENV, ENTRYPOINT + CMD and HEALTHCHECK, read from the Dockerfile and run from this venv as
the image's USER (uid/gid 10001), with an unwritable HOME and working directory and only
TMPDIR writable, as under a read-only root filesystem.

Mapped, and only these: the image's venv (/opt/venv) is this venv; /models, /tmp and the
ports are a copy of the tiny model, a fresh directory and free ports. When this test runs
as root, the process gets the image's uid/gid through `setpriv`; if that uid cannot reach
this interpreter (it lives under /root, mode 0700, on the build machines), it also keeps
CAP_DAC_READ_SEARCH, which lets it read any file and write none: what is written is still
what that uid may write."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.processes import GatewayProcess, free_port, wait_until
from tests.conftest import ROOT, image_bytes
from tests.deploy.dockerfile import Dockerfile, duration_s

IMAGE = Dockerfile(ROOT / "Dockerfile")
CONFIG = IMAGE.config(IMAGE.final)
#: PATH of the python base image, behind the ENV's `$PATH`.
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _ids() -> tuple[int, int]:
    assert CONFIG.user is not None
    uid, gid = CONFIG.user.split(":")
    return int(uid), int(gid)


def as_image_user(argv: list[str]) -> list[str]:
    """``argv`` run as the image's uid/gid (when we are root; else as ourselves, already
    unprivileged), with no supplementary groups."""
    return [*_user_prefix(), *argv]


@functools.cache
def _user_prefix() -> list[str]:
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to run the gateway as the image's user")
    uid, gid = _ids()
    prefix = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    # Can that uid run this interpreter with its own standard library? (Where it cannot
    # read it, Python may start anyway, on another installation's library.)
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import os, service.cli; print(os.__file__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0 or probe.stdout.strip() != os.__file__:
        prefix += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
        print(f"uid {uid} cannot read {sys.executable}'s files: it keeps CAP_DAC_READ_SEARCH")
    return prefix


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-traversable directory (pytest's own tmp dirs are 0700, closed to the uid)."""
    path = Path(tempfile.mkdtemp(prefix="resnet-image-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def image_env(models: Path, tmp: Path, home: Path, port: int, grpc_port: int) -> dict[str, str]:
    env = dict(CONFIG.env)
    venv = env.pop("VIRTUAL_ENV")
    # What the mapping replaces is what the Dockerfile says, or the mapping is wrong.
    assert (env["RESNET_SERVE_REPOSITORY"], env["HOME"], env["TMPDIR"]) == ("/models",) + (
        "/tmp",
    ) * 2
    env.update(
        VIRTUAL_ENV=sys.prefix,
        PATH=env["PATH"].replace(venv, sys.prefix).replace("$PATH", BASE_PATH),
        RESNET_SERVE_REPOSITORY=str(models),
        HOME=str(home),
        TMPDIR=str(tmp),
        RESNET_SERVE_PORT=str(port),
        RESNET_SERVE_GRPC_PORT=str(grpc_port),
    )
    return env


def resolve(argv: list[str], env: dict[str, str]) -> list[str]:
    """argv[0] looked up on the image's PATH, as the container runtime does; it must be
    this venv's (the image's venv), not some other install."""
    found = shutil.which(argv[0], path=env["PATH"])
    assert found is not None, f"{argv[0]} not on the image's PATH {env['PATH']}"
    assert Path(found).parent == Path(sys.prefix) / "bin", found
    return [found, *argv[1:]]


def written_by(uid: int, skip: Path) -> list[str]:
    """Entries owned by ``uid`` in the places a process could write to behind TMPDIR's back."""
    out = []
    for place in (Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")):
        if place.is_dir():
            out += [
                str(p)
                for p in place.iterdir()
                if p.lstat().st_uid == uid and not skip.is_relative_to(p)
            ]
    return out


def test_image_command_serves_as_its_user_and_the_healthcheck_follows(tiny, base):
    assert CONFIG.healthcheck is not None
    options, health_argv = CONFIG.healthcheck
    uid, gid = _ids()
    root = os.geteuid() == 0

    models = base / "models"  # read-only for the uid, as a mounted volume would be
    shutil.copytree(tiny.repository, models)
    for path in (models, *models.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    tmp, home, cwd = base / "tmp", base / "home", base / "cwd"
    for d in (tmp, home, cwd):
        d.mkdir()
    home.chmod(0o555)
    cwd.chmod(0o555)
    if root:
        os.chown(tmp, uid, gid)
    tmp.chmod(0o700)

    port, grpc_port = free_port(), free_port()
    env = image_env(models, tmp, home, port, grpc_port)
    command = as_image_user(resolve(CONFIG.command, env))
    health = as_image_user(resolve(health_argv, env))
    timeout = duration_s(options["timeout"])

    log = base / "gateway.log"
    fh = log.open("wb")
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
    gw = GatewayProcess(proc, f"http://127.0.0.1:{port}", grpc_port, log, fh)
    try:

        def ready() -> bool:
            try:
                return httpx.get(gw.url + "/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 120, "gateway not ready", 0.2, gw.died)
        status = Path(f"/proc/{proc.pid}/status").read_text()
        ids = {line.split(":")[0]: line.split()[1:] for line in status.splitlines()}
        if root:
            assert ids["Uid"] == [str(uid)] * 4 and ids["Gid"] == [str(gid)] * 4
            assert ids["Groups"] == []

        checked = subprocess.run(health, env=env, cwd=cwd, timeout=timeout, capture_output=True)
        assert checked.returncode == 0, checked.stderr.decode()[-2000:]

        # The real work, under the same constraints: decoding threads, ONNX Runtime, gRPC.
        reply = httpx.post(
            gw.url + "/v1/classify", content=image_bytes(), headers={"content-type": "image/png"}
        )
        assert reply.status_code == 200, reply.text
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        code = gw.stop()
    output = gw.output()
    assert code == 0, output[-3000:]
    assert "sizing threads for" in output
    # A write the image does not allow shows up as a warning (ONNX Runtime's telemetry, had
    # the image not turned it off, warns that it cannot persist its device id in HOME).
    assert "[W:onnxruntime" not in output and "Permission denied" not in output, output

    gone = subprocess.run(health, env=env, cwd=cwd, timeout=timeout + 5, capture_output=True)
    assert gone.returncode != 0

    assert not list(home.iterdir()) and not list(cwd.iterdir())
    if root:
        assert written_by(uid, skip=base) == []
    print("written to TMPDIR:", sorted(p.name for p in tmp.rglob("*")) or "nothing")
