"""One ``resnet-serve bench`` run: the user's images, a target, the steps asked for (a list
of concurrencies, a list of rates, or the SLO search), the gateway's own account of each
step, and the report."""

from __future__ import annotations

import asyncio
import datetime
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from service import __version__
from service.host.cpus import usable_cpus
from service.host.files import FolderError, image_files
from service.tools.bench import BenchError, report, slo
from service.tools.bench.gateway_metrics import Scraper, breakdown
from service.tools.bench.loops import Bounds, Step, closed_loop, open_loop, print_progress
from service.tools.bench.targets import Target, make_target

#: Images read from the folder at most (cycled during the run): enough variety, bounded memory.
MAX_IMAGES = 1000


@dataclass
class BenchConfig:
    url: str
    model: str
    images: Path
    output: Path
    protocol: str = "rest"
    concurrency: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    slo_p99_ms: float | None = None
    duration_s: float = 10.0
    warmup_s: float = 2.0
    max_requests: int = 1_000_000
    images_per_request: int = 1
    api_key: str | None = None
    timeout_s: float = 30.0
    #: The gateway's /metrics; None: derived from an HTTP url, none for gRPC.
    metrics_url: str | None = None
    seed: int = 0
    honor_retry_after: bool = False
    quiet: bool = False

    def check(self) -> None:
        if self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise BenchError("--duration and --timeout must be positive, --warmup not negative")
        if self.images_per_request < 1 or self.max_requests < 1:
            raise BenchError("--images-per-request and --max-requests must be at least 1")
        if any(c < 1 for c in self.concurrency) or any(r <= 0 for r in self.rates):
            raise BenchError("--concurrency values must be >= 1 and --rate values > 0")
        if self.slo_p99_ms is not None and self.slo_p99_ms <= 0:
            raise BenchError("--slo-p99-ms must be positive")
        if self.slo_p99_ms is not None and (self.concurrency or self.rates):
            raise BenchError(
                "--slo-p99-ms chooses its own steps: give it without --concurrency/--rate"
            )
        if self.concurrency and self.rates:
            raise BenchError("give --concurrency (closed loop) or --rate (open loop), not both")


def read_images(folder: Path, option: str = "--images") -> list[bytes]:
    """The files of ``folder`` (see service.host.files), at most MAX_IMAGES, each read once."""
    try:
        files = image_files(folder, option)[:MAX_IMAGES]
    except FolderError as exc:
        raise BenchError(str(exc)) from None
    try:
        return [path.read_bytes() for path in files]
    except OSError as exc:
        raise BenchError(f"{option}: cannot read {exc.filename} ({exc.strerror or exc})") from None


def load_payloads(folder: Path, per_request: int) -> tuple[list[list[bytes]], int]:
    """Requests' images, each file read once: (payloads, files used)."""
    images = read_images(folder)
    n = len(images)
    return [[images[(j * per_request + t) % n] for t in range(per_request)] for j in range(n)], n


def _metrics_url(cfg: BenchConfig) -> str | None:
    if cfg.metrics_url:
        return cfg.metrics_url
    if cfg.protocol in ("rest", "kserve-http"):
        base = cfg.url if "://" in cfg.url else f"http://{cfg.url}"
        return base.rstrip("/") + "/metrics"
    return None


async def measure(
    make: Callable[[Callable[[], Any]], Any], scraper: Scraper | None, quiet: bool = True
) -> Step:
    """Run one step (``make(before_window)`` returns the loop's coroutine) with the
    gateway's /metrics scraped when its window opens and after its last answer:
    ``step.server`` is the gateway's own account of the same requests."""
    before: dict[str, float] = {}

    async def snapshot() -> None:
        if scraper:
            before.update(await scraper.sample())

    step: Step = await make(snapshot)
    if scraper:
        step.server = breakdown(before, await scraper.sample())
    if not quiet:
        print_progress(step, step.duration_s, step.requests)
        sys.stderr.write("\n")
    return step


async def execute(cfg: BenchConfig, argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark ``cfg`` describes and write its report; the report."""
    cfg.check()
    payloads, n_files = load_payloads(cfg.images, cfg.images_per_request)
    target: Target = make_target(
        cfg.protocol, cfg.url, cfg.model, payloads, api_key=cfg.api_key, timeout_s=cfg.timeout_s
    )
    metrics_url = _metrics_url(cfg)
    scraper = Scraper(metrics_url, cfg.model) if metrics_url else None
    bounds = Bounds(cfg.duration_s, cfg.warmup_s, cfg.max_requests)
    # The live line rewrites itself: only on a terminal (a log gets one line per step).
    progress = print_progress if not cfg.quiet and sys.stderr.isatty() else None
    steps: list[Step] = []
    slo_result = None
    try:
        await target.open()
        if scraper:
            await scraper.sample()  # fail now, not after the first step
        report.prepare_output(cfg.output)  # the last check: nothing made for a failed start

        async def record(make: Callable[[Callable[[], Any]], Any]) -> Step:
            steps.append(await measure(make, scraper, cfg.quiet))
            return steps[-1]

        async def closed(clients: int) -> Step:
            return await record(
                lambda snap: closed_loop(
                    target, clients, bounds, progress, cfg.honor_retry_after, before_window=snap
                )
            )

        async def open_(rate: float) -> Step:
            return await record(
                lambda snap: open_loop(target, rate, bounds, progress, cfg.seed, before_window=snap)
            )

        if cfg.slo_p99_ms is not None:
            slo_result = await slo.search(closed, open_, cfg.slo_p99_ms)
        elif cfg.rates:
            for rate in cfg.rates:
                await open_(rate)
        else:
            for clients in cfg.concurrency or [1, 4, 16]:
                await closed(clients)
    finally:
        await target.close()
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "quiet")}
    out: dict[str, Any] = {
        "tool": f"resnet-serve bench {__version__}",
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": argv or [],
        "target": {
            "url": cfg.url,
            "protocol": cfg.protocol,
            "model": cfg.model,
            "images_per_request": cfg.images_per_request,
            "image_files": n_files,
            "metrics_url": metrics_url,
        },
        "client_machine": {
            "usable_cpus": usable_cpus(),
            "node_cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in settings.items()},
        "steps": [s.summary() for s in steps],
        "slo": slo_result.summary() if slo_result else None,
    }
    best = slo_result.best if slo_result else None
    out["files"] = [str(p) for p in report.write(cfg.output, out, steps, best)]
    if not cfg.quiet:
        print(report.table(steps))
        if slo_result:
            print(_slo_line(slo_result.summary()))
    return out


def _slo_line(s: dict[str, Any]) -> str:
    if not s.get("max_rate_per_s"):
        return f"SLO p99 <= {s['p99_budget_ms']:g} ms: {s['reason']}"
    return (
        f"SLO p99 <= {s['p99_budget_ms']:g} ms: {s['max_rate_per_s']:g} requests/s "
        f"({s['images_per_s']:g} images/s), p99 {s['p99_ms']:g} ms on {s['requests']} requests "
        f"({s['requests_above_p99']} above it; confidence {s['confidence']})"
    )


def run(cfg: BenchConfig, argv: list[str] | None = None) -> dict[str, Any]:
    return asyncio.run(execute(cfg, argv))
