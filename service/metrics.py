"""Prometheus metrics. One registry per app (tests build many apps in one process).

Labels are bounded: routes are templates (``/v1/models/{model}/classify``), models are the
served set, reasons and codes are fixed vocabularies. Never a raw path or a client value.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY = (0.002, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
_FAST = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = "resnet_serve_"
        self.requests = Counter(
            p + "requests", "Requests answered.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            p + "request_duration_seconds",
            "End-to-end request latency.",
            ["route", "method"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inflight = Gauge(p + "inflight_requests", "Requests being handled.", registry=r)
        self.images = Counter(p + "images", "Images classified.", ["model"], registry=r)
        self.preprocess = Histogram(
            p + "preprocess_seconds",
            "Decode + resize + normalize, per image.",
            ["model"],
            buckets=_FAST,
            registry=r,
        )
        self.queue_wait = Histogram(
            p + "queue_wait_seconds",
            "Time an image waited for its batch.",
            ["model"],
            buckets=_FAST,
            registry=r,
        )
        self.inference = Histogram(
            p + "inference_seconds",
            "Backend call per batch.",
            ["model", "backend"],
            buckets=_LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            p + "batch_size",
            "Images per backend call.",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.queue_depth = Gauge(
            p + "queue_depth", "Images waiting for a batch.", ["model"], registry=r
        )
        # Exported so that saturation (depth / capacity) is one PromQL division.
        self.queue_capacity = Gauge(
            p + "queue_capacity",
            "Most images that may wait for a batch (MAX_QUEUE_IMAGES).",
            ["model"],
            registry=r,
        )
        self.batch_cost = Gauge(
            p + "batch_cost_seconds",
            "The backend's time for a batch of this size, as the batcher predicts it "
            "(measured at warm-up, then an average of live batches); sizes seen so far.",
            ["model", "batch_size"],
            registry=r,
        )
        self.rejections = Counter(
            p + "rejections",
            "Requests answered with an error, by its code (one per request, every transport).",
            ["reason"],
            registry=r,
        )
        self.backend_errors = Counter(
            p + "backend_errors",
            "Failed backend calls, by error code.",
            ["model", "backend", "code"],
            registry=r,
        )
        self.model_info = Gauge(
            p + "model_info",
            "Served models (value 1).",
            ["model", "version", "precision", "arch", "backend"],
            registry=r,
        )
        self.ready = Gauge(p + "ready", "1 when the gateway is ready to serve.", registry=r)
        self.grpc_requests = Counter(
            p + "grpc_requests", "gRPC calls answered.", ["method", "code"], registry=r
        )
        self.grpc_latency = Histogram(
            p + "grpc_duration_seconds",
            "gRPC call latency.",
            ["method"],
            buckets=_LATENCY,
            registry=r,
        )

    def rejected(self, code: str) -> None:
        """Count one request answered with the error ``code`` (called by the error mappings
        of HTTP and gRPC, and nowhere else)."""
        self.rejections.labels(code).inc()
