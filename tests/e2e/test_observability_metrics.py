"""Every metric the alert rules and the Grafana dashboard in deploy/ use is one that the
gateway or Triton really exports, with the labels they match and group on, and of the type
they treat it as (rate() of counters and histogram parts only). The expositions come from
a real tritonserver after inferences, and from the Triton-backend gateway in front of it
(Triton in explicit model control, driven by the gateway) after REST and gRPC
classifications shadowed to a second version, a rejected request, one admin reload that
loads a version and one that fails, and failed backend calls (Triton killed), so that every
labelled family has samples. The gateway's metrics are its own
(resnet_serve_*) and prometheus_client's standard process_* and python_* ones; everything
else is Triton's (nv_*): a CPU Triton's, with the GPU families a GPU Triton adds
(tests/data/triton_gpu_metrics.txt). `up` is Prometheus's own."""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest

from service.host.processes import GatewayProcess, wait_until
from service.model.repository import MODEL_FILENAME, Rollout, write_rollout
from service.transports.grpc import classifier_pb2, classifier_pb2_grpc
from tests.helpers import promql
from tests.helpers.images import image_bytes
from tests.helpers.metrics import scrape
from tests.helpers.triton import start_real_triton

pytestmark = pytest.mark.triton
PNG = {"content-type": "image/png"}
ADMIN = "obs-admin-key"
GPU_METRICS = Path(__file__).parents[1] / "data" / "triton_gpu_metrics.txt"
_SAMPLE = re.compile(r"(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>.*)\})? \S+( \d+)?$")
_LABEL = re.compile(r'(\w+)="(?:[^"\\]|\\.)*"')


@dataclass
class Exposition:
    """Sample name -> its label names, and -> its family's type."""

    text: str
    labels: dict[str, set[str]] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Exposition:
        """Sample names as Prometheus stores them: as written (prometheus_client's parser
        would add _total to Triton's counters, which Prometheus does not)."""
        exp = cls(text)
        families: dict[str, str] = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                families[name] = kind
            elif line and not line.startswith("#"):
                m = _SAMPLE.match(line)
                assert m, f"unreadable sample line {line!r}"
                name = m["name"]
                exp.labels.setdefault(name, set()).update(_LABEL.findall(m["labels"] or ""))
                base = re.sub(r"_(bucket|sum|count)$", "", name)
                histogram = families.get(base) == "histogram" and base != name
                exp.types[name] = "histogram" if histogram else families.get(name, "untyped")
        return exp


@pytest.fixture(scope="module")
def expositions(tiny, tmp_path_factory) -> dict[str, Exposition]:
    """Its own Triton (on the tiny model only; it gets killed), not the shared fixture."""
    from export.repository import republish

    base = tmp_path_factory.mktemp("obs")
    repo = base / "repo"
    # Versions 1 (serving) and 2 (its shadow): the gateway asks Triton for both.
    for _ in range(2):
        republish(tiny.model_dir, repo, "python-ort")
    model_dir = repo / tiny.name
    write_rollout(model_dir, Rollout(weights={"1": 1}, shadow="2"))
    triton = start_real_triton(repo, base / "triton.log", control="explicit")
    gw = None
    try:
        gw = GatewayProcess.start(
            base / "gw.log",
            *("--repository", str(repo), "--backend", "triton", "--triton-url", triton.grpc_url),
            grpc=True,
            env={"RESNET_SERVE_ADMIN_KEYS": ADMIN},
        )
        image = image_bytes()
        with httpx.Client(base_url=gw.url, timeout=30) as client:
            assert client.post("/v1/classify", content=image, headers=PNG).status_code == 200
            assert client.post("/v1/classify", content=b"no image", headers=PNG).status_code == 415
            with grpc.insecure_channel(gw.grpc_target) as channel:
                stub = classifier_pb2_grpc.ClassifierStub(channel)
                stub.Classify(classifier_pb2.ClassifyRequest(images=[image]), timeout=30)
            wait_until(
                lambda: scrape(gw.url, "resnet_serve_shadow_images_total", outcome="compared") == 2,
                30,
                "the shadow did not compare both classifications",
            )
            # One reload that loads a version (3), one that cannot (4: a truncated graph).
            admin = {"X-API-Key": ADMIN}
            republish(model_dir, repo, "python-ort")
            reload = client.post(f"/v1/models/{tiny.name}/reload", headers=admin)
            assert reload.status_code == 200 and reload.json()["added"] == ["3"], reload.text
            broken = model_dir / str(republish(model_dir, repo, "python-ort")) / MODEL_FILENAME
            data = broken.read_bytes()
            broken.unlink()  # publishing hard-links files between versions
            broken.write_bytes(data[:16])
            reload = client.post(f"/v1/models/{tiny.name}/reload", headers=admin)
            assert reload.status_code == 409, reload.text
            triton_text = httpx.get(f"http://127.0.0.1:{triton.metrics_port}/metrics").text
            # Failed backend calls: Triton gone under the gateway (README: Triton backend).
            triton.proc.send_signal(signal.SIGKILL)
            triton.stop()
            failed = 'resnet_serve_backend_errors_total{backend="triton"'
            wait_until(
                lambda: (
                    client.post("/v1/classify", content=image, headers=PNG).status_code == 503
                    and failed in client.get("/metrics").text
                ),
                30,
                "no failed backend call counted",
            )
            gateway_text = client.get("/metrics").text
    finally:
        if gw is not None:
            gw.stop()
        triton.stop()
    # A CPU Triton has no GPU families: a GPU Triton's are added (tests/data), after
    # checking that they are not there already, so none is hidden.
    gpu_text = GPU_METRICS.read_text()
    assert not set(Exposition.parse(gpu_text).labels) & set(Exposition.parse(triton_text).labels)
    return {
        "gateway": Exposition.parse(gateway_text),
        "triton": Exposition.parse(triton_text + gpu_text),
    }


