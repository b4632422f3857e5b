"""The gateway's own account of a step, from its /metrics scraped before and after: how many
requests and images it counted, and where one image's time went (decode + preprocess, queue
wait, the backend's time per batch, the batch size). What a client alone cannot see."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from service.tools.bench import BenchError

# Calls that classify (the routes and RPCs a load test sends), by the last part of the
# route label: /v1/classify, /v2/models/{model}/infer, inference.GRPCInferenceService/ModelInfer.
_CLASSIFYING = ("classify", "infer", "Classify", "ModelInfer")
_HISTOGRAMS = {
    "preprocess": "resnet_serve_preprocess_seconds",
    "queue_wait": "resnet_serve_queue_wait_seconds",
    "inference": "resnet_serve_inference_seconds",
    "batch_size": "resnet_serve_batch_size",
}

Sample = dict[str, float]


def parse(text: str, model: str) -> Sample:
    """The counters a step's breakdown is made of, summed over the labels that do not
    matter here (one model; every classifying route)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if labels.get("model", model) != model:
                continue
            name = s.name
            if name == "resnet_serve_requests_total":
                if labels.get("route", "").rsplit("/", 1)[-1] in _CLASSIFYING:
                    out["requests"] += s.value
                    if (outcome := labels.get("outcome", "ok")) != "ok":
                        out[f"rejected:{outcome}"] += s.value
            elif name == "resnet_serve_images_total":
                out["images"] += s.value
            else:
                for key, metric in _HISTOGRAMS.items():
                    if name == metric + "_sum":
                        out[f"{key}_sum"] += s.value
                    elif name == metric + "_count":
                        out[f"{key}_count"] += s.value
    return dict(out)


def breakdown(before: Sample, after: Sample) -> dict[str, Any]:
    """Per-step means from two scrapes (milliseconds; the batch size in images)."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after.keys() | before.keys()}

    def mean(key: str, scale: float = 1000.0) -> float | None:
        n = d.get(f"{key}_count", 0.0)
        return round(d.get(f"{key}_sum", 0.0) / n * scale, 3) if n else None

    return {
        "requests": int(d.get("requests", 0)),
        "images": int(d.get("images", 0)),
        "batches": int(d.get("batch_size_count", 0)),
        "mean_batch_size": mean("batch_size", 1.0),
        "preprocess_ms_per_image": mean("preprocess"),
        "queue_wait_ms_per_image": mean("queue_wait"),
        "inference_ms_per_batch": mean("inference"),
        "rejected": {
            k.split(":", 1)[1]: int(v)
            for k, v in sorted(d.items())
            if k.startswith("rejected:") and v
        },
    }


class Scraper:
    """GET <metrics_url> (the gateway's /metrics, open without an API key), for one model."""

    def __init__(self, metrics_url: str, model: str) -> None:
        self.url = metrics_url
        self.model = model

    def _get(self) -> str:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.url, timeout=10) as r:
                return str(r.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise BenchError(f"cannot scrape {self.url}: {exc}") from None

    async def sample(self) -> Sample:
        import asyncio

        text = await asyncio.to_thread(self._get)
        try:
            return parse(text, self.model)
        except ValueError as exc:
            raise BenchError(f"{self.url} is not a Prometheus exposition: {exc}") from None
