"""Each model version's inference statistics in the shape of Triton's statistics extension
(``/v2/models/{m}/stats``, ``ModelStatistics``)."""

from __future__ import annotations

from typing import Any


class _Duration:
    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)

    def as_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


class ModelStatistics:
    """Cumulative counts and times of one model version, as Triton's statistics extension
    reports them: per request (success, fail, queue, compute_input = decoding and
    preprocessing, compute_infer = backend time, compute_output = top-k), per batch size,
    and ``inference_count`` (images) against ``execution_count`` (backend calls)."""

    KINDS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")

    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self.last_inference_ms = 0
        self.inference_count = 0
        self.execution_count = 0
        self.durations = {kind: _Duration() for kind in self.KINDS}
        self.batches: dict[int, _Duration] = {}

    def batch(self, size: int, seconds: float) -> None:
        self.execution_count += 1
        self.batches.setdefault(size, _Duration()).add(seconds)

    def as_dict(self) -> dict[str, Any]:
        zero = {"count": 0, "ns": 0}
        return {
            "name": self.name,
            "version": self.version,
            "last_inference": self.last_inference_ms,
            "inference_count": self.inference_count,
            "execution_count": self.execution_count,
            "inference_stats": {
                **{kind: d.as_dict() for kind, d in self.durations.items()},
                "cache_hit": zero,
                "cache_miss": zero,
            },
            "batch_stats": [
                {
                    "batch_size": size,
                    "compute_input": zero,
                    "compute_infer": d.as_dict(),
                    "compute_output": zero,
                }
                for size, d in sorted(self.batches.items())
            ],
            "memory_usage": [],
        }
