"""The gateway as a real process on a real socket: accuracy, batching, limits, draining."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.e2e.conftest import start_server, stop


def _classify_files(url: str, batch: list) -> list[int]:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p, _ in batch]
    resp = httpx.post(url + "/v1/models/digits/classify?top_k=1", files=files, timeout=60)
    assert resp.status_code == 200, resp.text
    return [preds[0]["index"] for preds in resp.json()["predictions"]]


def test_heldout_accuracy_over_http_matches_pytorch(server, demo):
    """All 450 held-out PNG files, 8 concurrent clients, through the real socket."""
    files = demo.pngs()
    chunks = [files[i : i + 5] for i in range(0, len(files), 5)]
    with ThreadPoolExecutor(8) as pool:
        preds = [
            p for chunk in pool.map(lambda c: _classify_files(server.url, c), chunks) for p in chunk
        ]
    acc = sum(p == label for p, (_, label) in zip(preds, files, strict=True)) / len(files)
    report = json.loads((demo.model_dir / "1" / "export_report.json").read_text())
    torch_acc = report["training"]["heldout_accuracy_torch"]
    print(f"gateway accuracy {acc:.4f}, PyTorch {torch_acc:.4f}")
    assert acc >= 0.97
    assert abs(acc - torch_acc) <= 0.005

    # Concurrent requests were batched: more images than backend calls.
    metrics = httpx.get(server.url + "/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if not line.startswith("#"))
    count = float(samples['resnet_serve_batch_size_count{model="digits"}'])
    total = float(samples['resnet_serve_batch_size_sum{model="digits"}'])
    assert total >= 450 and total / count > 1.5


def test_oversized_body_is_refused_before_it_is_sent(server):
    """Content-Length over the limit: 413 arrives while the client has sent no body at all."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            b"Content-Length: 500000000\r\n\r\n"
        )
        chunks = []
        while chunk := sock.recv(4096):  # the server closes the connection after answering
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 413")
    assert '"code": "payload_too_large"' in reply or '"code":"payload_too_large"' in reply


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def test_bombs_and_garbage_leave_the_server_serving_with_bounded_memory(server, demo):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, format="PNG")
    bomb = buf.getvalue()
    before = _rss_mb(server.proc.pid)
    payloads = [
        bomb,
        b"\x89PNG\r\n\x1a\n" + os.urandom(3000),
        b"\xff\xd8\xff" + os.urandom(5000),
        os.urandom(100),
    ]
    codes = set()
    for _ in range(5):
        for data in payloads:
            codes.add(
                httpx.post(
                    server.url + "/v1/classify", content=data, headers={"content-type": "image/png"}
                ).status_code
            )
    assert codes <= {400, 413, 415}, codes
    assert _rss_mb(server.proc.pid) - before < 200
    good = demo.pngs()[0][0].read_bytes()
    assert (
        httpx.post(
            server.url + "/v1/classify", content=good, headers={"content-type": "image/png"}
        ).status_code
        == 200
    )
    assert server.proc.poll() is None


def test_sigterm_drains_every_accepted_request(demo, tmp_path):
    """SIGTERM: readiness goes false at once, accepted work finishes, the process exits 0."""
    srv = start_server(
        tmp_path, "--repository", str(demo.repository), env={"RESNET_SERVE_DRAIN_SECONDS": "1.5"}
    )
    try:
        data = demo.pngs()[0][0].read_bytes()
        results: list[int] = []

        def client() -> None:
            with httpx.Client(timeout=30) as c:
                for _ in range(15):
                    try:
                        r = c.post(
                            srv.url + "/v1/classify",
                            content=data,
                            headers={"content-type": "image/png"},
                        )
                        results.append(r.status_code)
                    except httpx.TransportError:
                        return  # the listener closed after the drain period: never accepted

        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        ready = httpx.get(srv.url + "/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["error"]["message"] == "draining"
        for t in threads:
            t.join(60)
        assert srv.proc.wait(30) == 0
        assert results and set(results) <= {200}, results
        assert "Traceback" not in srv.output()
    finally:
        stop(srv)


def test_cli_refuses_a_bad_repository(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    bin_ = Path(sys.executable).parent / "resnet-serve"
    proc = subprocess.run(
        [str(bin_), "serve", "--repository", str(tmp_path / "none")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"resnet-serve: error: model repository {tmp_path / 'none'} is not a directory"
    )
    proc = subprocess.run(
        [str(bin_), "serve", "--repository", str(tmp_path), "--backend", "tensorflow"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and "backend" in proc.stderr and "Traceback" not in proc.stderr
