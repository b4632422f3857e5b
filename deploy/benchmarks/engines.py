"""The engines: ONNX Runtime against OpenVINO on the same ResNet-50 files, bare and behind the
gateway (``--engines-only`` runs just that).

1. Bare, batch 8, in interleaved rounds, every engine compiled once and kept warm: FP32 exact
   (OpenVINO forced to f32), BF16 (OpenVINO in bf16 on the FP32 file against ONNX Runtime
   FP32, whose CPU EP has no BF16 convolution), and the project's INT8 QDQ file through
   both (OpenVINO's f32 hint there, as the gateway compiles INT8 versions).
2. The gateway with each engine, each a process of its own, all started first and loaded
   in turn in interleaved rounds: 16 closed-loop REST clients posting the 500x375 JPEG,
   against its own bare engine; a ``--precision bf16`` version through OpenVINO against the
   FP32 version through ONNX Runtime, and INT8 through both. Then each under the same
   Poisson arrivals (0.4x its own bare batch 8), p99 against the ideal server
   (:mod:`service.tools.bench.queueing`) with its own bare engine's batch costs.
3. Top-1 agreement of BF16 and INT8 with FP32 on the demo's held-out digits, as the
   export gate measured it (``export_report.json`` of repositories that ``resnet-export
   demo --precision bf16|int8`` published; training the demo takes minutes, so the phase
   reads them rather than training: ``--demo-repository``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from deploy.benchmarks.bare import Rate, openvino_rate, ort_rate
from deploy.benchmarks.common import line, load, log, start_gateway
from deploy.benchmarks.inputs import export_model, onnx_of
from deploy.benchmarks.int8 import export_int8
from deploy.benchmarks.tail import poisson_p99_ms
from service.dataplane.batch_policy import CostModel
from service.host.cpus import cpu_flags
from service.host.processes import GatewayProcess
from service.tools.bench.loops import poisson_schedule
from service.tools.bench.queueing import ideal_latencies_s

#: The bare engines: name to (which file, engine, OpenVINO's INFERENCE_PRECISION_HINT).
BARE: dict[str, tuple[str, str, str]] = {
    "ort_fp32": ("fp32", "onnxruntime", ""),
    "ov_fp32": ("fp32", "openvino", "f32"),
    "ov_bf16": ("fp32", "openvino", "bf16"),
    "ort_int8": ("int8", "onnxruntime", ""),
    "ov_int8": ("int8", "openvino", "f32"),
}

#: The gateways: name (that of its bare engine) to (which version, ``--engine``).
GATEWAYS: dict[str, tuple[str, str]] = {
    "ort_fp32": ("fp32", "onnxruntime"),
    "ov_bf16": ("bf16", "openvino"),
    "ort_int8": ("int8", "onnxruntime"),
    "ov_int8": ("int8", "openvino"),
}

#: The ratios compared: name to (numerator, denominator, target or 0 for none). ``bare_``
#: ratios divide bare engines' images/s, ``gateway_`` ones gateways', each in the same round.
RATIOS: dict[str, tuple[str, str, float]] = {
    "bare_fp32_ov_vs_ort": ("ov_fp32", "ort_fp32", 0.0),
    "bare_bf16_ov_vs_ort_fp32": ("ov_bf16", "ort_fp32", 1.8),
    "bare_int8_ov_vs_ort": ("ov_int8", "ort_int8", 0.0),
    "gateway_bf16_ov_vs_ort_fp32": ("ov_bf16", "ort_fp32", 1.7),
    "gateway_int8_ov_vs_ort": ("ov_int8", "ort_int8", 1.05),
}

#: The CPU flags the engines' kernels depend on (what the figures were measured on).
ISA_FLAGS = ("avx2", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")

#: Interleaved rounds of each closed-loop step: three, so that one round a neighbour
#: disturbed (a single 16-client window moved 20 % on the shared 2-core machine) is not
#: half of the median.
ROUNDS = 3

#: Batch sizes whose bare costs make the ideal server's cost model.
SIZES = (1, 2, 4, 8)


def isa_flags() -> list[str]:
    """Which of ISA_FLAGS this CPU has."""
    return sorted(set(ISA_FLAGS) & cpu_flags())


def ratios(bare: list[dict[str, float]], gateway: list[dict[str, float]]) -> dict[str, Any]:
    """RATIOS over rounds of images/s (one dict a round, by engine name): each round's ratio,
    the median, its target and whether the median meets it (None: no target)."""
    out: dict[str, Any] = {}
    for name, (top, bottom, target) in RATIOS.items():
        rounds = bare if name.startswith("bare_") else gateway
        each = [round(r[top] / r[bottom], 3) for r in rounds]
        mid = round(median(each), 3)
        out[name] = {
            "rounds": each,
            "median": mid,
            "target": target or None,
            "met": (mid >= target) if target else None,
        }
    return out


def vs_own_bare(bare: list[dict[str, float]], gateway: list[dict[str, float]]) -> dict[str, float]:
    """Each gateway's images/s as a ratio to its own bare engine in the same round, median."""
    return {
        name: round(median(g[name] / b[name] for b, g in zip(bare, gateway, strict=True)), 3)
        for name in GATEWAYS
    }


