"""Metrics the alert rules and the dashboard rely on that no other test pins down."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.dataplane.batching import Batcher
from service.observability.metrics import Metrics
from service.settings import Settings
from service.transports.http.app import create_app
from tests.helpers.images import image_bytes


async def _echo(x: np.ndarray, timeout: float) -> np.ndarray:
    return x


def test_a_batcher_exports_its_queue_capacity_and_an_empty_queue():
    metrics = Metrics()
    Batcher(
        "m",
        _echo,
        max_batch=4,
        max_delay_s=0.01,
        max_queue=17,
        metrics=metrics,
        backend_name="t",
        version="3",
    )
    sample = metrics.registry.get_sample_value
    assert sample("resnet_serve_queue_capacity", {"model": "m", "version": "3"}) == 17
    # Present before the first request: depth / capacity is defined from the start.
    assert sample("resnet_serve_queue_depth", {"model": "m", "version": "3"}) == 0


@pytest.mark.external
def test_the_gateway_exports_the_configured_queue_capacity(tiny):
    app = create_app(Settings(repository=tiny.repository, max_queue_images=37))
    with TestClient(app) as client:
        text = client.get("/metrics").text
    assert 'resnet_serve_queue_capacity{model="tiny",version="1"} 37.0' in text
    assert "# HELP resnet_serve_queue_capacity Most images that may wait for a batch" in text


@pytest.mark.external
def test_exposition_has_process_metrics_and_no_created_series(tiny):
    app = create_app(Settings(repository=tiny.repository))
    with TestClient(app) as client:
        client.post("/v1/classify", content=image_bytes(), headers={"content-type": "image/png"})
        text = client.get("/metrics").text
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_gc_collections_total",
        "python_info",
    ):
        assert name in names, name
    assert not [n for n in names if n.endswith("_created")]
    # One series per request kind and outcome; per-version model metrics (canaries).
    assert (
        'resnet_serve_requests_total{outcome="ok",route="/v1/classify",transport="http"} 1.0'
        in text
    )
    assert 'resnet_serve_images_total{model="tiny",version="1"} 1.0' in text
