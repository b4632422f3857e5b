"""Shadow traffic: a candidate version gets a copy of live (unpinned) requests; its answers
are compared with the primary's, never returned.

The copy is the primary's own input batch, sent after the primary has answered, so the
shadow never fails a primary request, and it runs only in the primary's idle time: it is
dropped whenever the primary has anything waiting, running or decoding, and at most one
shadow batch is in flight. Under load the report gets fewer images; the callers lose
nothing. (A primary request that arrives while a shadow batch runs on the same CPUs still
shares them: measured in ``make bench``, docs/benchmarks.md.) A shadow must preprocess as
its primary does (the reload refuses one that does not), since it receives the primary's
tensors.

Per (primary, shadow) pair it records, per image: whether the top-1 classes agree, the
share of the primary's top-5 classes in the shadow's top-5, and the score drift (how much
the probability of the primary's top-1 class moved). ``GET /v1/models/{m}/shadow`` and the
``resnet_serve_shadow_*`` metrics report them: the figures that decide a rollout.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from service.dataplane.routing import Routing, Version
from service.dataplane.scores import probabilities, top_indices
from service.errors import ServiceError

if TYPE_CHECKING:
    from service.observability.metrics import Metrics

log = logging.getLogger(__name__)

TOP = 5


@dataclass
class Comparison:
    """What one primary/shadow pair has agreed on so far."""

    primary: str
    shadow: str
    since: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    compared: int = 0
    dropped: int = 0
    failed: int = 0
    top1_agreements: int = 0
    top5_overlap: float = 0.0
    drift_sum: float = 0.0
    drift_max: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        n = self.compared
        return {
            "primary": self.primary,
            "shadow": self.shadow,
            "since": self.since,
            "images_compared": n,
            "images_dropped": self.dropped,
            "images_failed": self.failed,
            "top1_agreement": round(self.top1_agreements / n, 6) if n else None,
            "top5_overlap": round(self.top5_overlap / n, 6) if n else None,
            "score_drift_mean": round(self.drift_sum / n, 6) if n else None,
            "score_drift_max": round(self.drift_max, 6) if n else None,
        }


def compare(primary: np.ndarray, shadow: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: top-1 agreement (bool), top-5 overlap (0..1), and the drift of the
    primary's top-1 probability, for two logit batches of the same images."""
    k = min(TOP, primary.shape[1])
    p_top, s_top = top_indices(primary, k), top_indices(shadow, k)
    agree = p_top[:, 0] == s_top[:, 0]
    overlap = np.array([len(set(a) & set(b)) / k for a, b in zip(p_top, s_top, strict=True)])
    top1 = p_top[:, :1]
    drift = np.abs(probabilities(primary, top1) - probabilities(shadow, top1))[:, 0]
    return agree, overlap, drift


class Shadows:
    """The data plane's answer hook (``DataPlane.attach``) for shadow versions: ``routes``
    gives a model's current routing, ``decoding`` the images being decoded (live work the
    copies must not compete with), ``timeout_s`` a copy's deadline."""

    def __init__(
        self,
        metrics: Metrics,
        routes: Callable[[str], Routing | None],
        decoding: Callable[[], int],
        timeout_s: float,
    ) -> None:
        self.metrics = metrics
        self.routes = routes
        self.decoding = decoding
        self.timeout_s = timeout_s
        self._pairs: dict[str, dict[tuple[str, str], Comparison]] = {}
        self._inflight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def _pair(self, primary: Version, shadow: Version) -> Comparison:
        pairs = self._pairs.setdefault(primary.spec.name, {})
        key = (primary.spec.version, shadow.spec.version)
        if key not in pairs:
            pairs[key] = Comparison(*key)
        return pairs[key]

    def _count(self, primary: Version, shadow: Version, outcome: str, n: int) -> None:
        self.metrics.shadow_images.labels(
            primary.spec.name, primary.spec.version, shadow.spec.version, outcome
        ).inc(n)

    def answered(self, primary: Version, batch: np.ndarray, logits: np.ndarray) -> None:
        """Send a copy of ``batch``, which ``primary`` answered with ``logits``, to the
        model's shadow version, if it has one and there is room."""
        routing = self.routes(primary.spec.name)
        if routing is None or routing.shadow in (None, primary.spec.version):
            return
        shadow = routing.versions.get(routing.shadow or "")
        if shadow is None:
            return
        # A context of its own: the request's record and span are the primary's, and
        # the primary request may be finished before this runs.
        task = asyncio.create_task(
            self._run(self._pair(primary, shadow), primary, shadow, batch, logits),
            context=contextvars.Context(),
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _busy(self, primary: Version, shadow: Version, n: int) -> bool:
        """Whether a copy would compete with live traffic. Only idle time is used: a shadow
        batch takes the same CPUs (embedded backend) or the same server, so it starts only
        while the primary has nothing waiting, no batch running and no image decoding, and
        one shadow batch at most is in flight."""
        return (
            primary.batcher.waiting > 0
            or primary.batcher.running > 0
            or self.decoding() > 0
            or self._inflight.get(primary.spec.name, 0) > 0
            or n > shadow.batcher.max_batch
        )

    async def _run(
        self,
        pair: Comparison,
        primary: Version,
        shadow: Version,
        batch: np.ndarray,
        logits: np.ndarray,
    ) -> None:
        # Decided here, not in mirror(): there the primary's own batch is still counted as
        # running (it is done once its answers have been handed out).
        n = len(batch)
        if self._busy(primary, shadow, n):
            pair.dropped += n
            self._count(primary, shadow, "dropped", n)
            return
        name = primary.spec.name
        self._inflight[name] = self._inflight.get(name, 0) + n
        now = time.perf_counter()
        try:
            done = await shadow.batcher.submit(
                list(batch), now + self.timeout_s, False, arrived=now
            )
        except ServiceError as exc:
            pair.failed += n
            self._count(primary, shadow, "failed", n)
            log.debug("shadow %s v%s: %s", shadow.spec.name, shadow.spec.version, exc.message)
            return
        finally:
            self._inflight[name] -= n
        agree, overlap, drift = compare(logits, np.stack(done.rows))
        pair.compared += n
        pair.top1_agreements += int(agree.sum())
        pair.top5_overlap += float(overlap.sum())
        pair.drift_sum += float(drift.sum())
        pair.drift_max = max(pair.drift_max, float(drift.max()))
        m = self.metrics
        ids = (primary.spec.name, primary.spec.version, shadow.spec.version)
        self._count(primary, shadow, "compared", n)
        m.shadow_top1_agreements.labels(*ids).inc(int(agree.sum()))
        m.shadow_top5_overlap.labels(*ids).inc(float(overlap.sum()))
        for d in drift:
            m.shadow_score_drift.labels(*ids).observe(float(d))

    def report(self, model: str, routing: Routing) -> dict[str, Any]:
        """The model's shadow now, and every primary/shadow comparison since the start."""
        return {
            "model": model,
            "shadow": routing.shadow,
            "comparisons": [c.as_dict() for c in self._pairs.get(model, {}).values()],
        }

    async def close(self) -> None:
        """Let the copies in flight finish (their batchers are draining too)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
