"""The servers measured beside the gateway on the same model file: a tutorial FastAPI server
(``deploy/tutorial_server.py``) and LitServe with batch 8 (``deploy/litserve_server.py``),
each a process of its own."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from deploy.benchmarks.common import NAME, start_gateway
from deploy.benchmarks.inputs import onnx_of
from service.host.processes import free_port, stop_process, wait_until

#: The peers' modules, by the name the results give them.
PEERS = {"tutorial": "deploy.tutorial_server", "litserve": "deploy.litserve_server"}

#: Where ``python -m deploy.<peer>`` runs from: the repository's root.
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def peer_server(peer: str, version_dir: Path) -> Iterator[tuple[int, str]]:
    """One of PEERS serving ``version_dir`` on a free port, once it answers: (its pid, its
    URL). Stopped with its whole process group (LitServe runs processes of its own)."""
    import httpx

    url = f"http://127.0.0.1:{free_port()}"

    def answers() -> bool:
        try:
            return httpx.get(f"{url}/v1/models/{NAME}", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    proc = subprocess.Popen(
        [sys.executable, "-m", PEERS[peer], str(version_dir), url.rsplit(":", 1)[1]],
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        wait_until(answers, 120, f"{peer} server not up", alive=lambda: _exited(proc))
        yield proc.pid, url
    finally:
        stop_process(proc, 30, group=True)


def _exited(proc: subprocess.Popen[bytes]) -> str | None:
    return None if proc.poll() is None else f"exited with {proc.returncode}"


@contextlib.contextmanager
def served_by(what: str, repo: Path) -> Iterator[tuple[int, str]]:
    """``repo``'s FP32 model served by the gateway or one of PEERS: (its pid, its URL)."""
    if what == "gateway":
        gw = start_gateway(repo)
        try:
            yield gw.proc.pid, gw.url
        finally:
            gw.stop()
    else:
        with peer_server(what, onnx_of(repo).parent) as found:
            yield found
