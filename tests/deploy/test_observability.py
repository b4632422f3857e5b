"""The Prometheus rules, scrape config and Grafana dashboard in deploy/, checked with the
real promtool; the gateway metrics, routes and outcome codes they name, against
service/ (its metric registry, its routes, service/errors.py). Whether the metrics are
really exported with the labels they use is tests/e2e/test_observability_metrics.py (it
needs a real gateway and a real Triton)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from tritonclient.grpc import service_pb2

from service.errors import ServiceError
from service.observability.metrics import Metrics
from service.transports.grpc import classifier_pb2
from service.transports.http.kserve_http import v2, v2_models
from service.transports.http.ops import ops
from service.transports.http.rest_v1 import admin, api
from tests.helpers import promql
from tests.helpers.docs import doc_sections
from tests.helpers.metrics import declared_labels, sample_kinds
from tests.helpers.paths import DEPLOY, ROOT, tool

PROM = DEPLOY / "prometheus"
DOC_SECTIONS = doc_sections(ROOT)
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
        for ref in a["annotations"]["runbook"].split(", "):
            assert ref in DOC_SECTIONS, (a["alert"], ref, "not a page or section of docs/")


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


def test_adapter_rules_parse_and_select_by_pod(tmp_path):
    """Each rule of deploy/prometheus/adapter-rules.yaml (its templates filled in as
    prometheus-adapter fills them) parses, and maps the namespace and pod labels to their
    resources (the chart's HPAs ask for exactly the metrics they serve: test_chart.py)."""
    rules = promql.adapter_rules()
    recs = [
        {"record": f"adapter:{r['name']['as']}", "expr": promql.adapter_to_promql(r)} for r in rules
    ]
    path = tmp_path / "adapter_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": recs}]}))
    assert_ok(promtool("check", "rules", str(path)))
    for r in rules:
        assert r["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert "<<.LabelMatchers>>" in r["metricsQuery"] and "<<.GroupBy>>" in r["metricsQuery"]


def test_dashboard_covers_gateway_and_triton(dashboard):
    used = {u.metric for q in promql.dashboard_queries() for u in q.uses}
    for needed in (
        "resnet_serve_requests_total",
        "resnet_serve_request_duration_seconds_bucket",
        "resnet_serve_images_total",
        "resnet_serve_batch_size_bucket",
        "resnet_serve_queue_depth",
        "resnet_serve_queue_capacity",
        "resnet_serve_queue_wait_seconds_bucket",
        "resnet_serve_preprocess_seconds_bucket",
        "resnet_serve_inference_seconds_bucket",
        "resnet_serve_backend_errors_total",
        "resnet_serve_ready",
        "resnet_serve_inflight_requests",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_request_duration_us",
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_memory_total_bytes",
    ):
        assert needed in used, needed
    # The GPU families, which only a GPU Triton exports, only in the "GPUs" row.
    gpu_panels = {p["title"] for p in _row(dashboard, "GPUs")}
    for q in promql.dashboard_queries():
        if any(u.metric.startswith("nv_gpu") for u in q.uses):
            assert any(f"panel {title!r} " in q.where for title in gpu_panels), q.where


def _row(dashboard, title: str) -> list[dict]:
    """The panels below the row ``title``, up to the next row."""
    out: list[dict] = []
    inside = False
    for p in sorted(dashboard["panels"], key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"])):
        if p["type"] == "row":
            inside = p["title"] == title
        elif inside:
            out.append(p)
    return out


def test_dashboard_shows_versions_and_rollout(dashboard):
    """Traffic weights, images per version, reloads, and how each shadow compares with the
    version it shadows (ratios of its counters, drift quantiles, images by outcome)."""
    panels = _row(dashboard, "Versions and rollout")
    metrics = {
        u.metric
        for p in panels
        for t in p["targets"]
        for u in promql.parse(p["title"], promql.grafana_to_promql(t["expr"])).uses
    }
    assert metrics == {
        "resnet_serve_traffic_weight",
        "resnet_serve_images_total",
        "resnet_serve_model_loads_total",
        "resnet_serve_model_load_failing",
        "resnet_serve_shadow_top1_agreements_total",
        "resnet_serve_shadow_top5_overlap_total",
        "resnet_serve_shadow_images_total",
        "resnet_serve_shadow_score_drift_bucket",
    }
    by_title = {p["title"]: p for p in panels}
    # Agreement is over the images compared, not those dropped or failed.
    agreement = by_title["Shadow agreement"]
    for t in agreement["targets"]:
        assert t["expr"].endswith('outcome="compared"}[$__rate_interval]))'), t["expr"]
    # The line drawn is the alert's threshold.
    (alert,) = [r for r in promql.rules() if r.get("alert") == "ResnetServeShadowDisagrees"]
    (threshold,) = re.findall(r"\) < ([\d.]+)", alert["expr"])
    steps = agreement["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == float(threshold)
    drift = [t["expr"] for t in by_title["Shadow score drift"]["targets"]]
    assert [e.split(",")[0] for e in drift] == ["histogram_quantile(0.5", "histogram_quantile(0.99"]


# --- the gateway's names: metrics, routes, outcomes ----------------------------------------

#: The recording rule that defines a failed call.
ERRORS_RULE = "namespace:resnet_serve_call_errors:rate5m"
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)\s*\{((?:[^}\"]|\"(?:[^\"\\]|\\.)*\")*)\}")


def _matchers(label: str) -> list[tuple[str, str, str, str]]:
    """(where, metric, operator, value) of every matcher on ``label`` in the rules and
    dashboard."""
    return [
        (q.where, metric, op, value)
        for q in promql.all_queries()
        for metric, body in _SELECTOR.findall(q.expr)
        for name, op, value in _MATCHER.findall(body)
        if name == label
    ]


def test_every_gateway_metric_used_is_in_its_registry():
    """Without a running gateway (the e2e test checks labels on a real one): each
    resnet_serve_*, process_* and python_* sample named is one that service.observability.metrics defines,
    and only counters and histogram parts go through rate()."""
    kinds = sample_kinds(Metrics().registry)
    wrong = [w for q in promql.all_queries() for w in promql.gateway_metric_problems(q, kinds)]
    assert not wrong, "\n".join(wrong)


def test_every_gateway_label_used_is_on_its_metric():
    """Without a running gateway (the e2e test checks a real exposition, where a family
    only has samples once used, e.g. the shadow metrics): the labels each selector of a
    resnet_serve_* metric matches on are its own or target labels, and so are those a
    by/on clause names in a query made of gateway metrics only."""
    labels = declared_labels(Metrics())
    assert labels["resnet_serve_shadow_images_total"] == {"model", "version", "shadow", "outcome"}
    wrong = [w for q in promql.all_queries() for w in promql.gateway_label_problems(q, labels)]
    assert not wrong, "\n".join(wrong)


def _routes() -> tuple[set[str], set[str]]:
    """Every route label the gateway gives (HTTP route templates, gRPC methods), and the
    calls among them: HTTP POSTs but the admin API's (every classify and infer route) and
    gRPC Classify and ModelInfer (not ReloadModel)."""
    routes, calls = {"unmatched"}, set()
    for router in (api, admin, ops, v2, v2_models):
        for r in router.routes:
            routes.add(r.path)
            if "POST" in r.methods and router is not admin:
                calls.add(r.path)
    for pb in (classifier_pb2, service_pb2):
        for svc in pb.DESCRIPTOR.services_by_name.values():
            for method in svc.methods:
                name = f"{svc.full_name}/{method.name}"
                routes.add(name)
                if method.name in ("Classify", "ModelInfer"):
                    calls.add(name)
    return routes, calls


def test_one_call_selector_selects_every_classify_and_infer_route_and_nothing_else():
    routes, calls = _routes()
    # /v1/classify, /v1/models/{model}/classify, .../versions/{version}/classify, the two
    # KServe infer routes, Classify, ModelInfer.
    assert len(calls) == 7, calls
    assert "/v1/models/{model}/reload" in routes - calls
    assert "resnet_serving.v1.Classifier/ReloadModel" in routes - calls
    used = _matchers("route")
    assert used
    assert {(op, value) for _, _, op, value in used} == {("=~", used[0][3])}, used
    selected = {r for r in routes if re.fullmatch(used[0][3], r)}
    assert selected == calls


def _codes() -> dict[str, type]:
    """Every outcome code of service/errors.py, with the (first) class that carries it."""
    out: dict[str, type[ServiceError]] = {}
    todo: list[type[ServiceError]] = [ServiceError]
    while todo:
        cls = todo.pop(0)
        if cls.__module__ == ServiceError.__module__:
            out.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return out


def test_outcomes_used_are_real_codes_and_failures_are_the_5xx_other_than_503():
    """A failed call is an outcome whose HTTP status is 5xx but not 503 (503s are refusals:
    shedding, no backend, a drain); the rules' failure regex is exactly those codes."""
    codes = _codes()
    failures = {c for c, cls in codes.items() if cls.http_status >= 500 and cls.http_status != 503}
    assert failures == {"internal", "deadline_exceeded"}
    # The admin API's refusals are the caller's (403), or the repository's (409: the
    # versions serving go on serving; ResnetServeModelLoadFailing watches those).
    assert {"forbidden", "load_failed"} <= set(codes) - failures
    # Other counters' outcomes are their own (service/runtime/lifecycle.py, service/runtime/shadow.py), as
    # their help texts say.
    metrics, vocabulary = Metrics(), {}
    for attr, words in (
        ("model_loads", {"ok", "failed"}),
        ("shadow_images", {"compared", "dropped", "failed"}),
    ):
        family = getattr(metrics, attr)
        assert all(w in family._documentation for w in words), attr
        vocabulary[family._name + "_total"] = words
    seen = set()
    for where, metric, op, value in _matchers("outcome"):
        values = value.split("|") if op in ("=~", "!~") else [value]
        allowed = vocabulary.get(metric, {"ok", *codes})
        assert set(values) <= allowed, f"{where}: {metric} {op}{value!r}"
        seen.add(metric)
    assert "resnet_serve_shadow_images_total" in seen
    (errors,) = [r for r in promql.rules() if r.get("record") == ERRORS_RULE]
    (regex,) = [v for name, _, v in _MATCHER.findall(errors["expr"]) if name == "outcome"]
    assert {c for c in [*codes, "ok"] if re.fullmatch(regex, c)} == failures
