"""Tracing's cost: the gateway with tracing off and on (every request sampled, exported over
OTLP/gRPC to a receiver in this process, so the exporter really serializes and sends)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.benchmarks.common import gateway_clients16
from service.tools.otlp_receiver import OtlpReceiver


def tracing_cost(repo: Path, body: bytes, seconds: float) -> dict[str, Any]:
    """16 closed-loop REST clients with tracing off and on (every request sampled, OTLP to
    a local receiver), off-on-on-off, each on a gateway of its own."""
    receiver = OtlpReceiver()
    on = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
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
        receiver.stop()
    off, traced = (sum(r) / len(r) for r in (rates["off"], rates["on"]))
    return {
        "off_images_per_s": [round(r, 2) for r in rates["off"]],
        "on_images_per_s": [round(r, 2) for r in rates["on"]],
        "on_vs_off": round(traced / off, 3),
        "spans_received": receiver.spans,
    }
