"""``resnet-serve tune``: which gateway settings let one replica take the most traffic within
a p99 budget, found by measuring, not guessing. Each candidate is a real gateway started
with those settings on this machine, the user's own images (so decoding's cost is in the
figure, which Triton's Model Analyzer leaves out), and the load tool's SLO search. The best
is written as an env file and a Helm values snippet, beside the table of what was tried.

Candidates are the knobs that moved the tail in measurements here (docs/benchmarks.md):
the batcher's latency target, parallel single-threaded batches, exclusive CPUs, the batch
cap, the batch delay, the number of decoding processes.
The whole run is bounded: candidates left when ``max_minutes`` is spent are reported as
not tried.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.settings import ENV_PREFIX, Settings, helm_key
from service.tools.bench import BenchError, report
from service.tools.bench.run import BenchConfig, read_images, run

#: Starts a gateway with these settings (field name -> value) and yields its base URL.
Launcher = Callable[[dict[str, Any]], AbstractContextManager[str]]


def candidates(cpus: int, slo_p99_ms: float) -> list[dict[str, Any]]:
    """The settings tried, the gateway's defaults first. The budget itself is tried as the
    batcher's latency target, alone and with single-threaded batches side by side."""
    out: list[dict[str, Any]] = [
        {},
        {"target_p99_ms": slo_p99_ms},
        {"ort_parallel_batches": cpus, "target_p99_ms": slo_p99_ms},
        {"ort_parallel_batches": cpus},
        {"max_batch_size": 1, "ort_parallel_batches": cpus},
        {"exclusive_cpus": True},
        {"exclusive_cpus": True, "ort_parallel_batches": cpus},
        {"max_batch_size": 4},
        {"max_batch_delay_ms": 0.0},
        {"preprocess_workers": max(1, cpus // 2)},
    ]
    if cpus == 1:  # parallel batches are one batch: nothing to try
        out = [c for c in out if "ort_parallel_batches" not in c]
    return out


@dataclass
class Trial:
    settings: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def rate(self) -> float:
        return float(self.result.get("max_rate_per_s", 0.0)) if not self.error else 0.0

    def row(self) -> dict[str, Any]:
        return {"settings": self.settings, "slo": self.result, "error": self.error}


def _env_text(settings: dict[str, Any]) -> str:
    lines = [f"{ENV_PREFIX}{k.upper()}={v}" for k, v in sorted(settings.items())]
    return "# resnet-serve tune: the best settings found\n" + "\n".join(lines) + "\n"


def _values_text(settings: dict[str, Any]) -> str:
    body = "".join(f"    {helm_key(k)}: {json.dumps(v)}\n" for k, v in sorted(settings.items()))
    return "# resnet-serve tune: helm ... -f this-file\ngateway:\n  config:\n" + (
        body or "    {}\n"
    )


def tune(
    launch: Launcher,
    model: str,
    images: Path,
    slo_p99_ms: float,
    output: Path,
    duration_s: float = 10.0,
    warmup_s: float = 2.0,
    max_minutes: float = 30.0,
    tried: list[dict[str, Any]] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the SLO search on each candidate (``tried``, default :func:`candidates`) within
    ``max_minutes``; write tune.json, tune.env, values.yaml; the summary."""
    from service.host.cpus import usable_cpus

    for name in {k for c in tried or [] for k in c}:
        if name not in Settings.model_fields:
            raise BenchError(f"{name} is not a gateway setting")
    read_images(images)  # a bad folder fails now, not once per candidate
    report.prepare_output(output)
    trials = [
        Trial(c) for c in (tried if tried is not None else candidates(usable_cpus(), slo_p99_ms))
    ]
    deadline = time.monotonic() + max_minutes * 60
    for n, trial in enumerate(trials):
        if time.monotonic() >= deadline:
            trial.error = "not tried: --max-minutes spent"
            continue
        label = ", ".join(f"{k}={v}" for k, v in trial.settings.items()) or "defaults"
        log(f"[{n + 1}/{len(trials)}] {label}")
        try:
            with launch(trial.settings) as url:
                cfg = BenchConfig(
                    url=url,
                    model=model,
                    images=images,
                    output=output / f"trial-{n + 1}",
                    slo_p99_ms=slo_p99_ms,
                    duration_s=duration_s,
                    warmup_s=warmup_s,
                    quiet=True,
                )
                trial.result = run(cfg)["slo"]
        except BenchError as exc:
            trial.error = str(exc)
        log(
            f"    {trial.rate:g} requests/s within p99 {slo_p99_ms:g} ms"
            + (f" ({trial.error})" if trial.error else "")
        )
    ranked = sorted(
        (t for t in trials if not t.error and t.rate > 0),
        key=lambda t: (-t.rate, t.result.get("p99_ms", float("inf"))),
    )
    best = ranked[0] if ranked else None
    summary = {
        "p99_budget_ms": slo_p99_ms,
        "best": best.row() if best else None,
        "trials": [t.row() for t in trials],
    }
    report.write_file(output / "tune.json", json.dumps(summary, indent=2) + "\n")
    if best is None:
        raise BenchError(
            f"no setting met p99 <= {slo_p99_ms:g} ms at any rate (the trials: "
            f"{output / 'tune.json'}; a larger budget, or a faster model or machine)"
        )
    report.write_file(output / "tune.env", _env_text(best.settings))
    report.write_file(output / "values.yaml", _values_text(best.settings))
    return summary


@contextmanager
def gateway_process(repository: Path, settings: dict[str, Any], log: Path) -> Iterator[str]:
    """A real ``resnet-serve serve`` on a free loopback port with these settings (as its
    environment), its output in ``log``."""
    from service.host.processes import GatewayProcess, WaitFailed

    env = {f"{ENV_PREFIX}{k.upper()}": str(v) for k, v in settings.items()}
    try:
        gw = GatewayProcess.start(log, "--repository", str(repository), env=env, timeout_s=300)
    except WaitFailed as exc:  # the gateway did not come up
        raise BenchError(f"the gateway did not start with {settings}: {exc}") from None
    try:
        yield gw.url
    finally:
        gw.stop()
