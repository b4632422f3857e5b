"""A rollout's cost: p99 under Poisson arrivals with one version, with a second one
shadowing it, and across a reload to a version published during the window."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from deploy.benchmarks.common import NAME, line, load, log, start_gateway


def rollout_cost(repo: Path, body: bytes, seconds: float, bare8: float) -> dict[str, Any]:
    """Poisson arrivals at 0.4x bare batch 8, each phase on a gateway of its own over a copy
    of the repository: one version (plain, before and after); version 1 answering with
    version 2 as its shadow (the primary's latency, and how much traffic the shadow
    compared or dropped); a new version published a third into the window and picked up by
    polling (latency while it loads beside the one serving; no request may fail)."""
    from export.repository import republish

    rate = 0.4 * bare8
    out: dict[str, Any] = {"rate_per_s": round(rate, 2), "phases": {}}
    with tempfile.TemporaryDirectory(prefix="resnet-bench-rollout-") as tmp:
        model_dir = Path(tmp) / NAME
        shutil.copytree(repo / NAME, model_dir)
        republish(model_dir, model_dir.parent, "onnxruntime")  # version 2, the same graph
        for phase in ("plain", "shadow", "reload", "plain again"):
            out["phases"][phase] = _phase(phase, model_dir, body, seconds, rate)
    plain = [out["phases"][p]["latency_ms"]["p99"] for p in ("plain", "plain again")]
    for phase in ("shadow", "reload"):
        p99 = out["phases"][phase]["latency_ms"]["p99"]
        out[f"{phase}_p99_vs_plain"] = round(p99 / (sum(plain) / 2), 3)
    return out


def _phase(phase: str, model_dir: Path, body: bytes, seconds: float, rate: float) -> dict[str, Any]:
    """One phase on a gateway of its own: the step's summary, with the shadow's report or
    what the reload left serving."""
    import httpx

    from export.repository import republish
    from service.model.repository import Rollout, write_rollout

    rollout = Rollout(weights={"1": 1}, shadow="2") if phase == "shadow" else Rollout()
    write_rollout(model_dir, rollout)
    env = {"RESNET_SERVE_POLL_INTERVAL_S": "0.5"} if phase == "reload" else {}
    gw = start_gateway(model_dir.parent, env=env)
    publisher = None
    if phase == "reload":  # the next version, published a third into the window
        publisher = threading.Timer(
            2 + seconds / 3, republish, (model_dir, model_dir.parent, "onnxruntime")
        )
        publisher.start()
    try:
        log(f"rollout: {phase}, Poisson arrivals at {rate:.1f}/s ...")
        step = load(gw, body, seconds, rate=rate, warmup_s=2)
        log(f"  {line(step)}")
        result: dict[str, Any] = step.summary()
        if phase == "shadow":
            report = httpx.get(f"{gw.url}/v1/models/{NAME}/shadow").json()
            result["shadow"] = report["comparisons"][0]
        if phase == "reload":
            detail = httpx.get(f"{gw.url}/v1/models/{NAME}").json()
            result["serving_after"] = detail["versions"]
            result["last_reload"] = detail["last_reload"]
    finally:
        if publisher is not None:
            publisher.join()
        gw.stop()
    return result
