"""The gateway as a real process on real sockets: accuracy, limits, draining, clients that
go away, and its command line."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.host.processes import GatewayProcess, wait_until
from service.transports.grpc import classifier_pb2 as pb
from service.transports.grpc import classifier_pb2_grpc as pbg
from tests.helpers.cli import run_cli, without_package
from tests.helpers.images import image_bytes
from tests.helpers.metrics import rss_mb, scrape

PNG = {"content-type": "image/png"}

REQUESTS = "resnet_serve_requests_total"
DRAIN_S = 10  # the drain window of the SIGTERM test: its checks within it take ~1 s


@pytest.fixture(scope="module")
def tiny_server(tiny, tmp_path_factory):
    log = tmp_path_factory.mktemp("tiny-srv") / "gateway.log"
    gw = GatewayProcess.start(log, "--repository", str(tiny.repository), grpc=True)
    yield gw
    gw.stop()


def _classify_files(url: str, batch: list) -> list[int]:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p, _ in batch]
    resp = httpx.post(url + "/v1/models/digits/classify?top_k=1", files=files, timeout=60)
    assert resp.status_code == 200, resp.text
    return [preds[0]["index"] for preds in resp.json()["predictions"]]


@pytest.mark.slow
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
    count = scrape(server.url, "resnet_serve_batch_size_count", model="digits")
    total = scrape(server.url, "resnet_serve_batch_size_sum", model="digits")
    assert total >= 450 and total / count > 1.5


@pytest.mark.parametrize("path", ["/v1/classify", "/v2/models/tiny/infer"])
def test_oversized_body_is_refused_before_it_is_sent(tiny_server, path):
    """Content-Length over the limit: 413 in the route's dialect, while no body was sent."""
    host, port = tiny_server.url.removeprefix("http://").split(":")
    before = scrape(tiny_server.url, REQUESTS, outcome="payload_too_large")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            "Content-Length: 500000000\r\n\r\n".encode()
        )
        chunks = []
        while chunk := sock.recv(4096):  # the server closes the connection after answering
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 413")
    head, _, text = reply.partition("\r\n\r\n")
    # No "server: uvicorn" (here, nor on an answered request): nothing says what runs it.
    assert "\r\nserver:" not in head.lower()
    assert "server" not in httpx.get(tiny_server.url + "/healthz").headers
    body = json.loads(text)
    if path.startswith("/v2"):
        assert body["code"] == "payload_too_large" and "limit" in body["error"]
    else:
        assert body["error"]["code"] == "payload_too_large"
    after = scrape(tiny_server.url, REQUESTS, outcome="payload_too_large")
    assert after == before + 1


def test_client_gone_mid_body_is_counted_as_such_not_as_a_500(tiny_server):
    url = tiny_server.url
    host, port = url.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(
                b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n" + b"\x89PNG" * 10
            )
    wait_until(
        lambda: scrape(url, REQUESTS, outcome="client_closed") >= 3,
        10,
        "client_closed not counted",
    )
    metrics = httpx.get(url + "/metrics").text
    assert 'status="500"' not in metrics and 'reason="internal"' not in metrics
    assert "Traceback" not in tiny_server.output()


def test_bombs_and_garbage_leave_the_server_serving_with_bounded_memory(tiny_server):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (10000, 10000)).save(buf, format="PNG")
    bomb = buf.getvalue()
    before = rss_mb(tiny_server.proc.pid)
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
                    tiny_server.url + "/v1/classify",
                    content=data,
                    headers={"content-type": "image/png"},
                ).status_code
            )
    assert codes <= {400, 413, 415}, codes
    assert rss_mb(tiny_server.proc.pid) - before < 200
    resp = httpx.post(
        tiny_server.url + "/v1/classify",
        content=image_bytes(),
        headers={"content-type": "image/png"},
    )
    assert resp.status_code == 200
    assert tiny_server.proc.poll() is None


