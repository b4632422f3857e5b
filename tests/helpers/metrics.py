"""A gateway's metrics read back (over /metrics or from its registry), the metrics it
declares (names, types, labels), and a process's memory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from service.observability.metrics import Metrics


def scrape(url: str, name: str, **labels: str) -> float:
    """The sum of a gateway's /metrics samples ``name`` whose labels include ``labels``
    (``scrape(url, "resnet_serve_requests_total", outcome="overloaded")``), 0 if none."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return _sum(text_string_to_metric_families(httpx.get(url + "/metrics").text), name, labels)


def counted(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """:func:`scrape` on an in-process registry (a gateway run by a test client)."""
    return _sum(registry.collect(), name, labels)


def _sum(families: Iterable[Metric], name: str, labels: dict[str, str]) -> float:
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def sample_kinds(registry: CollectorRegistry) -> dict[str, str]:
    """Sample name -> its family's type ("counter", "histogram", "gauge", ...) for every
    family of ``registry``, with the names Prometheus stores: a counter's ``_total``, a
    histogram's ``_bucket``, ``_sum`` and ``_count``."""
    kinds: dict[str, str] = {}
    for family in registry.collect():
        if family.type == "counter":
            kinds[family.name + "_total"] = "counter"
        elif family.type == "histogram":
            kinds.update({family.name + s: "histogram" for s in ("_bucket", "_sum", "_count")})
        else:
            kinds[family.name] = family.type
    return kinds


def declared_labels(metrics: Metrics) -> dict[str, set[str]]:
    """Sample name -> label names, for every metric a gateway's ``Metrics`` declares (from
    its declarations: a labelled family has no samples until used)."""
    from prometheus_client.metrics import MetricWrapperBase

    out: dict[str, set[str]] = {}
    for m in vars(metrics).values():
        if not isinstance(m, MetricWrapperBase):
            continue
        names = set(m._labelnames)
        if m._type == "counter":
            out[m._name + "_total"] = names
        elif m._type == "histogram":
            out.update({m._name + "_sum": names, m._name + "_count": names})
            out[m._name + "_bucket"] = names | {"le"}
        else:
            out[m._name] = names
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