def demo_agreement(report: dict[str, Any]) -> dict[str, Any]:
    """What a demo version's ``export_report.json`` says of its precision against FP32 on the
    held-out digits: top-1 agreement and the largest logit difference (% of the largest
    logit), and for INT8 OpenVINO's kernels against the exact INT8 reference."""
    gate = report["accuracy_gate"]
    kernels = report["kernels_vs_exact"]
    out = {
        "precision": report["precision"],
        "candidate": gate["candidate"],
        "images": gate["images"],
        "images_source": gate["images_source"],
        "top1_vs_fp32_pct": gate["top1_agreement_pct"],
        "max_logit_diff": round(gate["max_abs_logit_diff"], 4),
        "kernels": f"{kernels['kernels']} vs {kernels['reference']}",
        "kernels_max_diff_pct_of_largest": kernels["max_diff_pct_of_largest"],
    }
    if "openvino_vs_exact" in report:
        ov = report["openvino_vs_exact"]
        out["openvino_top1_vs_exact_pct"] = ov["top1_agreement_pct"]
        out["openvino_max_diff_pct_of_largest"] = ov["max_diff_pct_of_largest"]
    return out


def demo_reports(repositories: tuple[Path, ...]) -> list[dict[str, Any]]:
    """demo_agreement of the newest version of every model in each repository."""
    found = []
    for repo in repositories:
        for model in sorted(p for p in repo.iterdir() if p.is_dir()):
            versions = sorted(
                (v for v in model.iterdir() if v.name.isdigit()), key=lambda v: int(v.name)
            )
            if versions and (versions[-1] / "export_report.json").is_file():
                report = json.loads((versions[-1] / "export_report.json").read_text())
                found.append({"repository": str(repo), **demo_agreement(report)})
    return found


def _bare_rates(files: dict[str, Path]) -> dict[str, Rate]:
    rates: dict[str, Rate] = {}
    for name, (which, engine, precision) in BARE.items():
        path = onnx_of(files[which])
        rates[name] = ort_rate(path) if engine == "onnxruntime" else openvino_rate(path, precision)
    return rates


def bare_rounds(rates: dict[str, Rate], seconds: float) -> list[dict[str, float]]:
    """ROUNDS interleaved rounds of every bare engine at batch 8, ``seconds`` each."""
    out = []
    for n in range(ROUNDS):
        row = {}
        for name, rate in rates.items():
            row[name] = round(rate(8, seconds), 2)
        log(f"bare, round {n + 1}: {row}")
        out.append(row)
    return out


def gateway_rounds(
    gateways: dict[str, GatewayProcess], body: bytes, seconds: float
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """ROUNDS interleaved rounds of 16 closed-loop clients against each gateway (3 s of
    warm-up): images/s a round, and the last round's summaries."""
    out, last = [], {}
    for n in range(ROUNDS):
        row = {}
        for name, gw in gateways.items():
            log(f"round {n + 1}, gateway {name}, 16 clients ...")
            step = load(gw, body, seconds, clients=16, warmup_s=3)
            log(f"  {line(step)}")
            row[name] = round(step.images_per_s, 2)
            last[name] = step.summary()
        out.append(row)
    return out, last


def tails(
    gateways: dict[str, GatewayProcess], rates: dict[str, Rate], body: bytes, seconds: float
) -> dict[str, Any]:
    """Each gateway under Poisson arrivals at 0.4x its own bare batch 8, p99 against the
    ideal server under the very same arrivals with its own bare batch costs."""
    out: dict[str, Any] = {}
    for name, gw in gateways.items():
        per_s = {n: rates[name](n, min(3.0, seconds / 4)) for n in SIZES}
        costs = CostModel({n: n / per_s[n] for n in SIZES})
        rate = 0.4 * per_s[8]
        ideal = float(
            np.percentile(ideal_latencies_s(poisson_schedule(rate, seconds, 0), costs.cost, 8), 99)
        )
        log(f"gateway {name}: Poisson {rate:.1f}/s ...")
        got = poisson_p99_ms(gw.url, body, rate, seconds, seed=0)
        out[name] = {
            "rate_per_s": round(rate, 2),
            "bare_batch_cost_ms": {n: round(costs.cost(n) * 1000, 1) for n in SIZES},
            "ideal_p99_ms": round(ideal * 1000, 1),
            **got,
            "vs_ideal": round(got["p99_ms"] / (ideal * 1000), 2),
        }
        log(f"  {out[name]}")
    return out


def bench_engines(
    root: Path, body: bytes, seconds: float, demo: tuple[Path, ...] = ()
) -> dict[str, Any]:
    """The phase on the FP32 export in ``root``; a BF16 and an INT8 one are exported into a
    folder of their own (one in ``root`` would be read as a model)."""
    with tempfile.TemporaryDirectory(prefix="resnet-bench-engines-") as tmp:
        files = {"fp32": root, "bf16": Path(tmp) / "bf16", "int8": export_int8(Path(tmp) / "q")}
        export_model(files["bf16"], "--precision", "bf16", "--min-agreement", "0")
        return {**_measure(files, body, seconds), "demo_agreement": demo_reports(demo)}


def _measure(files: dict[str, Path], body: bytes, seconds: float) -> dict[str, Any]:
    rates = _bare_rates(files)
    bare = bare_rounds(rates, seconds / 2)
    gateways: dict[str, GatewayProcess] = {}
    try:
        for name, (which, engine) in GATEWAYS.items():
            log(f"starting gateway {name} ({engine}, {which}) ...")
            gateways[name] = start_gateway(files[which], "--engine", engine)
        gateway, summaries = gateway_rounds(gateways, body, seconds)
        poisson = tails(gateways, rates, body, seconds)
    finally:
        for gw in gateways.values():
            gw.stop()
    return {
        "rounds": ROUNDS,
        "bare_batch8_images_per_s": bare,
        "gateway_clients16_images_per_s": gateway,
        "gateway_clients16_last_round": summaries,
        "ratios": ratios(bare, gateway),
        "gateway_vs_own_bare": vs_own_bare(bare, gateway),
        "poisson_vs_ideal": poisson,
    }
