"""The gateway with the Triton backend: a real tritonserver (CPU, python backend running ONNX
Runtime on the same ONNX file), 16 REST clients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.benchmarks.common import NAME, gateway_clients16, log
from service.host.processes import free_ports


def bench_triton(repo: Path, body: bytes, seconds: float, bare8: float) -> dict[str, Any]:
    from export.repository import republish
    from service.tools.triton_launcher import start_triton

    trepo = repo.parent / "triton-repo"
    republish(repo / NAME, trepo, "python-ort")
    log("starting tritonserver (CPU, python backend + ORT) ...")
    http, grpc, metrics = free_ports(3)
    triton = start_triton(trepo, http, grpc, metrics, log_path=repo.parent / "triton.log")
    try:
        triton.wait_ready(180)
        rt = gateway_clients16(
            "gateway -> Triton", trepo, body, seconds, "--backend", "triton",
            "--triton-url", triton.grpc_url,
        )  # fmt: skip
    finally:
        triton.stop()
    return {"clients16": rt.summary(), "ratio_vs_bare_batch8": round(rt.images_per_s / bare8, 3)}
