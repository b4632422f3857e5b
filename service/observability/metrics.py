"""Prometheus metrics. One registry per app (tests build many apps in one process).

Labels are bounded: routes are templates (``/v1/models/{model}/classify``) or gRPC methods,
models are the served set, outcomes and codes are fixed vocabularies. Never a raw path or a
client value. Every request, on every transport, is counted once in ``requests_total``
with one ``outcome`` label: ``ok`` or its error code (the same code the body or the
trailers carry). No ``*_created`` series: they double the series count for a timestamp
that ``process_start_time_seconds`` already gives.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

disable_created_metrics()

_LATENCY = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self.registry = r = CollectorRegistry(auto_describe=True)
        # The standard process_* (CPU, memory, fds, start time) and python_* (GC, info)
        # series, as every Python exporter has them.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        p = "resnet_serve_"
        self.requests = Counter(
            p + "requests",
            "Requests answered, on every transport, by outcome: ok or the error code.",
            ["transport", "route", "outcome"],
            registry=r,
        )
        self.latency = Histogram(
            p + "request_duration_seconds",
            "End-to-end request latency (an exemplar with the trace id when tracing is on).",
            ["transport", "route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inflight = Gauge(p + "inflight_requests", "Requests being handled.", registry=r)
        self.images = Counter(p + "images", "Images classified.", ["model", "version"], registry=r)
        self.preprocess = Histogram(
            p + "preprocess_seconds",
            "Decode + resize + normalize, per image.",
            ["model", "version"],
            buckets=_FAST,
            registry=r,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds",
            "Time an image waited for its batch.",
            ["model", "version"],
            buckets=_FAST,
            registry=r,
        )
        self.inference = Histogram(
            p + "inference_seconds",
            "Backend call per batch; served_precision: what the batch was computed in.",
            ["model", "version", "backend", "served_precision"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            p + "batch_size",
            "Images per backend call.",
            ["model", "version"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.queue_depth = Gauge(
            p + "queue_depth", "Images waiting for a batch.", ["model", "version"], registry=r
        )
        # Exported so that saturation (depth / capacity) is one PromQL division.
        self.queue_capacity = Gauge(
            p + "queue_capacity",
            "Most images that may wait for a batch (MAX_QUEUE_IMAGES).",
            ["model", "version"],
            registry=r,
        )
        self.batch_cost = Gauge(
            p + "batch_cost_seconds",
            "The backend's time for a batch of this size, as the batcher predicts it "
            "(measured at warm-up, then an average of live batches); sizes seen so far.",
            ["model", "version", "batch_size"],
            registry=r,
        )
        self.queue_lateness = Gauge(
            p + "queue_lateness_ratio",
            "Time admitted images waited for their results over the time admission predicted "
            "for them (an average); above 1, admission's slack grows by it.",
            ["model", "version"],
            registry=r,
        )
        self.backend_errors = Counter(
            p + "backend_errors",
            "Failed backend calls, by error code.",
            ["model", "version", "backend", "code"],
            registry=r,
        )
        self.model_info = Gauge(
            p + "model_info",
            "Served models (value 1); kernels: what computes their batches (the CPU's "
            "instruction set, CUDA, triton); served_precision: in what precision.",
            ["model", "version", "precision", "served_precision", "arch", "backend", "kernels"],
            registry=r,
        )
        self.ready = Gauge(p + "ready", "1 when the gateway is ready to serve.", registry=r)
        # --- model lifecycle (service.runtime.lifecycle) and shadow traffic (service.runtime.shadow) --------
        self.model_loads = Counter(
            p + "model_loads",
            "Versions loaded by a reload (outcome ok), or refused (outcome failed: load, "
            "validation or parity probe; the old versions keep serving).",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.model_load_failing = Gauge(
            p + "model_load_failing",
            "Versions the repository asks for that the newest reload could not serve.",
            ["model"],
            registry=r,
        )
        self.traffic_weight = Gauge(
            p + "traffic_weight",
            "Share of a model's unpinned requests routed to a version (0..1).",
            ["model", "version"],
            registry=r,
        )
        shadow = ["model", "version", "shadow"]
        self.shadow_images = Counter(
            p + "shadow_images",
            "Images copied to a shadow version, by outcome: compared, dropped (load), failed.",
            [*shadow, "outcome"],
            registry=r,
        )
        self.shadow_top1_agreements = Counter(
            p + "shadow_top1_agreements",
            "Compared images whose top-1 class was the same for the primary and the shadow.",
            shadow,
            registry=r,
        )
        self.shadow_top5_overlap = Counter(
            p + "shadow_top5_overlap",
            "Sum over compared images of the share of the primary's top-5 classes in the "
            "shadow's top-5 (divide by the compared images for the mean).",
            shadow,
            registry=r,
        )
        self.shadow_score_drift = Histogram(
            p + "shadow_score_drift",
            "Per compared image: |probability of the primary's top-1 class, primary minus shadow|.",
            shadow,
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1),
            registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: on the request path, where that call
        (validating and locking) costs more than the increment. For counters and histograms,
        whose series are never removed; a gauge that may be (a released version's) keeps
        its children where its owner can drop them (service.dataplane.batching.Batcher)."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
