"""``make bench``: the gateway against the bare model, measured in one run.

ResNet-50 (random weights: speed does not depend on them) is exported once; then, on the
same model file and the same machine, in this order:

1. bare ONNX Runtime, batch 1 and batch 8 (the ceiling: no HTTP, no decoding);
2. image preprocessing alone (500x375 JPEG; 4032x3024 JPEG with and without DCT draft);
   then the gateway's cost per image (``--cost-only`` runs just that): server CPU per
   request from /proc, behind a near-free graph of the real input shape, for four images,
   beside each one's decode floor and two peers: a tutorial server
   (deploy/tutorial_server.py) and LitServe with batch 8 (deploy/litserve_server.py);
3. the gateway (a real process, embedded ORT backend): 16 and 1 closed-loop clients posting
   a 500x375 JPEG, and Poisson arrivals at half the bare model's throughput;
4. the same 16 clients over the gateway's gRPC API (same process, same backend); 16
   clients with tracing off and on (every request sampled, exported over OTLP/gRPC to a
   receiver in this process), off-on-on-off; then overload: a gateway of its own whose requests have a 2 s deadline, under 2x and
   10x the clients it can serve within it (they wait Retry-After; 10x also without);
   then the gateway beside its peers (the tutorial server, LitServe with batch 8), each
   alone in turn, in interleaved rounds: 16 closed-loop clients against bare batch 8, and
   p99 under Poisson arrivals at 0.4x bare batch 8 against an ideal server under the same
   arrivals (``--tail-only`` runs just that);
   Then a rollout's cost: p99 under Poisson arrivals at 0.4x bare batch 8 with one
   version, with a second one shadowing it, and across a reload to a version published
   during the window (``--lifecycle-only`` runs just that);
5. the gateway with the Triton backend: a real tritonserver (CPU, python backend running
   ORT on the same ONNX file), 16 REST clients;
6. INT8: the same network quantized by ``resnet-export export --precision int8`` (calibrated
   on crops of real photographs; the gate reports only, since random weights have no
   accuracy to keep): bare INT8 against bare FP32 at batch 8, and the gateway serving INT8
   against bare INT8;
7. latency under load, FP32 and INT8: Poisson arrivals of crops of real photographs, and
   the SLO search of ``resnet-serve bench``: the highest rate whose p99 stays within 5x the
   bare model's batch-1 latency, with the gateway's defaults and with the settings
   ``resnet-serve tune`` chose here when they differ from them
   (``deploy/loadtest/tune-example/tune.env``, a latency target set to this run's budget),
   as ratios to bare batch 8 (target: 0.5x).

The load comes from ``service.bench`` (the ``resnet-serve bench`` load tool: keep-alive
HTTP/1.1 on raw asyncio streams, grpc.aio with pre-serialized messages), each step bounded
in time. Results print as a table and are written to ``bench-results.json``. Figures are
reported as ratios to bare ORT from the same run, because the machines are shared and noisy.

    python -m deploy.bench [--seconds 20] [--out bench-results.json]
        [--latency-only | --tracing-only | --lifecycle-only | --int8-only | --cost-only
         | --tail-only]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from service.bench.run import BenchConfig, measure
from service.bench.run import run as bench_run
from service.bench.runner import Bounds, Step, closed_loop, open_loop
from service.bench.server import Scraper
from service.bench.targets import make_target
from service.cpus import cpu_isa, usable_cpus
from service.processes import GatewayProcess, free_port, stop_process, wait_until

BIN = Path(sys.executable).parent
NAME = "resnet50"
#: What `resnet-serve tune` chose on this machine (docs/load-testing.md, Sizing a deployment).
TUNED_ENV = Path(__file__).parent / "loadtest" / "tune-example" / "tune.env"
#: The latency budget, in bare batch-1 latencies (issue 12; MLPerf's Server scenario
#: bounds the p99 the same way, as a multiple of the model's own latency).
BUDGET_X_BATCH1 = 5


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def test_jpeg(width: int = 500, height: int = 375) -> bytes:
    """A real photograph (scikit-learn's china.jpg) at the requested size, as JPEG."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    img = Image.open(load_sample_images().filenames[0]).convert("RGB")
    img = img.resize((width, height), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def export_model(repo: Path, *args: str) -> None:
    log(f"exporting ResNet-50 (random weights) {' '.join(args)} ...")
    subprocess.run(
        [
            str(BIN / "resnet-export"),
            "export",
            "--arch",
            "resnet50",
            "--weights",
            "random",
            "--name",
            NAME,
            "--repository",
            str(repo),
            "--max-batch-size",
            "16",
            *args,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def calibration_images(folder: Path, count: int = 32, seed: int = 0) -> Path:
    """Crops of scikit-learn's two photographs, as JPEG files: real image statistics."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [Image.open(f).convert("RGB") for f in load_sample_images().filenames]
    for n in range(count):
        img = photos[n % len(photos)]
        side = int(rng.integers(200, min(img.size)))
        x, y = (int(rng.integers(0, d - side)) for d in img.size)
        img.crop((x, y, x + side, y + side)).save(folder / f"{n}.jpg", quality=90)
    return folder


def load(
    gw: GatewayProcess,
    body: bytes,
    seconds: float,
    *,
    clients: int = 0,
    rate: float = 0.0,
    warmup_s: float = 0.0,
    grpc: bool = False,
    polite: bool = False,
) -> Step:
    """One step of ``service.bench`` against ``gw``, over REST (or the Classifier gRPC API):
    ``clients`` closed-loop clients (``polite``: they wait Retry-After, jittered), or Poisson
    arrivals at ``rate``; ``step.server`` is the gateway's own account of the window."""

    async def step() -> Step:
        # In the loop the calls run on: grpc.aio channels (and asyncio streams) bind to it.
        url = gw.grpc_target if grpc else gw.url
        target = make_target("grpc" if grpc else "rest", url, NAME, [[body]])
        bounds = Bounds(seconds, warmup_s)
        await target.open()
        try:
            return await measure(
                lambda snap: (
                    closed_loop(
                        target, clients, bounds, honor_retry_after=polite, before_window=snap
                    )
                    if clients
                    else open_loop(target, rate, bounds, before_window=snap)
                ),
                Scraper(gw.url + "/metrics", NAME),
            )
        finally:
            await target.close()

    return asyncio.run(step())


#: The overload phase's load generator yields the CPU to the gateway (see overload()).
LOAD_NICENESS = 19


def load_niced(gw: GatewayProcess, body: bytes, niceness: int, **kw: Any) -> Step:
    """:func:`load` on a thread of its own at a lower CPU priority (Linux's niceness is per
    thread, and the threads it starts inherit it): on the machine the gateway runs on, the
    load generator then takes only the CPU the gateway leaves, as clients elsewhere would,
    instead of half the cores under a retry storm."""
    done: list[Step] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
            done.append(load(gw, body, **kw))
        except BaseException as exc:  # handed to the caller below
            failed.append(exc)

    thread = threading.Thread(target=run, name="load-niced")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return done[0]


def line(step: Step) -> str:
    """One step in one line, for the progress log."""
    return (
        f"{step.images_per_s:.1f} img/s, p50 / p99 {step.latency_ms(50):.1f} / "
        f"{step.latency_ms(99):.1f} ms, {step.statuses}"
    )


def gateway_clients16(
    what: str,
    repo: Path,
    body: bytes,
    seconds: float,
    *args: str,
    env: dict[str, str] | None = None,
) -> Step:
    """16 closed-loop REST clients against a gateway started on ``repo`` (3 s of warm-up)."""
    gw = start_gateway(repo, *args, env=env)
    try:
        log(f"{what}, 16 clients ...")
        result = load(gw, body, seconds, clients=16, warmup_s=3)
        log(f"  {line(result)}")
    finally:
        gw.stop()
    return result


#: Photo crops INT8's export gate runs on (FP32, the kernels and the exact reference).
INT8_GATE_IMAGES = 64


def onnx_of(repo: Path) -> Path:
    """The FP32 graph export_model published into ``repo``."""
    return repo / NAME / "1" / "model.onnx"


def bench_int8(
    root: Path,
    body: bytes,
    seconds: float,
    bare8_fp32: float,
    latency_only: bool = False,
    latency: bool = True,
) -> dict[str, Any]:
    repo = root / "int8"
    calib = calibration_images(root / "calibration")
    # Other crops for the gate, so that its figures rest on more than calibration's
    # held-out fifth.
    sample = calibration_images(root / "sample", INT8_GATE_IMAGES, seed=1)
    export_model(
        repo,
        "--precision",
        "int8",
        "--calibration-dir",
        str(calib),
        "--sample-images",
        str(sample),
        "--calibration-method",
        "minmax",  # the fastest to calibrate; speed does not depend on the method
        "--min-agreement",
        "0",
    )
    onnx_path = onnx_of(repo)
    log("bare ONNX Runtime, INT8 ...")
    bare1 = bare_ort(onnx_path, 1, seconds / 2)
    bare8 = bare_ort(onnx_path, 8, seconds)
    log(f"  batch 1: {bare1:.1f} img/s, batch 8: {bare8:.1f} img/s")
    out: dict[str, Any] = {
        "bare_batch1_images_per_s": round(bare1, 2),
        "bare_batch8_images_per_s": round(bare8, 2),
        "bare_int8_vs_fp32_batch8": round(bare8 / bare8_fp32, 3),
        "export_gates": int8_gates(repo / NAME / "1" / "export_report.json"),
    }
    if not latency_only:
        r16 = gateway_clients16("gateway INT8", repo, body, seconds)
        out["gateway_clients16"] = r16.summary()
        out["gateway_vs_bare_int8_batch8"] = round(r16.images_per_s / bare8, 3)
    if latency:
        out["latency_under_load"] = latency_under_load(repo, calib, seconds, bare1, bare8)
    return out


def int8_gates(report_path: Path) -> dict[str, Any]:
    """What export measured of the INT8 file: top-1 agreement with FP32 on this CPU's
    kernels and for the exact reference, and the kernels' largest logit difference from
    the reference as a share of the largest logit (random weights: the gate only reports)."""
    report = json.loads(report_path.read_text())
    versus = report["kernels_vs_exact"]
    return {
        "kernels": versus["kernels"],
        "scheme": report["int8_scheme"],
        "images": report["accuracy_gate"]["images"],
        "kernels_top1_vs_fp32_pct": report["accuracy_gate"]["top1_agreement_pct"],
        "exact_top1_vs_fp32_pct": report["accuracy_gate_exact"]["top1_agreement_pct"],
        "kernels_top1_vs_exact_pct": versus["top1_agreement_pct"],
        "kernels_max_diff_vs_exact_pct_of_largest": round(
            100 * versus["max_abs_logit_diff"] / versus["largest_logit"], 3
        ),
    }


class Collector:
    """An OTLP trace receiver on 127.0.0.1 that counts the spans it is sent and keeps their
    trace ids: the other end of a gateway with tracing on, so the exporter really serializes
    and sends. ``protocol`` as OTEL_EXPORTER_OTLP_PROTOCOL says: the gRPC TraceService, or
    ``http/protobuf``, a POST of the same protobuf message to /v1/traces."""

    def __init__(self, protocol: str = "grpc") -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

        self.spans = 0
        self.trace_ids: set[str] = set()
        self.lock = threading.Lock()
        self.stop: Callable[[], None]
        collector = self

        def received(request: Any) -> None:
            spans = [s for r in request.resource_spans for ss in r.scope_spans for s in ss.spans]
            with collector.lock:  # the server's threads export concurrently
                collector.spans += len(spans)
                collector.trace_ids.update(s.trace_id.hex() for s in spans)

        if protocol == "grpc":
            from concurrent import futures

            import grpc
            from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as pbg

            class Receiver(pbg.TraceServiceServicer):
                def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
                    received(request)
                    return pb.ExportTraceServiceResponse()

            server = grpc.server(futures.ThreadPoolExecutor(2))
            pbg.add_TraceServiceServicer_to_server(Receiver(), server)
            self.port = server.add_insecure_port("127.0.0.1:0")
            server.start()

            def stop_grpc() -> None:
                server.stop(0)

            self.stop = stop_grpc
            return
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path != "/v1/traces" or self.headers.get_content_type() != (
                    "application/x-protobuf"
                ):
                    self.send_error(404 if self.path != "/v1/traces" else 415)
                    return
                request = pb.ExportTraceServiceRequest()
                request.ParseFromString(body)
                received(request)
                reply = pb.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: Any) -> None:  # quiet: the test reads its own output
                pass

        http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = http.server_address[1]
        threading.Thread(target=http.serve_forever, daemon=True).start()

        def stop() -> None:
            http.shutdown()
            http.server_close()

        self.stop = stop


def tracing_cost(repo: Path, body: bytes, seconds: float) -> dict[str, Any]:
    """16 closed-loop REST clients with tracing off and on (every request sampled, OTLP to
    a local receiver), off-on-on-off, each on a gateway of its own."""
    collector = Collector()
    on = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_TRACES_SAMPLER": "always_on",
    }
    rates: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for name in ("off", "on", "on", "off"):
            env = on if name == "on" else {}
            step = gateway_clients16(f"tracing {name}", repo, body, seconds, env=env)
            rates[name].append(step.images_per_s)
    finally:
        collector.stop()
    off, traced = (sum(r) / len(r) for r in (rates["off"], rates["on"]))
    return {
        "off_images_per_s": [round(r, 2) for r in rates["off"]],
        "on_images_per_s": [round(r, 2) for r in rates["on"]],
        "on_vs_off": round(traced / off, 3),
        "spans_received": collector.spans,
    }


def rollout_cost(repo: Path, body: bytes, seconds: float, bare8: float) -> dict[str, Any]:
    """Poisson arrivals at 0.4x bare batch 8, each phase on a gateway of its own over a copy
    of the repository: one version (plain, before and after); version 1 answering with
    version 2 as its shadow (the primary's latency, and how much traffic the shadow
    compared or dropped); a new version published a third into the window and picked up by
    polling (latency while it loads beside the one serving; no request may fail)."""
    import httpx

    from export.repository import republish
    from service.repository import Rollout, write_rollout

    rate = 0.4 * bare8
    out: dict[str, Any] = {"rate_per_s": round(rate, 2), "phases": {}}
    with tempfile.TemporaryDirectory(prefix="resnet-bench-rollout-") as tmp:
        model_dir = Path(tmp) / NAME
        shutil.copytree(repo / NAME, model_dir)
        republish(model_dir, model_dir.parent, "onnxruntime")  # version 2, the same graph
        for phase in ("plain", "shadow", "reload", "plain again"):
            rollout = Rollout(weights={"1": 1}, shadow="2") if phase == "shadow" else Rollout()
            write_rollout(model_dir, rollout)
            env = {"RESNET_SERVE_POLL_INTERVAL_S": "0.5"} if phase == "reload" else {}
            gw = start_gateway(model_dir.parent, env=env)
            publisher = None
            if phase == "reload":  # the next version, published a third into the window
                publisher = threading.Timer(
                    2 + seconds / 3, republish, (model_dir, model_dir.parent, "onnxruntime")
                )
                publisher.start()
            try:
                log(f"rollout: {phase}, Poisson arrivals at {rate:.1f}/s ...")
                step = load(gw, body, seconds, rate=rate, warmup_s=2)
                log(f"  {line(step)}")
                result: dict[str, Any] = step.summary()
                if phase == "shadow":
                    report = httpx.get(f"{gw.url}/v1/models/{NAME}/shadow").json()
                    result["shadow"] = report["comparisons"][0]
                if phase == "reload":
                    detail = httpx.get(f"{gw.url}/v1/models/{NAME}").json()
                    result["serving_after"] = detail["versions"]
                    result["last_reload"] = detail["last_reload"]
            finally:
                if publisher is not None:
                    publisher.join()
                gw.stop()
            out["phases"][phase] = result
    plain = [out["phases"][p]["latency_ms"]["p99"] for p in ("plain", "plain again")]
    for phase in ("shadow", "reload"):
        p99 = out["phases"][phase]["latency_ms"]["p99"]
        out[f"{phase}_p99_vs_plain"] = round(p99 / (sum(plain) / 2), 3)
    return out


def tuned_settings(budget_ms: float) -> dict[str, str]:
    """tune's choice, as the gateway's environment; a latency target becomes this run's."""
    env = {}
    for line in TUNED_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    if "RESNET_SERVE_TARGET_P99_MS" in env:
        env["RESNET_SERVE_TARGET_P99_MS"] = f"{budget_ms:.0f}"
    return env


def latency_under_load(
    repo: Path, images: Path, seconds: float, bare1: float, bare8: float
) -> dict[str, Any]:
    """The highest Poisson rate within p99 <= 5x the bare batch-1 latency, with the
    gateway's defaults and with tune's choice (when it chose other settings), each on a
    gateway of its own."""
    budget_ms = BUDGET_X_BATCH1 * 1000 / bare1
    out: dict[str, Any] = {"p99_budget_ms": round(budget_ms, 1), "target_vs_bare_batch8": 0.5}
    tuned = tuned_settings(budget_ms)
    for name, env in (("defaults", {}), *((("tuned", tuned),) if tuned else ())):
        log(f"latency under load, {name} {env}: p99 <= {budget_ms:.0f} ms ...")
        gw = start_gateway(repo, env=env)
        try:
            cfg = BenchConfig(
                url=gw.url,
                model=NAME,
                images=images,
                output=Path(tempfile.mkdtemp(prefix="resnet-bench-slo-")),
                slo_p99_ms=budget_ms,
                duration_s=seconds,
                warmup_s=2,
                quiet=True,
            )
            slo = bench_run(cfg)["slo"]
        finally:
            gw.stop()
        out[name] = {
            "settings": env,
            **slo,
            "rate_vs_bare_batch8": round(slo["max_rate_per_s"] / bare8, 3),
        }
        log(f"  {out[name]}")
    return out


def bare_ort(onnx_path: Path, batch: int, seconds: float) -> float:
    """Images/s of a plain ORT session (all usable CPUs, default options) at a fixed batch."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = usable_cpus()
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
    for _ in range(2):
        session.run(None, {"input": x})
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"input": x})
        n += batch
    return n / (time.perf_counter() - start)


def preprocess_ms(repo: Path) -> dict[str, float]:
    from service.preprocess import DecodeLimits, preprocess
    from service.repository import load_spec

    contract = load_spec(repo / NAME).contract
    cases = {
        "jpeg_500x375_ms": (test_jpeg(), DecodeLimits()),
        "jpeg_4032x3024_draft_ms": (test_jpeg(4032, 3024), DecodeLimits()),
        "jpeg_4032x3024_full_decode_ms": (test_jpeg(4032, 3024), DecodeLimits(jpeg_draft=False)),
    }
    out = {}
    for key, (data, limits) in cases.items():
        preprocess(data, contract, limits)
        reps = 50 if "500" in key else 8
        t0 = time.perf_counter()
        for _ in range(reps):
            preprocess(data, contract, limits)
        out[key] = round((time.perf_counter() - t0) / reps * 1000, 2)
    return out


#: Synthetic images of the parity corpus (random pixels, PNG): sizes that take every path of
#: the resize (landscape, portrait, square, near-square strips, a large photo's size).
PARITY_SIZES = ((640, 480), (480, 640), (300, 300), (257, 1000), (1001, 256), (1920, 1440))


def preprocessing_parity(repo: Path, photos: Path) -> dict[str, Any]:
    """The gateway's preprocessing against torchvision's eval transform written out (the
    tutorial server's: resize the whole image, center-crop, normalize in float), on real
    photos (scikit-learn's two and ``photos``' crops, JPEG) and PARITY_SIZES, with the
    repository's contract in bilinear and bicubic: the largest difference in 8-bit steps,
    the share of values that differ at all, and how often the repository's model (ResNet-50)
    gives the same top-1 class and how far its logits move."""
    import onnxruntime as ort
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from deploy.tutorial_server import eval_transform
    from service.preprocess import preprocess
    from service.repository import load_spec

    corpus = [Path(f).read_bytes() for f in load_sample_images().filenames]
    corpus += [p.read_bytes() for p in sorted(photos.glob("*.jpg"))]
    rng = np.random.default_rng(0)
    for w, h in PARITY_SIZES:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "PNG")
        corpus.append(buf.getvalue())
    session = ort.InferenceSession(str(onnx_of(repo)), providers=["CPUExecutionProvider"])
    base = load_spec(repo / NAME).contract
    out: dict[str, Any] = {"images": len(corpus)}
    for interpolation in ("bilinear", "bicubic"):
        c = base.model_copy(update={"interpolation": interpolation})
        ours = np.stack([preprocess(d, c) for d in corpus])
        ref = np.concatenate([eval_transform(c)(d) for d in corpus])
        steps = np.abs(ours - ref) * 255 * np.asarray(c.std, np.float32).reshape(1, -1, 1, 1)
        logits = [session.run(None, {c.input_name: x})[0] for x in (ours, ref)]
        out[interpolation] = {
            "max_steps": round(float(steps.max()), 3),
            "values_differing_pct": round(float((steps > 1e-3).mean() * 100), 4),
            "top1_agreement_pct": round(
                float((logits[0].argmax(1) == logits[1].argmax(1)).mean() * 100), 2
            ),
            "max_logit_diff_pct_of_largest": round(
                float(np.abs(logits[0] - logits[1]).max() / np.abs(logits[1]).max() * 100), 3
            ),
        }
    log(f"  preprocessing parity: {out}")
    return out


#: The images of "gateway cost per image": (key, how it is made). 12 MP is a phone's photo.
COST_IMAGES: tuple[tuple[str, tuple[int, int] | None], ...] = (
    ("jpeg_500x375", (500, 375)),
    ("jpeg_1920x1440", (1920, 1440)),
    ("jpeg_4032x3024", (4032, 3024)),
    ("png_8x8", None),
)


#: The servers measured beside the gateway: a tutorial FastAPI server and LitServe (batch 8).
PEERS = {"tutorial": "deploy.tutorial_server", "litserve": "deploy.litserve_server"}


#: The servers of "gateway cost per image", in the table's order.
COST_SERVERS = (
    "gateway",
    "gateway_uint8",
    "gateway_triton",
    "gateway_triton_uint8",
    "gateway_triton_shm",
    *PEERS,
)


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and every process under it, from /proc: what
    the server itself spent, whatever the wall clock or the load generator did."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


def near_free_repo(dst: Path, input_dtype: str = "float32", name: str = NAME) -> Path:
    """A repository of one model that costs almost nothing but takes ResNet-50's input
    (ImageNet's contract, 224x224 crops, float planes or ``--input uint8`` pixels) and
    answers 1000 logits (the mean of each plane, one 3x1000 layer): behind it only the
    serving is measured. Published through export's own path; its version directory."""
    import torch
    from torch import nn

    from export.pipeline import default_labels, export_and_publish
    from export.repository import ServingConfig
    from export.weights import IMAGENET_MEAN, IMAGENET_STD
    from service.contract import PreprocessContract, input_fields

    contract = PreprocessContract(
        arch="near-free", input_name="input", output_name="logits", channels="RGB",
        resize=256, crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD, num_classes=1000,
        **input_fields(input_dtype),
    )  # fmt: skip
    torch.manual_seed(0)
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 1000))
    export_and_publish(
        model=net, contract=contract, labels=default_labels(1000), name=name, repository=dst,
        flavor="onnxruntime", serving=ServingConfig(max_batch_size=16), opset=17,
        real_images=[], source="deploy/bench.py near-free graph", log=lambda _: None,
    )  # fmt: skip
    return dst / name / "1"


def cost_image(size: tuple[int, int] | None) -> bytes:
    if size is None:
        buf = io.BytesIO()
        from PIL import Image

        pixels = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(buf, format="PNG")
        return buf.getvalue()
    return test_jpeg(*size)


def cpu_ms_of(work: Any, runs: int) -> float:
    """This thread's CPU milliseconds for one ``work()``, the fastest of ``runs``."""
    best = float("inf")
    for _ in range(runs):
        start = time.thread_time()
        work()
        best = min(best, time.thread_time() - start)
    return best * 1000


def decode_floor_ms(data: bytes, contract: Any, runs: int) -> float:
    """libjpeg-turbo decoding the JPEG alone (simplejpeg), at the DCT scale the gateway's
    draft rule picks (the shorter side kept at least draft_margin x the resize); a PNG
    decoded by Pillow (zlib, nothing to skip). One thread's CPU time."""
    import simplejpeg
    from PIL import Image

    from service.preprocess import DEFAULT_LIMITS

    if not data.startswith(b"\xff\xd8"):
        return cpu_ms_of(lambda: Image.open(io.BytesIO(data)).load(), runs)
    need = int(contract.resize * DEFAULT_LIMITS.draft_margin)
    return cpu_ms_of(
        lambda: simplejpeg.decode_jpeg(data, "RGB", min_height=need, min_width=need), runs
    )


def server_cpu_per_request(
    pid: int, url: str, body: bytes, seconds: float, model: str = NAME
) -> dict[str, Any]:
    """16 closed-loop REST clients (``service.bench``) for ``seconds`` after 2 s of warm-up:
    the server's CPU milliseconds per answered request, from /proc, and its throughput."""

    async def step() -> tuple[Step, float]:
        target = make_target("rest", url, model, [[body]])
        await target.open()
        cpu: list[float] = []

        async def window_opens() -> None:
            cpu.append(process_cpu_s(pid))

        try:
            result = await closed_loop(target, 16, Bounds(seconds, 2.0), before_window=window_opens)
        finally:
            await target.close()
        return result, process_cpu_s(pid) - cpu[0]

    result, cpu_s = asyncio.run(step())
    return {
        "cpu_ms_per_request": round(cpu_s * 1000 / max(result.ok, 1), 2),
        "requests_per_s": round(result.ok / result.duration_s, 1),
        "statuses": result.statuses,
    }


def gateway_cost(seconds: float, triton: bool = True) -> dict[str, Any]:
    """The "gateway cost per image" phase: the gateway behind the near-free graph taking float planes
    and taking uint8 pixels, embedded and (``triton``) in front of a real Triton (then only
    the gateway's own process is counted: the graph runs in Triton's), and the tutorial
    server and LitServe (PEERS) behind the float one, under 16 clients posting each
    of COST_IMAGES; each image's decode floor and the gateway's own preprocessing (float
    planes), as one thread's CPU time, here."""

    from export.repository import republish
    from service.preprocess import preprocess
    from service.repository import load_spec
    from service.triton_launcher import start_triton

    root = Path(tempfile.mkdtemp(prefix="resnet-bench-free-"))
    names = {"float32": NAME, "uint8": f"{NAME}_pixels"}
    versions = {d: near_free_repo(root / d, d, name) for d, name in names.items()}
    contract = load_spec(root / "float32" / NAME).contract
    images = {key: cost_image(size) for key, size in COST_IMAGES}
    out: dict[str, Any] = {}
    for key, data in images.items():
        runs = 30 if len(data) < 200_000 else 8
        out[key] = {
            "bytes": len(data),
            "decode_floor_ms": round(decode_floor_ms(data, contract, runs), 2),
            "preprocess_ms": round(cpu_ms_of(lambda d=data: preprocess(d, contract), runs), 2),
        }

    def measure_gateway(
        what: str, repo: Path, dtype: str, *args: str, env: dict[str, str] | None = None
    ) -> None:
        gw = start_gateway(repo, *args, env=env)
        try:
            for key, data in images.items():
                log(f"{what}, {key}, 16 clients ...")
                found = server_cpu_per_request(gw.proc.pid, gw.url, data, seconds, names[dtype])
                out[key][what] = found
                log(f"  {found}")
        finally:
            gw.stop()

    for dtype, what in (("float32", "gateway"), ("uint8", "gateway_uint8")):
        measure_gateway(what, root / dtype, dtype)
    if triton:
        trepo = root / "triton"
        for dtype, name in names.items():
            republish(root / dtype / name, trepo, "python-ort")
        log("starting tritonserver (CPU, python backend + ORT) ...")
        tritond = start_triton(
            trepo, free_port(), free_port(), free_port(), log_path=root / "t.log"
        )
        try:
            tritond.wait_ready(180)
            shm = {"RESNET_SERVE_TRITON_SHARED_MEMORY": "true"}
            for dtype, what, env in (
                ("float32", "gateway_triton", None),
                ("uint8", "gateway_triton_uint8", None),
                ("uint8", "gateway_triton_shm", shm),
            ):
                measure_gateway(
                    what,
                    trepo,
                    dtype,
                    *("--backend", "triton", "--triton-url", tritond.grpc_url),
                    env=env,
                )
        finally:
            tritond.stop()
    for peer in PEERS:
        with peer_server(peer, versions["float32"]) as (pid, url):
            for key, data in images.items():
                log(f"{peer} server, {key}, 16 clients ...")
                out[key][peer] = server_cpu_per_request(pid, url, data, seconds, NAME)
                log(f"  {out[key][peer]}")
    request_bytes = triton_request_bytes(root)
    log(f"gRPC request bytes per image to Triton (batch 8): {request_bytes}")
    for row in out.values():
        row["triton_request_bytes_per_image"] = request_bytes
        floor = row["decode_floor_ms"]
        embedded = row["gateway_uint8"]["requests_per_s"]
        for what in ("gateway_triton", "gateway_triton_uint8", "gateway_triton_shm"):
            if what in row:
                row[f"{what}_rate_vs_embedded"] = round(row[what]["requests_per_s"] / embedded, 2)
        for what in COST_SERVERS:
            if what in row:
                row[f"{what}_vs_floor"] = round(row[what]["cpu_ms_per_request"] / floor, 2)
        row["gateway_beyond_preprocess_ms"] = round(
            row["gateway"]["cpu_ms_per_request"] - row["preprocess_ms"], 2
        )
    return out


def triton_request_bytes(repo: Path, batch: int = 8) -> dict[str, float]:
    """Bytes per image of the gRPC request the Triton backend sends for a batch: the
    serialized ModelInferRequest, as tritonclient builds it, for float planes, for uint8
    pixels, and for uint8 in shared memory (where the request names a region instead)."""
    from tritonclient.grpc import InferInput, InferRequestedOutput
    from tritonclient.grpc._utils import _get_inference_request

    from service.repository import load_spec

    def size(spec: Any, shm: bool) -> float:
        c = spec.contract
        x = np.zeros((batch, *c.input_shape), c.dtype)
        inp, out = (
            InferInput(c.input_name, list(x.shape), c.datatype),
            InferRequestedOutput(c.output_name),
        )
        if shm:
            inp.set_shared_memory("region", x.nbytes)
            out.set_shared_memory("region", batch * c.num_classes * 4, offset=x.nbytes)
        else:
            inp.set_data_from_numpy(x)
        request = _get_inference_request(
            spec.name, [inp], spec.version, "", [out], 0, False, False, 0, None, None
        )
        return round(request.ByteSize() / batch, 1)

    fp32, pixels = load_spec(repo / "float32" / NAME), load_spec(repo / "uint8" / f"{NAME}_pixels")
    return {
        "grpc_float32": size(fp32, False),
        "grpc_uint8": size(pixels, False),
        "shm_uint8": size(pixels, True),
    }


def ideal_latencies_s(
    arrivals: list[float], cost: Callable[[int], float], max_batch: int
) -> list[float]:
    """Each request's latency on an ideal server under the same ``arrivals``: no overhead
    at all, first come first served, and whenever it is free it takes up to ``max_batch``
    of the requests that have arrived, each batch of n costing ``cost(n)`` (the bare
    model's, measured in the same run)."""
    latencies: list[float] = []
    free_at, i = 0.0, 0
    while i < len(arrivals):
        start = max(free_at, arrivals[i])
        j = i + 1
        while j < len(arrivals) and j - i < max_batch and arrivals[j] <= start:
            j += 1
        free_at = start + cost(j - i)
        latencies += [free_at - at for at in arrivals[i:j]]
        i = j
    return latencies


def poisson_p99_ms(url: str, body: bytes, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """One window of Poisson arrivals (``service.bench``'s open loop, no warm-up, so its
    schedule is ``poisson_schedule(rate, seconds, seed)``) against ``url``: p99 and answers."""

    async def step() -> Step:
        target = make_target("rest", url, NAME, [[body]])
        await target.open()
        try:
            return await open_loop(target, rate, Bounds(seconds), seed=seed)
        finally:
            await target.close()

    result = asyncio.run(step())
    return {"p99_ms": round(result.latency_ms(99), 1), "statuses": result.statuses}


def tail_vs_ideal(repo: Path, body: bytes, seconds: float, rounds: int = 3) -> dict[str, Any]:
    """The gateway and its peers (PEERS) on FP32 ResNet-50, each a server of its own in
    turn, in ``rounds`` interleaved rounds: 16 closed-loop clients (throughput as a ratio to
    bare ORT batch 8), then Poisson arrivals at 0.4x bare batch 8 (p99 as a ratio to the
    ideal server, ``ideal_latencies_s``, under the very same arrivals: one seed a round),
    from the bare model's batch costs measured here."""
    from service.batching import CostModel
    from service.bench.runner import poisson_schedule

    sizes = (1, 2, 4, 8)
    per_s = {n: bare_ort(onnx_of(repo), n, min(5.0, seconds / 4)) for n in sizes}
    costs = CostModel({n: n / per_s[n] for n in sizes})
    rate = 0.4 * per_s[8]
    out: dict[str, Any] = {
        "rate_per_s": round(rate, 2),
        "bare_batch8_images_per_s": round(per_s[8], 2),
        "bare_batch_cost_ms": {n: round(costs.cost(n) * 1000, 1) for n in sizes},
        "rounds": [],
    }
    servers = ("gateway", *PEERS)
    for seed in range(rounds):
        ideal = np.percentile(
            ideal_latencies_s(poisson_schedule(rate, seconds, seed), costs.cost, 8), 99
        )
        row: dict[str, Any] = {"seed": seed, "ideal_p99_ms": round(float(ideal) * 1000, 1)}
        for what in servers:
            with served_by(what, repo) as (pid, url):
                poisson_p99_ms(url, body, rate, 3.0, seed=1000)  # warm: sessions, batch costs
                log(f"round {seed + 1}, {what}: 16 clients, then Poisson {rate:.1f}/s ...")
                closed = server_cpu_per_request(pid, url, body, seconds)
                row[what] = {
                    "closed_loop_images_per_s": closed["requests_per_s"],
                    "closed_vs_bare8": round(closed["requests_per_s"] / per_s[8], 3),
                    **poisson_p99_ms(url, body, rate, seconds, seed),
                }
                row[what]["vs_ideal"] = round(row[what]["p99_ms"] / row["ideal_p99_ms"], 2)
        log(f"  {row}")
        out["rounds"].append(row)
    for what in servers:
        for key in ("vs_ideal", "closed_vs_bare8"):
            out[f"{what}_{key}_median"] = float(np.median([r[what][key] for r in out["rounds"]]))
    return out


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
        cwd=Path(__file__).parent.parent,
        start_new_session=True,
    )
    try:
        wait_until(answers, 120, f"{peer} server not up", alive=lambda: _exited(proc))
        yield proc.pid, url
    finally:
        stop_process(proc, 30, group=True)


def _exited(proc: subprocess.Popen[bytes]) -> str | None:
    return None if proc.poll() is None else f"exited with {proc.returncode}"


def start_gateway(
    repo: Path, *args: str, grpc: bool = False, env: dict[str, str] | None = None
) -> GatewayProcess:
    log_file = Path(tempfile.mkdtemp(prefix="resnet-bench-gw-")) / "gateway.log"
    return GatewayProcess.start(
        log_file,
        "--repository",
        str(repo),
        *args,
        grpc=grpc,
        env={"RESNET_SERVE_LOG_LEVEL": "warning", **(env or {})},
    )


def overload(
    repo: Path, body: bytes, unloaded: float, seconds: float, timeout_s: float
) -> dict[str, Any]:
    """Closed loops of 2x and 10x the clients the replica can serve within ``timeout_s``
    (its unloaded throughput x the timeout), on a gateway whose requests have that
    deadline: goodput, how fast refusals come, whether accepted requests keep their
    deadline, sent = answered. Clients wait Retry-After (jittered) as retry policies do;
    the 10x loop also runs with clients that retry at once, the worst case.

    The load generator shares the gateway's cores here (in production the clients are
    elsewhere), and a retry storm's sends cost CPU on both sides of the socket: it runs at
    niceness 19 (``LOAD_NICENESS``), taking what the gateway leaves, and each loop reports
    the cores the gateway's process tree had (from /proc). A starved generator reads its
    answers late: its refusal latencies are an upper bound on the gateway's."""
    capacity = max(1, round(unloaded * timeout_s))
    out: dict[str, Any] = {"timeout_s": timeout_s, "capacity_clients": capacity}
    # Its own gateway: the deadline is the server's (service.bench sends no per-request
    # timeout header). Each loop has 3 s of warm-up: the gateway is warm and the clients'
    # connections are open when the window starts.
    gw = start_gateway(repo, env={"RESNET_SERVE_REQUEST_TIMEOUT_S": str(timeout_s)})

    def loop(clients: int, polite: bool) -> tuple[Step, float]:
        cpu, start = process_cpu_s(gw.proc.pid), time.monotonic()
        r = load_niced(
            gw, body, LOAD_NICENESS, seconds=seconds, clients=clients, warmup_s=3, polite=polite
        )
        return r, (process_cpu_s(gw.proc.pid) - cpu) / (time.monotonic() - start)

    try:
        for name, clients, polite in (
            ("2x", 2 * capacity, True),
            ("10x", 10 * capacity, True),
            ("10x_no_backoff", 10 * capacity, False),
        ):
            log(f"overload {name}: {clients} clients, timeout {timeout_s}s ...")
            r, cores = loop(clients, polite)
            row = {
                "clients": clients,
                "goodput_images_per_s": round(r.images_per_s, 2),
                "goodput_vs_unloaded": round(r.images_per_s / unloaded, 3),
                "gateway_cores": round(cores, 2),
                "refused_p50_ms": round(r.latency_ms(50, "503"), 1),
                "accepted_p99_ms": round(r.latency_ms(99), 1),
                "late_504": r.statuses.get("504", 0),
                "statuses": r.statuses,
                "sent": r.requests,
                "answered_by_server": r.server["requests"],
                "server": r.server,
            }
            log(f"  {row}")
            out[name] = row
    finally:
        gw.stop()
    return out


def run(
    seconds: float, out: Path, triton: bool = True, latency_only: bool = False
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {"cpus": usable_cpus(), "node_cpus": os.cpu_count(), "isa": cpu_isa()}
    }
    with tempfile.TemporaryDirectory(prefix="resnet-bench-") as tmp:
        repo = Path(tmp)
        export_model(repo)
        onnx_path = onnx_of(repo)
        log("bare ONNX Runtime ...")
        bare1 = bare_ort(onnx_path, 1, seconds / 2)
        bare8 = bare_ort(onnx_path, 8, seconds)
        results["bare_ort"] = {
            "batch1_images_per_s": round(bare1, 2),
            "batch8_images_per_s": round(bare8, 2),
        }
        log(f"  batch 1: {bare1:.1f} img/s, batch 8: {bare8:.1f} img/s")
        # Beside the repository, not in it (a folder there would be read as a model).
        photos = calibration_images(Path(tempfile.mkdtemp(prefix="resnet-bench-photos-")))
        results["latency_under_load"] = latency_under_load(repo, photos, seconds, bare1, bare8)
        if latency_only:
            results["int8"] = bench_int8(Path(tmp) / "q", b"", seconds, bare8, latency_only=True)
            out.write_text(json.dumps(results, indent=2) + "\n")
            return results
        log("preprocessing ...")
        results["preprocess"] = preprocess_ms(repo)
        log(f"  {results['preprocess']}")
        results["parity"] = preprocessing_parity(repo, photos)
        results["cost"] = gateway_cost(seconds, triton)

        body = test_jpeg()
        gw = start_gateway(repo, grpc=True)
        try:
            log("gateway, 16 clients ...")
            r16 = load(gw, body, seconds, clients=16, warmup_s=3)
            log(f"  {line(r16)}")
            log("gateway, 1 client ...")
            r1 = load(gw, body, seconds / 2, clients=1)
            log(f"  {line(r1)}")
            rate = bare8 / 2
            log(f"gateway, Poisson arrivals at {rate:.1f}/s (half of bare batch-8) ...")
            rp = load(gw, body, seconds, rate=rate)
            log(f"  {line(rp)}")
            log("gateway gRPC API, 16 clients ...")
            rg = load(gw, body, seconds, clients=16, warmup_s=3, grpc=True)
            log(f"  {line(rg)}")
        finally:
            gw.stop()
        results["overload"] = overload(repo, body, r16.images_per_s, seconds, 2.0)
        results["tail"] = tail_vs_ideal(repo, body, seconds)
        results["tracing"] = tracing_cost(repo, body, seconds)
        results["rollout"] = rollout_cost(repo, body, seconds, bare8)
        results["gateway_rest_onnxruntime"] = {
            "clients16": r16.summary(),
            "clients1": r1.summary(),
            "poisson_half_bare": {**rp.summary(), "rate_per_s": round(rate, 2)},
            "ratio_vs_bare_batch8": round(r16.images_per_s / bare8, 3),
        }
        results["gateway_grpc_onnxruntime"] = {
            "clients16": rg.summary(),
            "ratio_vs_bare_batch8": round(rg.images_per_s / bare8, 3),
            "ratio_vs_rest": round(rg.images_per_s / r16.images_per_s, 3),
        }
        if triton:
            results["gateway_rest_triton"] = bench_triton(repo, body, seconds, bare8)
        results["int8"] = bench_int8(Path(tmp) / "q", body, seconds, bare8)
    out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def bench_triton(repo: Path, body: bytes, seconds: float, bare8: float) -> dict[str, Any]:
    from export.repository import republish
    from service.triton_launcher import start_triton

    trepo = repo.parent / "triton-repo"
    republish(repo / NAME, trepo, "python-ort")
    log("starting tritonserver (CPU, python backend + ORT) ...")
    tports = (free_port(), free_port(), free_port())
    triton = start_triton(trepo, *tports, log_path=repo.parent / "triton.log")
    try:
        triton.wait_ready(180)
        rt = gateway_clients16(
            "gateway -> Triton", trepo, body, seconds, "--backend", "triton",
            "--triton-url", triton.grpc_url,
        )  # fmt: skip
    finally:
        triton.stop()
    return {"clients16": rt.summary(), "ratio_vs_bare_batch8": round(rt.images_per_s / bare8, 3)}


def p50_p99(summary: dict[str, Any]) -> str:
    """A step summary's latency (successful requests), as the table shows it."""
    return f"{summary['latency_ms']['p50']:.1f} / {summary['latency_ms']['p99']:.1f} ms"


def latency_rows(what: str, section: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The latency-under-load section as table rows."""
    rows = []
    for name in ("defaults", "tuned"):
        if name not in section:
            continue
        r = section[name]
        settings = ", ".join(
            f"{k.removeprefix('RESNET_SERVE_')}={v}" for k, v in r["settings"].items()
        )
        rows.append(
            (
                f"{what}: highest Poisson rate with p99 <= {section['p99_budget_ms']} ms "
                f"(5x bare batch 1), {name}" + (f" ({settings})" if settings else ""),
                f"{r['max_rate_per_s']}/s, p99 {r.get('p99_ms', '-')} ms",
                f"{r['rate_vs_bare_batch8']:.2f}x (target 0.5x)",
            )
        )
    return rows


def table(results: dict[str, Any]) -> str:
    bare = results["bare_ort"]
    rows = [
        ("bare ONNX Runtime, batch 1", f"{bare['batch1_images_per_s']:.1f} img/s", ""),
        ("bare ONNX Runtime, batch 8", f"{bare['batch8_images_per_s']:.1f} img/s", "1.00x"),
        *latency_rows("FP32", results["latency_under_load"]),
    ]
    if "int8" in results:
        q = results["int8"]
        rows += [
            (
                f"bare ONNX Runtime INT8, batch 1 / 8 ({results['machine']['isa']})",
                f"{q['bare_batch1_images_per_s']:.1f} / {q['bare_batch8_images_per_s']:.1f} img/s",
                f"{q['bare_int8_vs_fp32_batch8']:.2f}x (INT8 vs FP32)",
            ),
            (
                f"INT8 top-1 vs FP32, {q['export_gates']['images']} photo crops: "
                f"{q['export_gates']['kernels']} kernels / exact reference",
                f"{q['export_gates']['kernels_top1_vs_fp32_pct']:.2f}% / "
                f"{q['export_gates']['exact_top1_vs_fp32_pct']:.2f}%",
                f"kernels vs exact: max diff "
                f"{q['export_gates']['kernels_max_diff_vs_exact_pct_of_largest']:.2f}% of the largest",
            ),
            *latency_rows("INT8", q["latency_under_load"]),
        ]
        if "gateway_clients16" in q:
            rows.append(
                (
                    "gateway REST serving INT8, 16 clients",
                    f"{q['gateway_clients16']['images_per_s']:.1f} img/s; p50 / p99 "
                    + p50_p99(q["gateway_clients16"]),
                    f"{q['gateway_vs_bare_int8_batch8']:.2f}x bare INT8",
                )
            )
    if "tail" in results:
        rows += peer_rows(results["tail"])
    if "parity" in results:
        par = results["parity"]
        rows += [
            (
                f"preprocessing vs torchvision's transform, {par['images']} images, {how}",
                f"max {par[how]['max_steps']:.2f} 8-bit steps, "
                f"{par[how]['values_differing_pct']:.3f}% of values differ; ResNet-50 top-1 "
                f"agreement {par[how]['top1_agreement_pct']:.1f}%, logits within "
                f"{par[how]['max_logit_diff_pct_of_largest']:.2f}% of the largest",
                "",
            )
            for how in ("bilinear", "bicubic")
        ]
    if "gateway_rest_onnxruntime" in results:
        rows += gateway_rows(results)
    lines = ["| what | figure | vs bare batch 8 |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


#: How the tables name the servers.
SERVER_NAMES = {
    "gateway": "gateway",
    "gateway_uint8": "gateway (uint8 graph)",
    "gateway_triton": "gateway before Triton (float planes)",
    "gateway_triton_uint8": "gateway before Triton (uint8 graph)",
    "gateway_triton_shm": "gateway before Triton (uint8, shared memory)",
    "tutorial": "tutorial server",
    "litserve": "LitServe (batch 8)",
}


def peer_rows(t: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The gateway beside its peers: closed-loop throughput and p99 against the ideal."""
    servers = ("gateway", *PEERS)
    n = len(t["rounds"])
    return [
        (
            f"16 clients, median of {n} rounds (bare batch 8 {t['bare_batch8_images_per_s']} img/s)",
            ", ".join(
                f"{SERVER_NAMES[s]} {t[f'{s}_closed_vs_bare8_median']:.2f}x" for s in servers
            ),
            "(each vs bare batch 8)",
        ),
        (
            f"p99 vs an ideal server, Poisson {t['rate_per_s']:.1f}/s (0.4x bare batch 8), "
            f"median of {n} rounds",
            ", ".join(f"{SERVER_NAMES[s]} {t[f'{s}_vs_ideal_median']:.2f}x" for s in servers),
            "",
        ),
    ]


def cost_table(cost: dict[str, Any]) -> str:
    """The "gateway cost per image" table: server CPU per request (from /proc) beside the floors."""
    heads = {**SERVER_NAMES, "gateway": "gateway (float planes)"}
    servers = [s for s in COST_SERVERS if all(s in r for r in cost.values())]
    lines = [
        "| image | decode floor | gateway preprocessing | "
        + " | ".join(heads[s] for s in servers)
        + " | gateway beyond preprocessing |",
        "|---" * (len(servers) + 4) + "|",
    ]
    for key, r in cost.items():
        cells = [
            f"{r[s]['cpu_ms_per_request']:.2f} ms ({r[s + '_vs_floor']:.2f}x)" for s in servers
        ]
        lines.append(
            f"| {key} ({r['bytes']:,} bytes) | {r['decode_floor_ms']:.2f} ms "
            f"| {r['preprocess_ms']:.2f} ms | "
            + " | ".join(cells)
            + f" | {r['gateway_beyond_preprocess_ms']:.2f} ms |"
        )
    first: dict[str, Any] = next(iter(cost.values()), {})
    if "triton_request_bytes_per_image" in first:
        b = first["triton_request_bytes_per_image"]
        rates = [
            f"{heads[s]} {first[s + '_rate_vs_embedded']:.2f}x"
            for s in ("gateway_triton", "gateway_triton_uint8", "gateway_triton_shm")
            if s + "_rate_vs_embedded" in first
        ]
        lines.append(
            f"\ngRPC request to Triton per image (batch 8): float planes {b['grpc_float32']:,.0f} "
            f"bytes, uint8 {b['grpc_uint8']:,.0f} bytes, uint8 in shared memory "
            f"{b['shm_uint8']:,.0f} bytes."
            # Without Triton (--no-triton) there are no rates to set beside the embedded one.
            + (
                f" Requests/s vs the embedded uint8 gateway, {next(iter(cost))}: "
                + ", ".join(rates)
                if rates
                else ""
            )
        )
    return "\n".join(lines)


def gateway_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The closed-loop, overload, Triton and preprocessing rows of a full run."""
    gw = results["gateway_rest_onnxruntime"]
    pre = results["preprocess"]
    rows = [
        (
            "gateway REST (embedded ORT), 16 clients",
            f"{gw['clients16']['images_per_s']:.1f} img/s",
            f"{gw['ratio_vs_bare_batch8']:.2f}x",
        ),
        (
            "  latency p50 / p99, 16 clients",
            p50_p99(gw["clients16"]),
            "",
        ),
        (
            "  latency p50 / p99, 1 client",
            p50_p99(gw["clients1"]),
            "",
        ),
        (
            f"  Poisson {gw['poisson_half_bare']['rate_per_s']}/s (half of bare): p50 / p99",
            p50_p99(gw["poisson_half_bare"]),
            "",
        ),
        (
            "gateway gRPC API (embedded ORT), 16 clients",
            f"{results['gateway_grpc_onnxruntime']['clients16']['images_per_s']:.1f} img/s "
            f"({results['gateway_grpc_onnxruntime']['ratio_vs_rest']:.2f}x REST)",
            f"{results['gateway_grpc_onnxruntime']['ratio_vs_bare_batch8']:.2f}x",
        ),
        (
            "  gRPC latency p50 / p99, 16 clients",
            p50_p99(results["gateway_grpc_onnxruntime"]["clients16"]),
            "",
        ),
    ]
    if "overload" in results:
        ov = results["overload"]
        for name in ("2x", "10x", "10x_no_backoff"):
            row = ov[name]
            rows.append(
                (
                    f"overload {name} ({row['clients']} clients, {ov['timeout_s']}s timeout): "
                    "goodput; 503 p50; 200 p99; 504s; sent/answered; gateway cores",
                    f"{row['goodput_images_per_s']} img/s; {row['refused_p50_ms']} ms; "
                    f"{row['accepted_p99_ms']} ms; {row['late_504']}; "
                    f"{row['sent']}/{row['answered_by_server']}; {row['gateway_cores']}",
                    f"{row['goodput_vs_unloaded']:.2f}x unloaded",
                )
            )
    if "tracing" in results:
        t = results["tracing"]
        rows.append(
            (
                "tracing on (100 % sampled, OTLP to a local receiver) vs off, 16 clients",
                f"{t['on_images_per_s']} vs {t['off_images_per_s']} img/s "
                f"({t['spans_received']} spans received)",
                f"{t['on_vs_off']:.2f}x off (target 0.95x)",
            )
        )
    if "gateway_rest_triton" in results:
        t = results["gateway_rest_triton"]
        rows += [
            (
                "gateway REST -> Triton (python backend + ORT), 16 clients",
                f"{t['clients16']['images_per_s']:.1f} img/s",
                f"{t['ratio_vs_bare_batch8']:.2f}x",
            ),
            (
                "  latency p50 / p99, 16 clients",
                p50_p99(t["clients16"]),
                "",
            ),
        ]
    rows += [
        ("preprocess 500x375 JPEG -> 224 tensor", f"{pre['jpeg_500x375_ms']} ms", ""),
        (
            "preprocess 4032x3024 JPEG, draft / full decode",
            f"{pre['jpeg_4032x3024_draft_ms']} / {pre['jpeg_4032x3024_full_decode_ms']} ms",
            "",
        ),
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each measured phase")
    parser.add_argument("--out", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--no-triton", action="store_true", help="skip the Triton phase")
    parser.add_argument(
        "--latency-only", action="store_true", help="bare ORT and latency under load only"
    )
    parser.add_argument(
        "--tracing-only", action="store_true", help="tracing on vs off (16 clients) only"
    )
    parser.add_argument(
        "--int8-only",
        action="store_true",
        help="bare FP32 and INT8, INT8's export gates, the gateway serving INT8 (16 clients)",
    )
    parser.add_argument(
        "--parity-only",
        action="store_true",
        help="preprocessing against torchvision's eval transform on real photos and noise",
    )
    parser.add_argument(
        "--tail-only",
        action="store_true",
        help="p99 under Poisson arrivals vs an ideal server under the same arrivals",
    )
    parser.add_argument(
        "--cost-only",
        action="store_true",
        help="gateway cost per image: server CPU per request vs decode floor and the peers",
    )
    parser.add_argument(
        "--lifecycle-only",
        action="store_true",
        help="p99 under Poisson arrivals with a shadow and across a reload only",
    )
    args = parser.parse_args()
    if not 1 <= args.seconds <= 120:
        parser.error("--seconds must be between 1 and 120")
    s = args.seconds
    phases = {
        "lifecycle_only": lambda root: {
            "rollout": rollout_cost(root, test_jpeg(), s, bare_ort(onnx_of(root), 8, s))
        },
        "int8_only": lambda root: {
            "machine": {"isa": cpu_isa()},
            "int8": bench_int8(
                root / "q", test_jpeg(), s, bare_ort(onnx_of(root), 8, s), latency=False
            ),
        },
        "tracing_only": lambda root: {"tracing": tracing_cost(root, test_jpeg(), s)},
        "parity_only": lambda root: {
            "parity": preprocessing_parity(
                root, calibration_images(Path(tempfile.mkdtemp(prefix="resnet-bench-photos-")))
            )
        },
        "tail_only": lambda root: {
            "machine": {"isa": cpu_isa()},
            "tail": tail_vs_ideal(root, test_jpeg(), s),
        },
        # Its near-free graphs are its own: no ResNet-50 export first.
        "cost_only": lambda _: {
            "machine": {"isa": cpu_isa()},
            "cost": gateway_cost(s, triton=not args.no_triton),
        },
    }
    for flag, phase in phases.items():
        if getattr(args, flag):
            # One phase on its own: the FP32 export it starts from, then the phase.
            with tempfile.TemporaryDirectory(prefix="resnet-bench-") as tmp:
                if flag != "cost_only":
                    export_model(Path(tmp))
                found = phase(Path(tmp))
            args.out.write_text(json.dumps(found, indent=2) + "\n")
            print(cost_table(found["cost"]) if "cost" in found else json.dumps(found, indent=2))
            return
    results = run(args.seconds, args.out, triton=not args.no_triton, latency_only=args.latency_only)
    print(table(results))
    if "cost" in results:
        print("\n" + cost_table(results["cost"]))


if __name__ == "__main__":
    main()
