"""``resnet-serve tune``: which gateway settings let one replica take the most traffic within
a p99 budget, found by measuring, not guessing. Each candidate is a real gateway started
with those settings on this machine, the user's own images (so decoding's cost is in the
figure, which Triton's Model Analyzer leaves out), and the load tool's SLO search. The best
is written as an env file and a Helm values snippet, beside the table of what was tried.

Candidates come in two rounds. First the engine (each one installed) crossed with how its
batches share the cores (one batch on all of them, or single-threaded batches side by side:
ONNX Runtime's parallel sessions, OpenVINO's streams): the engine moved throughput most in
measurements here (OpenVINO's BF16 about 2x ONNX Runtime's FP32, docs/benchmarks.md), and
how the cores are split depends on it. Then, on the best of those, one change at a time
among the other knobs that moved the tail: the batcher's latency target, exclusive CPUs, the
batch cap, the batch delay, the number of decoding processes. Each knob is tried once, on the
winning engine, rather than crossed with every engine, so the count stays near ten. The
whole run is bounded: candidates left when ``max_minutes`` is spent are reported as not
tried.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from service.dataplane.plane import exclusive_cpus
from service.settings import ENV_PREFIX, Settings, helm_key
from service.tools.bench import BenchError, report
from service.tools.bench.run import BenchConfig, read_images, run

#: Starts a gateway with these settings (field name -> value) and yields its base URL.
Launcher = Callable[[dict[str, Any]], AbstractContextManager[str]]


def candidates(cpus: int, engines: list[str]) -> list[dict[str, Any]]:
    """The first round: each engine with one batch on all the cores, then with
    single-threaded batches side by side, one per usable CPU (both named: which of them is
    an engine's own choice differs, ORT_PARALLEL_BATCHES=0)."""
    out: list[dict[str, Any]] = []
    for engine in engines:
        out.append({"engine": engine, "ort_parallel_batches": 1})
        if cpus > 1:  # on one CPU parallel batches are one batch: nothing to try
            out.append({"engine": engine, "ort_parallel_batches": cpus})
    return out


def refinements(best: dict[str, Any], cpus: int, slo_p99_ms: float) -> list[dict[str, Any]]:
    """The second round: ``best`` (the first round's winner) with one more change each. The
    budget as the batcher's latency target; CPUs exclusive or not, whichever the winner
    does not have by default (service.dataplane.plane.exclusive_cpus: exclusive where
    batches run side by side); one-image batches where batches run side by side (each on
    its own core), else a batch cap of 4; no batch delay; half the decoding processes."""
    parallel = best.get("ort_parallel_batches", 1) > 1
    # The first round's batches: one on every CPU, or single-threaded ones side by side.
    by_default = exclusive_cpus(None, 1 if parallel else cpus, cpus)
    changes: list[dict[str, Any]] = [
        {"target_p99_ms": slo_p99_ms},
        {"exclusive_cpus": not by_default},
        {"max_batch_size": 1 if parallel else 4},
        {"max_batch_delay_ms": 0.0},
        {"preprocess_workers": max(1, cpus // 2)},
    ]
    return [{**best, **change} for change in changes]


@dataclass
class Trial:
    settings: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: What the gateway said it served with (GET /v1/models/{model}): engine, precision (the
    #: version's contract), served_precision (what its batches were computed in).
    served: dict[str, str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return float(self.result.get("max_rate_per_s", 0.0)) if not self.error else 0.0

    def row(self) -> dict[str, Any]:
        return {"settings": self.settings, **self.served, "slo": self.result, "error": self.error}


def served_by(url: str, model: str) -> dict[str, str]:
    """The engine and precisions a gateway serves ``model`` with, from its REST summary."""
    try:
        with urllib.request.urlopen(f"{url}/v1/models/{quote(model, safe='')}", timeout=30) as r:
            summary = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise BenchError(f"GET /v1/models/{model}: {exc}") from None
    return {
        "engine": summary.get("backend", ""),
        "precision": summary.get("precision", ""),
        "served_precision": summary.get("served_precision", ""),
    }


def _env_text(settings: dict[str, Any]) -> str:
    lines = [f"{ENV_PREFIX}{k.upper()}={v}" for k, v in sorted(settings.items())]
    return "# resnet-serve tune: the best settings found\n" + "\n".join(lines) + "\n"


def _values_text(settings: dict[str, Any]) -> str:
    body = "".join(f"    {helm_key(k)}: {json.dumps(v)}\n" for k, v in sorted(settings.items()))
    return "# resnet-serve tune: helm ... -f this-file\ngateway:\n  config:\n" + (
        body or "    {}\n"
    )


def table(summary: dict[str, Any]) -> str:
    """The trials as a Markdown table, the recommended one in bold."""
    budget = summary["p99_budget_ms"]
    lines = [
        f"| candidate | engine | served precision | requests/s within p99 {budget:g} ms "
        "| p99 of that step |",
        "|---|---|---|---|---|",
    ]
    best = summary["best"]
    for row in summary["trials"]:
        label = ", ".join(f"`{k.upper()}={v}`" for k, v in row["settings"].items() if k != "engine")
        rate = f"{row['slo'].get('max_rate_per_s', 0):g}" if not row["error"] else row["error"]
        p99 = row["slo"].get("p99_ms")
        if best is not None and row["settings"] == best["settings"]:
            label, rate = f"{label or 'defaults'} (chosen)", f"**{rate}**"
        lines.append(
            f"| {label or 'defaults'} | {row.get('engine') or row['settings'].get('engine', '')}"
            f" | {row.get('served_precision', '')} | {rate} | "
            + (f"{p99:.0f} ms |" if p99 is not None else "- |")
        )
    return "\n".join(lines) + "\n"


@dataclass
class _Run:
    """One tune run's fixed arguments, and how each trial is measured."""

    launch: Launcher
    model: str
    images: Path
    slo_p99_ms: float
    output: Path
    duration_s: float
    warmup_s: float
    deadline: float
    log: Callable[[str], None]
    count: int = 0

    def measure(self, trial: Trial, total: int) -> None:
        self.count += 1
        n = self.count
        if time.monotonic() >= self.deadline:
            trial.error = "not tried: --max-minutes spent"
            return
        label = ", ".join(f"{k}={v}" for k, v in trial.settings.items()) or "defaults"
        self.log(f"[{n}/{total}] {label}")
        try:
            with self.launch(trial.settings) as url:
                trial.served = served_by(url, self.model)
                cfg = BenchConfig(
                    url=url,
                    model=self.model,
                    images=self.images,
                    output=self.output / f"trial-{n}",
                    slo_p99_ms=self.slo_p99_ms,
                    duration_s=self.duration_s,
                    warmup_s=self.warmup_s,
                    quiet=True,
                )
                trial.result = run(cfg)["slo"]
        except BenchError as exc:
            trial.error = str(exc)
        self.log(
            f"    {trial.rate:g} requests/s within p99 {self.slo_p99_ms:g} ms"
            + (f" with {trial.served.get('engine')} in {trial.served.get('served_precision')}"
               if trial.served else "")
            + (f" ({trial.error})" if trial.error else "")
        )  # fmt: skip


def _best(trials: list[Trial]) -> Trial | None:
    """The highest rate within the budget; ties: the lower p99."""
    ranked = sorted(
        (t for t in trials if not t.error and t.rate > 0),
        key=lambda t: (-t.rate, t.result.get("p99_ms", float("inf"))),
    )
    return ranked[0] if ranked else None


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
    """Run the SLO search on each candidate within ``max_minutes``: ``tried`` if given (those
    alone), else :func:`candidates` over the installed engines and then :func:`refinements`
    of their best. Write tune.json, tune.md, tune.env, values.yaml; return the summary."""
    from service.backends.engines import installed_engines
    from service.host.cpus import usable_cpus

    for name in {k for c in tried or [] for k in c}:
        if name not in Settings.model_fields:
            raise BenchError(f"{name} is not a gateway setting")
    read_images(images)  # a bad folder fails now, not once per candidate
    report.prepare_output(output)
    cpus = usable_cpus()
    first = [
        Trial(c) for c in (tried if tried is not None else candidates(cpus, installed_engines()))
    ]
    # The second round's size is known before its settings are: the total is logged up front.
    total = len(first) + (0 if tried is not None else len(refinements({}, cpus, slo_p99_ms)))
    session = _Run(
        launch, model, images, slo_p99_ms, output, duration_s, warmup_s,
        time.monotonic() + max_minutes * 60, log,
    )  # fmt: skip
    for trial in first:
        session.measure(trial, total)
    trials = list(first)
    if tried is None and (winner := _best(first)) is not None:
        for settings in refinements(winner.settings, cpus, slo_p99_ms):
            trials.append(Trial(settings))
            session.measure(trials[-1], total)
    return _write(trials, slo_p99_ms, output)


def _write(trials: list[Trial], slo_p99_ms: float, output: Path) -> dict[str, Any]:
    """tune.json and tune.md always; tune.env and values.yaml where a candidate met the
    budget. The recommendation (``recommended``) is the best's settings, naming its engine
    even where the candidate left it to the default."""
    from service.backends.engines import ENGINES

    best = _best(trials)
    recommended = None
    if best is not None:
        engine = best.served.get("engine")
        recommended = {"engine": engine, **best.settings} if engine in ENGINES else best.settings
    summary = {
        "p99_budget_ms": slo_p99_ms,
        "best": best.row() if best else None,
        "recommended": recommended,
        "trials": [t.row() for t in trials],
    }
    report.write_file(output / "tune.json", json.dumps(summary, indent=2) + "\n")
    report.write_file(output / "tune.md", table(summary))
    if recommended is None:
        raise BenchError(
            f"no setting met p99 <= {slo_p99_ms:g} ms at any rate (the trials: "
            f"{output / 'tune.json'}; a larger budget, or a faster model or machine)"
        )
    report.write_file(output / "tune.env", _env_text(recommended))
    report.write_file(output / "values.yaml", _values_text(recommended))
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
