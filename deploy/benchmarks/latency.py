"""Latency under load: the SLO search of ``resnet-serve bench`` for the highest Poisson rate
whose p99 stays within a budget of 5x the bare model's batch-1 latency, with the gateway's
defaults and with the settings ``resnet-serve tune`` chose on this machine."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from deploy.benchmarks.common import NAME, log, start_gateway
from service.tools.bench.run import BenchConfig
from service.tools.bench.run import run as bench_run

#: What `resnet-serve tune` chose on this machine (docs/load-testing.md, Sizing a deployment).
TUNED_ENV = Path(__file__).resolve().parents[1] / "loadtest" / "tune-example" / "tune.env"
#: The latency budget, in bare batch-1 latencies (MLPerf's Server scenario bounds the p99
#: the same way, as a multiple of the model's own latency).
BUDGET_X_BATCH1 = 5


def tuned_settings(budget_ms: float) -> dict[str, str]:
    """tune's choice, as the gateway's environment; a latency target becomes this run's."""
    env = {}
    for line in TUNED_ENV.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    if "RESNET_SERVE_TARGET_P99_MS" in env:
        env["RESNET_SERVE_TARGET_P99_MS"] = f"{budget_ms:.0f}"
    return env


def latency_under_load(
    repo: Path, images: Path, seconds: float, bare1: float, bare8: float
) -> dict[str, Any]:
    """The highest Poisson rate within p99 <= 5x the bare batch-1 latency, with the
    gateway's defaults and with tune's choice (when it chose other settings), each on a
    gateway of its own."""
    budget_ms = BUDGET_X_BATCH1 * 1000 / bare1
    out: dict[str, Any] = {"p99_budget_ms": round(budget_ms, 1), "target_vs_bare_batch8": 0.5}
    tuned = tuned_settings(budget_ms)
    for name, env in (("defaults", {}), *((("tuned", tuned),) if tuned else ())):
        log(f"latency under load, {name} {env}: p99 <= {budget_ms:.0f} ms ...")
        gw = start_gateway(repo, env=env)
        try:
            cfg = BenchConfig(
                url=gw.url,
                model=NAME,
                images=images,
                output=Path(tempfile.mkdtemp(prefix="resnet-bench-slo-")),
                slo_p99_ms=budget_ms,
                duration_s=seconds,
                warmup_s=2,
                quiet=True,
            )
            slo = bench_run(cfg)["slo"]
        finally:
            gw.stop()
        out[name] = {
            "settings": env,
            **slo,
            "rate_vs_bare_batch8": round(slo["max_rate_per_s"] / bare8, 3),
        }
        log(f"  {out[name]}")
    return out
