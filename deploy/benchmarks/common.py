"""What every phase shares: the model's name, the progress log, a gateway process, and one
step of load against it."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from service.host.processes import GatewayProcess
from service.tools.bench.gateway_metrics import Scraper
from service.tools.bench.loops import Bounds, Step, closed_loop, open_loop
from service.tools.bench.run import measure
from service.tools.bench.targets import make_target

#: The model every phase serves (the near-free graphs of the cost phase take it too).
NAME = "resnet50"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def start_gateway(
    repo: Path, *args: str, grpc: bool = False, env: dict[str, str] | None = None
) -> GatewayProcess:
    log_file = Path(tempfile.mkdtemp(prefix="resnet-bench-gw-")) / "gateway.log"
    return GatewayProcess.start(
        log_file,
        "--repository",
        str(repo),
        *args,
        grpc=grpc,
        env={"RESNET_SERVE_LOG_LEVEL": "warning", **(env or {})},
    )


def load(
    gw: GatewayProcess,
    body: bytes,
    seconds: float,
    *,
    clients: int = 0,
    rate: float = 0.0,
    warmup_s: float = 0.0,
    grpc: bool = False,
    polite: bool = False,
) -> Step:
    """One step of ``service.tools.bench`` against ``gw``, over REST (or the Classifier gRPC API):
    ``clients`` closed-loop clients (``polite``: they wait Retry-After, jittered), or Poisson
    arrivals at ``rate``; ``step.server`` is the gateway's own account of the window."""

    async def step() -> Step:
        # In the loop the calls run on: grpc.aio channels (and asyncio streams) bind to it.
        url = gw.grpc_target if grpc else gw.url
        target = make_target("grpc" if grpc else "rest", url, NAME, [[body]])
        bounds = Bounds(seconds, warmup_s)
        await target.open()
        try:
            return await measure(
                lambda snap: (
                    closed_loop(
                        target, clients, bounds, honor_retry_after=polite, before_window=snap
                    )
                    if clients
                    else open_loop(target, rate, bounds, before_window=snap)
                ),
                Scraper(gw.url + "/metrics", NAME),
            )
        finally:
            await target.close()

    return asyncio.run(step())


def line(step: Step) -> str:
    """One step in one line, for the progress log."""
    return (
        f"{step.images_per_s:.1f} img/s, p50 / p99 {step.latency_ms(50):.1f} / "
        f"{step.latency_ms(99):.1f} ms, {step.statuses}"
    )


def gateway_clients16(
    what: str,
    repo: Path,
    body: bytes,
    seconds: float,
    *args: str,
    env: dict[str, str] | None = None,
) -> Step:
    """16 closed-loop REST clients against a gateway started on ``repo`` (3 s of warm-up)."""
    gw = start_gateway(repo, *args, env=env)
    try:
        log(f"{what}, 16 clients ...")
        result = load(gw, body, seconds, clients=16, warmup_s=3)
        log(f"  {line(result)}")
    finally:
        gw.stop()
    return result
