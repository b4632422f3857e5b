"""The gateway alone (a real process, embedded ONNX Runtime): 16 and 1 closed-loop clients
posting a 500x375 JPEG, Poisson arrivals at half the bare model's throughput, and 16
clients over its gRPC API, all on one gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.benchmarks.common import line, load, log, start_gateway


def gateway_alone(
    repo: Path, body: bytes, seconds: float, bare8: float
) -> tuple[dict[str, Any], float]:
    """The results' ``gateway_rest_onnxruntime`` and ``gateway_grpc_onnxruntime`` sections,
    and the 16 REST clients' images/s (what the overload phase takes as unloaded)."""
    gw = start_gateway(repo, grpc=True)
    try:
        log("gateway, 16 clients ...")
        r16 = load(gw, body, seconds, clients=16, warmup_s=3)
        log(f"  {line(r16)}")
        log("gateway, 1 client ...")
        r1 = load(gw, body, seconds / 2, clients=1)
        log(f"  {line(r1)}")
        rate = bare8 / 2
        log(f"gateway, Poisson arrivals at {rate:.1f}/s (half of bare batch-8) ...")
        rp = load(gw, body, seconds, rate=rate)
        log(f"  {line(rp)}")
        log("gateway gRPC API, 16 clients ...")
        rg = load(gw, body, seconds, clients=16, warmup_s=3, grpc=True)
        log(f"  {line(rg)}")
    finally:
        gw.stop()
    sections = {
        "gateway_rest_onnxruntime": {
            "clients16": r16.summary(),
            "clients1": r1.summary(),
            "poisson_half_bare": {**rp.summary(), "rate_per_s": round(rate, 2)},
            "ratio_vs_bare_batch8": round(r16.images_per_s / bare8, 3),
        },
        "gateway_grpc_onnxruntime": {
            "clients16": rg.summary(),
            "ratio_vs_bare_batch8": round(rg.images_per_s / bare8, 3),
            "ratio_vs_rest": round(rg.images_per_s / r16.images_per_s, 3),
        },
    }
    return sections, r16.images_per_s
