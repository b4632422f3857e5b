"""The tail against an ideal server: the gateway and its peers, each alone in turn, under the
very same Poisson arrivals as an ideal server (:mod:`service.tools.bench.queueing`) with the
bare model's batch costs measured here; and their closed-loop throughput."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from deploy.benchmarks.bare import bare_ort
from deploy.benchmarks.common import NAME, log
from deploy.benchmarks.cpu_accounting import server_cpu_per_request
from deploy.benchmarks.inputs import onnx_of
from deploy.benchmarks.peers import PEERS, served_by
from service.dataplane.batch_policy import CostModel
from service.tools.bench.loops import Bounds, Step, open_loop, poisson_schedule
from service.tools.bench.queueing import ideal_latencies_s
from service.tools.bench.targets import make_target


def poisson_p99_ms(url: str, body: bytes, rate: float, seconds: float, seed: int) -> dict[str, Any]:
    """One window of Poisson arrivals (``service.tools.bench``'s open loop, no warm-up, so its
    schedule is ``poisson_schedule(rate, seconds, seed)``) against ``url``: p99 and answers."""

    async def step() -> Step:
        target = make_target("rest", url, NAME, [[body]])
        await target.open()
        try:
            return await open_loop(target, rate, Bounds(seconds), seed=seed)
        finally:
            await target.close()

    result = asyncio.run(step())
    return {"p99_ms": round(result.latency_ms(99), 1), "statuses": result.statuses}


def tail_vs_ideal(repo: Path, body: bytes, seconds: float, rounds: int = 3) -> dict[str, Any]:
    """The gateway and its peers (PEERS) on FP32 ResNet-50, each a server of its own in
    turn, in ``rounds`` interleaved rounds: 16 closed-loop clients (throughput as a ratio to
    bare ORT batch 8), then Poisson arrivals at 0.4x bare batch 8 (p99 as a ratio to the
    ideal server, ``ideal_latencies_s``, under the very same arrivals: one seed a round),
    from the bare model's batch costs measured here."""
    sizes = (1, 2, 4, 8)
    per_s = {n: bare_ort(onnx_of(repo), n, min(5.0, seconds / 4)) for n in sizes}
    costs = CostModel({n: n / per_s[n] for n in sizes})
    rate = 0.4 * per_s[8]
    out: dict[str, Any] = {
        "rate_per_s": round(rate, 2),
        "bare_batch8_images_per_s": round(per_s[8], 2),
        "bare_batch_cost_ms": {n: round(costs.cost(n) * 1000, 1) for n in sizes},
        "rounds": [],
    }
    servers = ("gateway", *PEERS)
    for seed in range(rounds):
        ideal = np.percentile(
            ideal_latencies_s(poisson_schedule(rate, seconds, seed), costs.cost, 8), 99
        )
        row: dict[str, Any] = {"seed": seed, "ideal_p99_ms": round(float(ideal) * 1000, 1)}
        for what in servers:
            with served_by(what, repo) as (pid, url):
                poisson_p99_ms(url, body, rate, 3.0, seed=1000)  # warm: sessions, batch costs
                log(f"round {seed + 1}, {what}: 16 clients, then Poisson {rate:.1f}/s ...")
                closed = server_cpu_per_request(pid, url, body, seconds)
                row[what] = {
                    "closed_loop_images_per_s": closed["requests_per_s"],
                    "closed_vs_bare8": round(closed["requests_per_s"] / per_s[8], 3),
                    **poisson_p99_ms(url, body, rate, seconds, seed),
                }
                row[what]["vs_ideal"] = round(row[what]["p99_ms"] / row["ideal_p99_ms"], 2)
        log(f"  {row}")
        out["rounds"].append(row)
    for what in servers:
        for key in ("vs_ideal", "closed_vs_bare8"):
            out[f"{what}_{key}_median"] = float(np.median([r[what][key] for r in out["rounds"]]))
    return out
