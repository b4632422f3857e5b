"""A gateway's metrics read back (over /metrics or from its registry), and a process's
memory."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric


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


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux)."""
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