def test_sigterm_drains_rest_and_grpc_alike(tiny, tmp_path):
    """SIGTERM: during DRAIN_SECONDS readiness is false on HTTP and gRPC health, while REST and
    gRPC calls that still arrive are served; then new calls are refused, every accepted call
    is answered, and the process exits 0. That the calls were served inside the window is
    read from the gateway (still draining after them), not from a clock; the window is as
    long as the test's other waits for a state."""
    gw = GatewayProcess.start(
        tmp_path / "gw.log",
        "--repository",
        str(tiny.repository),
        grpc=True,
        env={"RESNET_SERVE_DRAIN_SECONDS": str(DRAIN_S)},
    )
    image = image_bytes()
    # Each client's answers, in order; a client stops at its first refusal.
    results: dict[str, list[str]] = {"rest-1": [], "rest-2": [], "grpc-1": [], "grpc-2": []}
    stop_clients = threading.Event()

    def rest_client(answers: list[str]) -> None:
        with httpx.Client(timeout=30) as c:
            while not stop_clients.is_set():
                try:
                    r = c.post(gw.url + "/v1/classify", content=image, headers=PNG)
                except httpx.TransportError:
                    answers.append("refused")
                    return  # the listener closed after the drain: never accepted
                answers.append(str(r.status_code))
                if r.status_code != 200:
                    return

    def grpc_client(answers: list[str]) -> None:
        with grpc.insecure_channel(gw.grpc_target) as channel:
            stub = pbg.ClassifierStub(channel)
            while not stop_clients.is_set():
                try:
                    stub.Classify(pb.ClassifyRequest(images=[image]), timeout=10)
                    answers.append("OK")
                except grpc.RpcError as exc:
                    answers.append(exc.code().name)
                    return

    try:
        threads = [
            threading.Thread(
                target=rest_client if name.startswith("rest") else grpc_client, args=(a,)
            )
            for name, a in results.items()
        ]
        for t in threads:
            t.start()
        wait_until(lambda: all(len(a) > 3 for a in results.values()), 20, "warm-up")
        gw.proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: httpx.get(gw.url + "/readyz", timeout=5).status_code == 503,
            DRAIN_S,
            "not ready",
        )
        assert httpx.get(gw.url + "/readyz").json()["error"]["message"] == "draining"
        with grpc.insecure_channel(gw.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            wait_until(
                lambda: (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    == health_pb2.HealthCheckResponse.NOT_SERVING
                ),
                DRAIN_S,
                "gRPC health still SERVING",
            )
            # New calls during the drain window are still served, on both transports.
            served_rest = httpx.post(
                gw.url + "/v1/classify", content=image, headers=PNG, timeout=10
            )
            served_grpc = pbg.ClassifierStub(channel).Classify(
                pb.ClassifyRequest(images=[image]), timeout=10
            )
        assert served_rest.status_code == 200 and served_grpc.results
        # Served inside the drain window: it is still open after them.
        assert httpx.get(gw.url + "/readyz").json()["error"]["message"] == "draining"
        assert gw.proc.wait(30) == 0  # the window ends by itself
        stop_clients.set()
        for t in threads:
            t.join(30)
        # Everything answered was a success (the drain window included, which the clients
        # kept calling through), until the refusal that ended each client.
        for name, answers in results.items():
            ok = "200" if name.startswith("rest") else "OK"
            assert answers.count(ok) > 3, (name, answers)
            assert set(answers[:-1]) <= {ok}, (name, answers)
            # CANCELLED: a call that reached the gRPC server in the instant it stopped, before
            # any handler took it: grpc's own answer for calls it never dispatched
            # (grpc/grpc#41785), a refusal like UNAVAILABLE, never a call dropped mid-way.
            refusals = {"refused", "UNAVAILABLE", "CANCELLED", "503"}
            assert answers[-1] in {ok} | refusals, (name, answers)
        assert "Traceback" not in gw.output()
    finally:
        stop_clients.set()
        gw.stop()


@pytest.mark.parametrize("taken", ["http", "grpc"])
def test_a_port_taken_before_the_gateway_binds_it_is_left_for_others(
    tiny, tmp_path, monkeypatch, taken
):
    """The ports are picked free and bound seconds later: one another process takes in
    between makes the gateway exit saying so, and GatewayProcess starts it on others."""
    from service.host import processes

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        picks = [
            (held, processes.free_port()) if taken == "http" else (processes.free_port(), held)
        ]
        real = processes.free_ports
        monkeypatch.setattr(processes, "free_ports", lambda n: picks.pop() if picks else real(n))
        gw = GatewayProcess.start(tmp_path / "gw.log", "--repository", str(tiny.repository),
                                  grpc=True)  # fmt: skip
        try:
            assert not picks and held not in (int(gw.url.rsplit(":", 1)[1]), gw.grpc_port)
            assert httpx.get(gw.url + "/readyz").status_code == 200
        finally:
            gw.stop()


def test_cli_refuses_a_bad_repository(tmp_path):
    proc = run_cli("resnet-serve", "serve", "--repository", str(tmp_path / "none"), timeout=60)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"resnet-serve: error: model repository {tmp_path / 'none'} is not a directory"
    )
    proc = run_cli(
        "resnet-serve", "serve", "--repository", str(tmp_path), "--backend", "tensorflow"
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "RESNET_SERVE_BACKEND=tensorflow: Input should be" in proc.stderr


def test_choosing_openvino_where_it_is_not_installed_is_one_line(tiny, tmp_path):
    """Its import made to fail as where the extra is not installed (a stub package first
    on PYTHONPATH): --engine openvino stops at once, saying how to get it; auto serves
    with what is installed (checked in process: tests/integration/test_engines.py)."""
    env = without_package("openvino", tmp_path)
    for how in (("--engine", "openvino"), ()):
        proc = run_cli(
            "resnet-serve",
            "serve",
            "--repository",
            str(tiny.repository),
            *how,
            env={**env, **({} if how else {"RESNET_SERVE_ENGINE": "openvino"})},
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip() == (
            "resnet-serve: error: invalid setting RESNET_SERVE_ENGINE=openvino: OpenVINO is "
            "not installed (No module named 'openvino'): install resnet-serving[openvino], "
            "or build the image with --build-arg OPENVINO=1"
        )


def test_cli_takes_the_repository_and_backend_from_the_environment(tmp_path):
    """Options not given leave the RESNET_SERVE_* variables in force (the image and the Helm
    chart configure the gateway through them)."""
    env = {"RESNET_SERVE_REPOSITORY": str(tmp_path / "mounted"), "RESNET_SERVE_BACKEND": "x"}
    proc = run_cli("resnet-serve", "serve", env=env, timeout=60)
    assert proc.returncode == 1
    assert "RESNET_SERVE_BACKEND=x: Input should be" in proc.stderr
    proc = run_cli("resnet-serve", "serve", env={**env, "RESNET_SERVE_BACKEND": "onnxruntime"})
    assert proc.returncode == 1
    assert f"model repository {tmp_path / 'mounted'} is not a directory" in proc.stderr


def test_cli_settings_errors_name_the_environment_variable(tiny):
    proc = run_cli(
        "resnet-serve",
        "serve",
        "--repository",
        str(tiny.repository),
        env={"RESNET_SERVE_MAX_QUEUE_IMAGES": "0"},
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "resnet-serve: error: invalid setting RESNET_SERVE_MAX_QUEUE_IMAGES=0"
    )
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli("resnet-serve", "serve", "--repository", str(tiny.repository), "--port", "99999")
    assert proc.returncode == 1 and "RESNET_SERVE_PORT=99999" in proc.stderr


def test_an_unavailable_onnxruntime_provider_stops_the_start(tiny):
    """A GPU provider asked for where the installed onnxruntime lacks it: one line at start,
    never a silent run on the CPU."""
    proc = run_cli(
        "resnet-serve", "serve", "--repository", str(tiny.repository),
        env={"RESNET_SERVE_ORT_PROVIDERS": "CUDAExecutionProvider,CPUExecutionProvider"},
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "resnet-serve: error: invalid setting RESNET_SERVE_ORT_PROVIDERS="
    )
    assert "CUDAExecutionProvider not available in this onnxruntime" in lines[0]
    assert "onnxruntime-gpu" in lines[0]


def test_a_tracing_exporter_the_gateway_lacks_stops_the_start_in_one_line(tiny):
    proc = run_cli(
        "resnet-serve", "serve", "--repository", str(tiny.repository),
        env={"OTEL_TRACES_EXPORTER": "zipkin"},
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "resnet-serve: error: OTEL_TRACES_EXPORTER=zipkin: this gateway exports traces with "
        "otlp or console (or none)"
    ]


def test_version_flags():
    from service import __version__

    for cli in ("resnet-serve", "resnet-export"):
        proc = run_cli(cli, "--version")
        assert proc.returncode == 0 and proc.stdout.strip() == f"{cli} {__version__}"