def samples(exp: Exposition, name: str) -> list[dict[str, str]]:
    """The label sets of ``name``'s samples."""
    return [
        dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        for line in exp.text.splitlines()
        if (m := _SAMPLE.match(line)) and m["name"] == name
    ]


#: Metric name prefixes the gateway exports (the rest, nv_*, are Triton's).
GATEWAY = ("resnet_serve_", "process_", "python_")


def _exported(expositions: dict[str, Exposition], metric: str) -> Exposition | None:
    source = "gateway" if metric.startswith(GATEWAY) else "triton"
    exp = expositions[source]
    return exp if metric in exp.labels else None


def test_the_real_expositions_hold_what_the_checks_rely_on(expositions):
    gw, triton = expositions["gateway"], expositions["triton"]
    assert gw.labels["resnet_serve_queue_capacity"] == {"model", "version"}
    assert gw.labels["resnet_serve_backend_errors_total"] == {
        "model",
        "version",
        "backend",
        "code",
    }
    assert gw.labels["resnet_serve_requests_total"] == {"transport", "route", "outcome"}
    assert gw.labels["resnet_serve_request_duration_seconds_bucket"] == {
        "transport",
        "route",
        "le",
    }
    assert gw.types["resnet_serve_request_duration_seconds_bucket"] == "histogram"
    assert gw.types["resnet_serve_requests_total"] == "counter"
    # Both transports, and an error's code as the outcome, are in the one counter.
    requests = samples(gw, "resnet_serve_requests_total")
    for transport, route, outcome in (
        ("http", "/v1/classify", "ok"),
        ("http", "/v1/classify", "unsupported_media_type"),
        ("grpc", "resnet_serving.v1.Classifier/Classify", "ok"),
    ):
        assert {"transport": transport, "route": route, "outcome": outcome} in requests, requests
    # The lifecycle's: a reload that loaded version 3, one that could not load version 4;
    # version 1 serves every unpinned request, version 2 shadows it.
    loads = {(s["version"], s["outcome"]) for s in samples(gw, "resnet_serve_model_loads_total")}
    assert loads == {("3", "ok"), ("4", "failed")}
    assert gw.labels["resnet_serve_model_load_failing"] == {"model"}
    weights = {s["version"] for s in samples(gw, "resnet_serve_traffic_weight")}
    assert weights == {"1", "2", "3"}
    assert {
        (s["version"], s["shadow"], s["outcome"])
        for s in samples(gw, "resnet_serve_shadow_images_total")
    } == {("1", "2", "compared")}
    assert gw.types["resnet_serve_shadow_score_drift_bucket"] == "histogram"
    assert gw.types["process_cpu_seconds_total"] == "counter"
    assert gw.types["process_resident_memory_bytes"] == "gauge"
    assert not [name for name in gw.labels if name.endswith("_created")]
    # Triton's counters carry no _total suffix (its exposition is not OpenMetrics).
    assert triton.types["nv_inference_count"] == "counter"
    assert triton.labels["nv_inference_request_failure"] == {"model", "version", "reason"}


def test_every_metric_used_is_really_exported(expositions):
    recorded = promql.recorded_labels()
    missing = []
    for q in promql.all_queries():
        for use in q.uses:
            if use.metric == "up" or use.metric in recorded:
                continue
            if _exported(expositions, use.metric) is None:
                missing.append(f"{q.where}: {use.metric}")
    assert not missing, "\n".join(missing)
    # The rules' own names: only `up` and recording rules are allowed besides.
    used = {u.metric for q in promql.all_queries() for u in q.uses}
    assert {m for m in used if not m.startswith((*GATEWAY, "nv_"))} <= {"up", *recorded}


def test_rate_is_taken_of_counters_and_histograms_only(expositions):
    wrong = []
    for q in promql.all_queries():
        for use in q.uses:
            exp = _exported(expositions, use.metric)
            if exp is None:
                continue
            kind = exp.types[use.metric]
            if use.in_rate != (kind in ("counter", "histogram")):
                wrong.append(
                    f"{q.where}: {use.metric} ({kind}) {'in' if use.in_rate else 'not in'} rate()"
                )
    assert not wrong, "\n".join(wrong)


def test_every_label_used_is_on_the_metric(expositions):
    """A selector's labels are on its metric (or are target labels); a by/on clause's labels
    are on some metric of its expression (or a recording rule's, or target labels)."""
    recorded = promql.recorded_labels()
    wrong = []
    for q in promql.all_queries():
        available: set[str] = set(promql.TARGET_LABELS)
        for use in q.uses:
            if use.metric == "up":
                have: set[str] = set()
            elif use.metric in recorded:
                have = recorded[use.metric]
            else:
                exp = _exported(expositions, use.metric)
                have = exp.labels[use.metric] if exp else set()
            available |= have
            if extra := use.labels - have - promql.TARGET_LABELS:
                wrong.append(f"{q.where}: {use.metric} has no label {sorted(extra)}")
        if extra := q.grouping - available:
            wrong.append(f"{q.where}: no metric of it has {sorted(extra)}")
    assert not wrong, "\n".join(wrong)
