"""`resnet-serve bench` against real gateways on loopback (bounded: a few seconds each):
its counts are the requests the gateway counted, on REST and gRPC; the SLO search finds
the rate a gateway of known cost allows; bad arguments are one line and exit 1."""

from __future__ import annotations

import asyncio
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from service.host.processes import GatewayProcess, group_alive
from service.settings import Settings
from service.tools.bench.run import BenchConfig, execute
from service.transports.serving import ThreadedGateway
from tests.helpers.cli import run_cli
from tests.helpers.doubles import SlowBackend
from tests.helpers.images import image_bytes


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench-images")
    for i in range(4):
        (folder / f"{i}.png").write_bytes(image_bytes(size=(40 + i, 36), seed=i))
    (folder / ".hidden.png").write_bytes(b"never sent")
    return folder


@pytest.fixture(scope="module")
def gateway(tiny, tmp_path_factory):
    gw = GatewayProcess.start(
        tmp_path_factory.mktemp("bench-gw") / "gw.log",
        "--repository",
        str(tiny.repository),
        grpc=True,
    )
    yield gw
    gw.stop()


def bench(*args: str) -> dict:
    out = Path(args[args.index("--output") + 1])
    proc = run_cli("resnet-serve", "bench", "--quiet", *args, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == (
        f"report: {out / 'report.json'}, {out / 'steps.csv'}, {out / 'latency.png'}"
    )
    return json.loads((out / "report.json").read_text())


def test_rest_closed_loop_counts_what_the_gateway_counted(gateway, tiny, images, tmp_path):
    report = bench(
        "--url", gateway.url, "--model", tiny.name, "--images", str(images),
        "--output", str(tmp_path), "--concurrency", "1,4", "--duration", "1.5",
        "--warmup", "0.5", "--images-per-request", "2",
    )  # fmt: skip
    assert [s["concurrency"] for s in report["steps"]] == [1, 4]
    for step in report["steps"]:
        assert step["requests"] > 10 and step["errors"] == {}
        # The same requests: the warm-up's are in neither count.
        assert step["server"]["requests"] == step["requests"]
        assert step["server"]["images"] == 2 * step["ok"]
        assert step["images_per_s"] == pytest.approx(2 * step["requests_per_s"], rel=0.01)
        lat = step["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99.9"] <= lat["max"]
        assert step["server"]["mean_batch_size"] >= 1
        assert 0 < step["client_cpu"] < 2
    assert report["target"]["image_files"] == 4  # the hidden file is not an image of the set
    rows = (tmp_path / "steps.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("mode,load,")
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("protocol", ["grpc", "kserve-grpc", "kserve-http"])
def test_open_loop_over_every_protocol(gateway, tiny, images, tmp_path, protocol):
    url = gateway.url if protocol == "kserve-http" else gateway.grpc_target
    report = bench(
        "--url", url, "--protocol", protocol, "--model", tiny.name, "--images", str(images),
        "--output", str(tmp_path), "--rate", "40", "--duration", "1.5", "--warmup", "0.3",
        "--metrics-url", gateway.url + "/metrics",
    )  # fmt: skip
    (step,) = report["steps"]
    assert step["mode"] == "open" and step["rate_per_s"] == 40
    assert step["errors"] == {} and 30 <= step["requests"] <= 100  # ~60 Poisson arrivals
    assert step["server"]["requests"] == step["requests"] == step["server"]["images"]


def simulated_max_rate(
    duration_s: float, backend_s: float, unloaded_s: float, budget_s: float
) -> float:
    """What the search should find: the tool's own seeded Poisson schedule (seed 0, no
    warm-up) through one server taking ``backend_s`` per request, in order (an M/D/1 queue
    starting empty, as each step does), each request's latency its wait plus the unloaded
    latency. The lowest rate on a fine grid whose p99 breaks the budget, less one step."""

    def p99(rate: float) -> float:
        rng, t, free, latencies = random.Random(0), 0.0, 0.0, []
        while t < duration_s:
            start = max(t, free)
            free = start + backend_s
            latencies.append(start - t + unloaded_s)
            t += rng.expovariate(rate)
        return float(np.percentile(latencies, 99, method="higher"))

    rate = 1.0
    while p99(rate + 0.25) <= budget_s:
        rate += 0.25
    return rate


def test_slo_search_finds_the_rate_a_known_cost_allows(tiny, images, tmp_path):
    """Batches of one image, 30 ms each (a backend made slow on purpose), one at a time: a
    queue whose highest rate within a p99 budget can be worked out beforehand."""
    from service.backends.onnxruntime import OnnxRuntimeBackend

    settings = Settings(repository=tiny.repository, max_batch_size=1, max_batch_delay_ms=0)
    with ThreadedGateway(settings, SlowBackend(OnnxRuntimeBackend(), 0.03)) as gw:
        cfg = BenchConfig(
            url=gw.url, model=tiny.name, images=images, output=tmp_path,
            slo_p99_ms=120, duration_s=4, warmup_s=0, quiet=True,
        )  # fmt: skip
        report = asyncio.run(execute(cfg))
    slo = report["slo"]
    unloaded = report["steps"][0]
    assert unloaded["mode"] == "closed" and unloaded["concurrency"] == 1
    assert report["steps"][1]["concurrency"] == 16  # the ceiling probe
    expected = simulated_max_rate(
        4,
        unloaded["server"]["inference_ms_per_batch"] / 1000,
        unloaded["latency_ms"]["p50"] / 1000,
        0.120,
    )
    assert slo["max_rate_per_s"] == pytest.approx(expected, rel=0.2), (slo, expected)
    assert slo["p99_ms"] <= 120 and slo["requests"] > 50


def test_bad_arguments_are_one_line_and_exit_1(gateway, tiny, images, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "never-made"
    cases = [
        (["--url", gateway.url, "--images", str(empty)], "--images .*empty: holds no files"),
        (["--url", gateway.url, "--images", str(a_file)], "--images .*a-file: not a directory"),
        (["--url", gateway.url, "--images", str(tmp_path / "nope")], "no such directory"),
        (
            ["--url", "http://127.0.0.1:9", "--images", str(images)],
            "cannot reach http://127.0.0.1:9",
        ),
        (
            ["--url", gateway.url, "--images", str(images), "--model", "nope"],
            "model 'nope' is not served",
        ),
        (
            [
                "--url",
                gateway.grpc_target,
                "--protocol",
                "grpc",
                "--images",
                str(images),
                "--model",
                "nope",
            ],
            r"model 'nope' is not served at .* \(served: tiny\)",
        ),
        (
            ["--url", gateway.url, "--images", str(images), "--rate", "5,x"],
            "expected comma-separated",
        ),
        (["--url", gateway.url, "--images", str(images), "--protocol", "soap"], "--protocol soap"),
    ]
    for args, message in cases:
        model = [] if "--model" in args else ["--model", tiny.name]
        proc = run_cli(
            "resnet-serve", "bench", "--output", str(out), "--duration", "1", *model, *args
        )
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("resnet-serve: error: "), proc.stderr
        assert re.search(message, lines[0]), (message, lines[0])
        assert not out.exists()  # nothing made for a run that never started


def test_gateway_cost_measures_both_servers_behind_the_same_near_free_graph(tmp_path):
    """``make bench``'s "gateway cost per image" parts: the near-free graph takes ResNet-50's
    real input, the gateway and its peers (the tutorial server, LitServe) answer the same
    classes from it for a real photo, and the server CPU per request is read from /proc."""
    import httpx

    from deploy.benchmarks.cost import near_free_repo
    from deploy.benchmarks.cpu_accounting import process_cpu_s, server_cpu_per_request
    from deploy.benchmarks.inputs import test_jpeg
    from deploy.benchmarks.peers import PEERS, peer_server

    name = "nearfree"
    version = near_free_repo(tmp_path / "repo", "float32", name)
    photo = test_jpeg(400, 300)
    gw = GatewayProcess.start(tmp_path / "gw.log", "--repository", str(tmp_path / "repo"))
    try:
        meta = httpx.get(f"{gw.url}/v2/models/{name}").json()
        assert meta["inputs"][0]["shape"] == [-1, 3, 224, 224]
        path = f"/v1/models/{name}/classify"
        jpeg = {"Content-Type": "image/jpeg"}
        ours = httpx.post(gw.url + path, content=photo, headers=jpeg, timeout=30).json()
        for peer in PEERS:
            with peer_server(peer, version) as (pid, url):
                theirs = httpx.post(url + path, content=photo, headers=jpeg, timeout=30).json()
                # The top 3 of 1000 near-tied classes: the same within one 8-bit step per value.
                assert [p["label"] for p in ours["predictions"][0][:3]] == [
                    p["label"] for p in theirs["predictions"][:3]
                ], peer
            assert not group_alive(pid), f"{peer}'s processes still running"  # all it started
        before = process_cpu_s(gw.proc.pid)
        step = server_cpu_per_request(gw.proc.pid, gw.url, photo, 1.0, name)
        assert process_cpu_s(gw.proc.pid) > before
        assert step["cpu_ms_per_request"] > 0 and set(step["statuses"]) == {"200"}, step
    finally:
        gw.stop()


def test_cost_table_states_only_what_was_measured():
    """The cost table's Triton sentence names rates only when the Triton phase ran: without
    it (--no-triton) no "vs the embedded gateway" with nothing after it."""
    from deploy.benchmarks.tables import cost_table

    def row(*servers: str) -> dict:
        r: dict = {"bytes": 268, "decode_floor_ms": 0.02, "preprocess_ms": 0.52}
        r["gateway_beyond_preprocess_ms"] = 1.1
        r["triton_request_bytes_per_image"] = {
            "grpc_float32": 602118.4,
            "grpc_uint8": 150535.2,
            "shm_uint8": 27.2,
        }
        for s in servers:
            r[s] = {"cpu_ms_per_request": 1.6}
            r[s + "_vs_floor"] = 80.0
        return r

    embedded = cost_table({"png_8x8": row("gateway", "gateway_uint8")})
    assert "| png_8x8 (268 bytes) | 0.02 ms | 0.52 ms | 1.60 ms (80.00x) | 1.60 ms" in embedded
    assert embedded.rstrip().endswith("shared memory 27 bytes."), embedded
    with_triton = row("gateway", "gateway_uint8", "gateway_triton")
    with_triton["gateway_triton_rate_vs_embedded"] = 0.55
    table = cost_table({"png_8x8": with_triton})
    assert table.rstrip().endswith(
        "Requests/s vs the embedded uint8 gateway, png_8x8: "
        "gateway before Triton (float planes) 0.55x"
    ), table
