"""The Prometheus rules, scrape config and Grafana dashboard in deploy/, checked with the
real promtool. Whether the metrics they name are the ones really exported is
tests/e2e/test_observability_metrics.py (it needs a real gateway and a real Triton)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy import promql
from tests.deploy.conftest import DEPLOY, tool

PROM = DEPLOY / "prometheus"
CONFIG = PROM / "prometheus.yml"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout}\n{proc.stderr}"


# --- rules ------------------------------------------------------------------------------------


def test_rules_pass_promtool_check():
    proc = promtool("check", "rules", "alerts.yml")
    assert_ok(proc)
    assert f"SUCCESS: {len(promql.rules())} rules found" in proc.stdout


def test_rules_pass_their_promtool_unit_tests():
    assert_ok(promtool("test", "rules", "alerts_test.yml"))


def test_every_alert_says_how_long_how_bad_what_and_where_to_look():
    alerts = [r for r in promql.rules() if "alert" in r]
    assert len(alerts) >= 8
    assert len({a["alert"] for a in alerts}) == len(alerts)
    for a in alerts:
        assert re.fullmatch(r"\d+[smh]", a.get("for", "")), a["alert"]
        assert a["labels"]["severity"] in {"warning", "critical"}, a["alert"]
        assert {"summary", "description", "runbook"} <= set(a["annotations"]), a["alert"]
        assert "README.md" in a["annotations"]["runbook"], a["alert"]


def test_every_alert_is_unit_tested_firing_and_quiet():
    cases = [
        case
        for t in yaml.safe_load((PROM / "alerts_test.yml").read_text())["tests"]
        for case in t.get("alert_rule_test", [])
    ]
    alerts = {r["alert"] for r in promql.rules() if "alert" in r}
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == alerts
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == alerts


def test_rules_are_plain_yaml_a_prometheusrule_can_embed():
    """No Helm templating and no job names; the only Go templates are Prometheus's own
    alert templates, of the few forms the chart has to escape when it embeds the file."""
    text = (PROM / "alerts.yml").read_text()
    assert set(yaml.safe_load(text)) == {"groups"}
    assert "job=" not in text and '"job"' not in text
    for template in re.findall(r"\{\{.*?\}\}", text):
        assert re.fullmatch(
            r"\{\{ \$(labels\.\w+|value)( \| humanize(Percentage|Duration)?)? \}\}", template
        ), template
    assert "{{-" not in text and ".Values" not in text and ".Release" not in text


# --- scrape config ----------------------------------------------------------------------------

#: What Kubernetes pod discovery yields (one target per declared container port): a
#: gateway pod (REST + gRPC ports) and a Triton pod (3 ports), both annotated; a pod that
#: is not annotated; an annotated pod that is not running.
PODS = [
    ("prod", "gw-0", "gateway", "8000", "http", "8000", None, "Running"),
    ("prod", "gw-0", "gateway", "50051", "grpc", "8000", None, "Running"),
    ("prod", "triton-0", "triton", "8000", "http", "8002", "/metrics", "Running"),
    ("prod", "triton-0", "triton", "8001", "grpc", "8002", "/metrics", "Running"),
    ("prod", "triton-0", "triton", "8002", "metrics", "8002", "/metrics", "Running"),
    ("prod", "other-0", "app", "9090", "http", None, None, "Running"),
    ("prod", "gw-9", "gateway", "8000", "http", "8000", None, "Pending"),
]


def _static_pods() -> list[dict]:
    ips = {pod: f"10.0.0.{n}" for n, pod in enumerate(dict.fromkeys(p[1] for p in PODS), 1)}
    out = []
    for ns, pod, container, port, port_name, ann_port, path, phase in PODS:
        labels = {
            "__meta_kubernetes_namespace": ns,
            "__meta_kubernetes_pod_name": pod,
            "__meta_kubernetes_pod_ip": ips[pod],
            "__meta_kubernetes_pod_phase": phase,
            "__meta_kubernetes_pod_container_name": container,
            "__meta_kubernetes_pod_container_port_number": port,
            "__meta_kubernetes_pod_container_port_name": port_name,
            "__meta_kubernetes_pod_label_app_kubernetes_io_name": f"resnet-{container}",
        }
        if ann_port:
            labels["__meta_kubernetes_pod_annotation_prometheus_io_scrape"] = "true"
            labels["__meta_kubernetes_pod_annotation_prometheus_io_port"] = ann_port
        if path:
            labels["__meta_kubernetes_pod_annotation_prometheus_io_path"] = path
        out.append({"targets": [f"{ips[pod]}:{port}"], "labels": labels})
    return out


def _with_static_pods(tmp_path: Path) -> Path:
    """prometheus.yml with Kubernetes pod discovery replaced by PODS (what it would have
    discovered), rules by absolute path."""
    config = yaml.safe_load(CONFIG.read_text())
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
        job["static_configs"] = _static_pods()
    config["rule_files"] = [str(PROM / f) for f in config["rule_files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_scrape_config_passes_promtool_check(tmp_path):
    proc = promtool("check", "config", "prometheus.yml")
    if "field kubernetes_sd_configs not found" in proc.stdout + proc.stderr:
        # Debian's promtool (what `make tools` installs) is built without Kubernetes
        # discovery: check everything else, the rules and every relabeling included.
        proc = promtool("check", "config", str(_with_static_pods(tmp_path)))
    assert_ok(proc)
    assert "SUCCESS" in proc.stdout and "alerts.yml" in proc.stdout


def test_scrape_config_labels_targets_the_way_prometheus_operator_does(tmp_path):
    """Prometheus's own relabeling (promtool check service-discovery) on PODS: one target
    per annotated port, labelled namespace/pod/container/service like a ServiceMonitor."""
    proc = promtool(
        "check",
        "service-discovery",
        "--timeout=3s",
        str(_with_static_pods(tmp_path)),
        "kubernetes-pods",
    )
    assert_ok(proc)
    kept = [t["labels"] for t in json.loads(proc.stdout) if t["labels"]]
    got = sorted(
        (
            t["namespace"],
            t["pod"],
            t["container"],
            t["service"],
            t["__address__"],
            t["__metrics_path__"],
        )
        for t in kept
    )
    assert got == [
        ("prod", "gw-0", "gateway", "resnet-gateway", "10.0.0.1:8000", "/metrics"),
        ("prod", "triton-0", "triton", "resnet-triton", "10.0.0.2:8002", "/metrics"),
    ], proc.stdout


# --- dashboard --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard():
    return promql.dashboard()


def test_dashboard_is_well_formed(dashboard):
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] == "resnet-serving"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "model"):
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), ids
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            assert t.get("expr", "").strip(), p["title"]


def test_dashboard_queries_are_valid_promql(tmp_path, dashboard):
    """promtool parses every panel query (Grafana's variables substituted) as a rule."""
    rules = [
        {
            "record": f"dashboard:panel_{p['id']}_{t['refId']}",
            "expr": promql.grafana_to_promql(t["expr"]),
        }
        for p in dashboard["panels"]
        for t in p.get("targets", [])
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert_ok(promtool("check", "rules", str(path)))


def test_dashboard_covers_gateway_and_triton(dashboard):
    used = {u.metric for q in promql.dashboard_queries() for u in q.uses}
    for needed in (
        "resnet_serve_requests_total",
        "resnet_serve_request_duration_seconds_bucket",
        "resnet_serve_grpc_duration_seconds_bucket",
        "resnet_serve_images_total",
        "resnet_serve_batch_size_bucket",
        "resnet_serve_queue_depth",
        "resnet_serve_queue_capacity",
        "resnet_serve_queue_wait_seconds_bucket",
        "resnet_serve_preprocess_seconds_bucket",
        "resnet_serve_inference_seconds_bucket",
        "resnet_serve_rejections_total",
        "resnet_serve_backend_errors_total",
        "resnet_serve_ready",
        "resnet_serve_inflight_requests",
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_request_duration_us",
    ):
        assert needed in used, needed
    assert not [m for m in used if m.startswith(("nv_gpu", "nv_energy"))]  # a CPU Triton
