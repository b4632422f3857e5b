"""Run a real Triton Inference Server locally: the CPU ``tritonserver`` in nvidia-pytriton.

The wheel (installed by ``make setup`` without its Python dependencies) ships the binary,
the python backend and a python stub per CPython version. Triton looks for the stub inside
the backend directory, so a small backend directory is assembled from links into the
wheel. The stub embeds CPython and runs each ``model.py`` with this very environment
(PYTHONHOME = this interpreter's prefix, PYTHONPATH = its site-packages), so the models see
the same numpy and onnxruntime as the gateway.

This Triton has no ONNX Runtime backend: serve repositories exported with
``--flavor python-ort``. Production GPU deployments use NVIDIA's image with
``platform: onnxruntime_onnx`` instead.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from service.host.processes import stop_process


class TritonError(RuntimeError):
    """Triton cannot be found, started, or did not become ready; the message says why."""


def triton_home() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError(
            "tritonserver is not installed: run `make setup` (it installs nvidia-pytriton)"
        )
    home = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    if not (home / "bin" / "tritonserver").is_file():
        raise TritonError(f"no tritonserver binary under {home}")
    return home


def _backend_dir(home: Path, into: Path) -> Path:
    """backends/python/ = the wheel's python backend + the stub for this CPython."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = home / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise TritonError(f"nvidia-pytriton has no python backend stub for Python {version}")
    python = into / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    for src in [*(home / "backends" / "python").glob("*.*"), stub]:
        dst = python / src.name
        if not dst.exists():
            dst.symlink_to(src)
    return into / "backends"


def triton_env() -> dict[str, str]:
    """The environment the python stub needs to embed this interpreter."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PYTHONHOME"] = sys.base_prefix
    env["PYTHONPATH"] = os.pathsep.join([*site.getsitepackages(), env.get("PYTHONPATH", "")]).strip(
        os.pathsep
    )
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    # One ORT thread pool per model instance; Triton runs instances side by side.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class TritonProcess:
    proc: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    metrics_port: int
    workdir: Path
    log_path: Path | None = None
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    host: str = "127.0.0.1"

    @property
    def _reach(self) -> str:
        """Where this machine reaches it (a wildcard bind is reached on loopback)."""
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    @property
    def grpc_url(self) -> str:
        return f"{self._reach}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self._reach}:{self.http_port}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path and self.log_path.exists():
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise TritonError(
                    f"tritonserver exited with status {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.http_url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TritonError(f"tritonserver not ready after {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 30.0) -> None:
        stop_process(self.proc, timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_triton(
    repository: Path,
    http_port: int = 8000,
    grpc_port: int = 8001,
    metrics_port: int = 8002,
    log_path: Path | None = None,
    extra_args: tuple[str, ...] = (),
    host: str = "127.0.0.1",
    control: Literal["none", "explicit"] = "none",
) -> TritonProcess:
    """Start tritonserver on ``repository`` (strict readiness), its HTTP, gRPC and metrics
    ports bound to ``host`` only (Triton's default is every interface).

    ``control``: Triton's model control mode. Both load every model of the repository at
    start, as its config.pbtxt says; ``explicit`` also accepts load and unload requests
    later, which is how the gateway's Triton backend serves new versions without a restart
    (``none`` refuses them)."""
    if not repository.is_dir():
        raise TritonError(f"model repository {repository} is not a directory")
    home = triton_home()
    workdir = Path(tempfile.mkdtemp(prefix="resnet-triton-"))
    backends = _backend_dir(home, workdir)
    cmd = [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={repository.resolve()}",
        f"--backend-directory={backends}",
        *(
            ("--model-control-mode=explicit", "--load-model=*")
            if control == "explicit"
            else ("--model-control-mode=none",)
        ),
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--http-address={host}",
        f"--http-port={http_port}",
        f"--grpc-address={host}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={host}",
        f"--metrics-port={metrics_port}",
        "--allow-metrics=true",
        "--log-verbose=0",
        *extra_args,
    ]
    log_file = log_path.open("wb") if log_path else None
    proc = subprocess.Popen(
        cmd,
        env=triton_env(),
        stdout=log_file if log_file else None,
        stderr=subprocess.STDOUT if log_file else None,
        cwd=workdir,
    )
    return TritonProcess(
        proc, http_port, grpc_port, metrics_port, workdir, log_path, log_file, host
    )
