"""Metrics the alert rules and the dashboard rely on that no other test pins down."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient

from service.app import create_app
from service.batching import Batcher
from service.metrics import Metrics
from service.settings import Settings


async def _echo(x: np.ndarray, timeout: float) -> np.ndarray:
    return x


def test_a_batcher_exports_its_queue_capacity_and_an_empty_queue():
    metrics = Metrics()
    Batcher(
        "m", _echo, max_batch=4, max_delay_s=0.01, max_queue=17, metrics=metrics, backend_name="t"
    )
    sample = metrics.registry.get_sample_value
    assert sample("resnet_serve_queue_capacity", {"model": "m"}) == 17
    # Present before the first request: depth / capacity is defined from the start.
    assert sample("resnet_serve_queue_depth", {"model": "m"}) == 0


def test_the_gateway_exports_the_configured_queue_capacity(tiny):
    app = create_app(Settings(repository=tiny.repository, max_queue_images=37))
    with TestClient(app) as client:
        text = client.get("/metrics").text
    assert 'resnet_serve_queue_capacity{model="tiny"} 37.0' in text
    assert "# HELP resnet_serve_queue_capacity Most images that may wait for a batch" in text
