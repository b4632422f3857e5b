"""What the alert rules and the Grafana dashboard ask Prometheus for, read roughly out of
their PromQL: metric names, the label names each selector matches on, the labels of
``by``/``without``/``on``/``ignoring``/``group_*`` clauses, and whether a metric is taken
``rate()``/``increase()`` of. Enough to hold them against what the gateway and Triton
really export (tests/e2e/test_observability_metrics.py); promtool checks the syntax."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import yaml

from tests.helpers.paths import DEPLOY

RULES = DEPLOY / "prometheus" / "alerts.yml"
ADAPTER_RULES = DEPLOY / "prometheus" / "adapter-rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "resnet-serving.json"

#: The labels Prometheus adds to every target (prometheus-operator's ServiceMonitor, or
#: deploy/prometheus/prometheus.yml): a selector or a `by` may use them on any metric.
TARGET_LABELS = frozenset(
    {"namespace", "pod", "container", "service", "endpoint", "job", "instance"}
)

#: Grafana's own variables, replaced before a query reaches Prometheus.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*", "$model": ".*"}

_TOKEN = re.compile(
    r"""(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      |(?P<range>\[[^\]]*\])
      |(?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
      |(?P<ident>[A-Za-z_:][\w:]*)
      |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}])
      |(?P<space>\s+)""",
    re.VERBOSE,
)
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk",
                 "quantile", "count_values"}  # fmt: skip
_KEYWORDS = _GROUPING | _AGGREGATIONS | {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_RATE = {"rate", "irate", "increase"}


@dataclass
class Use:
    """One selector of a metric in one expression."""

    metric: str
    labels: set[str]  # label names its matchers use
    in_rate: bool  # the direct argument of rate()/irate()/increase()


@dataclass
class Query:
    where: str  # "alerts.yml: ResnetServeErrorRatioHigh", "dashboard: panel 'Batch size' A"
    expr: str
    uses: list[Use] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read PromQL at {expr[pos : pos + 30]!r} in {expr!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind != "space":
            out.append((kind, m.group()))
    return out


def parse(where: str, expr: str) -> Query:
    q = Query(where, expr)
    toks = _tokens(expr)
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in _GROUPING:
            if nxt == "(":  # a label list (group_left may have none)
                j = i + 2
                while toks[j][1] != ")":
                    if toks[j][0] == "ident":
                        q.grouping.add(toks[j][1])
                    j += 1
                i = j
        elif kind == "ident" and text not in _KEYWORDS and nxt != "(":
            labels: set[str] = set()
            if nxt == "{":
                j = i + 2
                while toks[j][1] != "}":
                    if toks[j][0] == "ident" and toks[j + 1][1] in ("=", "!=", "=~", "!~"):
                        labels.add(toks[j][1])
                    j += 1
                end = j
            else:
                end = i
            in_rate = i >= 2 and toks[i - 1][1] == "(" and toks[i - 2][1] in _RATE
            q.uses.append(Use(text, labels, in_rate))
            i = end
        i += 1
    return q


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def rule_queries() -> Iterator[Query]:
    for r in rules():
        yield parse(f"alerts.yml: {r.get('alert') or r['record']}", r["expr"])


def recorded_labels() -> dict[str, set[str]]:
    """Recording rule name -> the labels its series carry (its grouping, its static labels)."""
    out: dict[str, set[str]] = {}
    for r in rules():
        if "record" in r:
            q = parse(r["record"], r["expr"])
            out.setdefault(r["record"], set()).update(q.grouping, r.get("labels", {}))
    return out


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def dashboard_queries() -> Iterator[Query]:
    """Every panel target, and the template variables' label_values(selector, label) (as
    ``selector`` with ``label`` among its matchers, so both are checked)."""
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            where = f"dashboard: panel {panel['title']!r} {t['refId']}"
            yield parse(where, grafana_to_promql(t["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["definition"])
        assert m, f"variable {var['name']}: expected label_values(selector, label)"
        q = parse(f"dashboard: variable {var['name']}", grafana_to_promql(m[1]))
        q.uses[0].labels.add(m[2])
        yield q


def adapter_rules() -> list[dict]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]


def adapter_to_promql(rule: dict, series: str | None = None) -> str:
    """A prometheus-adapter metricsQuery as the adapter sends it for one pod (its
    templates filled in; ``series``: the metric seriesQuery names)."""
    name = series or re.match(r"[A-Za-z_:][\w:]*", rule["seriesQuery"])[0]  # type: ignore[index]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", name)
        .replace("<<.LabelMatchers>>", 'namespace="ns",pod="p"')
        .replace("<<.GroupBy>>", "pod")
    )


def adapter_queries() -> Iterator[Query]:
    for r in adapter_rules():
        yield parse(f"adapter-rules.yaml: {r['name']['as']}", adapter_to_promql(r))


def all_queries() -> list[Query]:
    return [*rule_queries(), *dashboard_queries(), *adapter_queries()]


#: The gateway's own metrics (resnet_serve_*) and prometheus_client's standard ones.
GATEWAY_PREFIXES = ("resnet_serve_", "process_", "python_")


def gateway_metric_problems(q: Query, kinds: dict[str, str]) -> list[str]:
    """Each resnet_serve_*, process_* and python_* sample ``q`` names is one the gateway
    exports (``kinds``: tests.helpers.metrics.sample_kinds), and only counters and histogram
    parts go through rate()."""
    wrong = []
    for use in q.uses:
        if not use.metric.startswith(GATEWAY_PREFIXES):
            continue
        kind = kinds.get(use.metric)
        if kind is None:
            wrong.append(f"{q.where}: {use.metric} is not exported")
        elif use.in_rate != (kind in ("counter", "histogram")):
            wrong.append(
                f"{q.where}: {use.metric} ({kind}) {'in' if use.in_rate else 'not in'} rate()"
            )
    return wrong


def gateway_label_problems(q: Query, labels: dict[str, set[str]]) -> list[str]:
    """The labels each selector of a gateway metric in ``q`` matches on are its own
    (``labels``: tests.helpers.metrics.declared_labels) or target labels, and so are those
    a by/on clause names in a query made of gateway metrics only."""
    wrong = []
    gateway = [u for u in q.uses if u.metric in labels]
    for use in gateway:
        if extra := use.labels - labels[use.metric] - TARGET_LABELS:
            wrong.append(f"{q.where}: {use.metric} has no label {sorted(extra)}")
    if gateway and len(gateway) == len(q.uses):
        have = set(TARGET_LABELS).union(*(labels[u.metric] for u in gateway))
        if extra := q.grouping - have:
            wrong.append(f"{q.where}: no metric of it has {sorted(extra)}")
    return wrong
