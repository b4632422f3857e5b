"""INT8: the same network quantized by ``resnet-export export --precision int8`` (calibrated
on crops of real photographs; the gate only reports, since random weights have no accuracy
to keep): bare INT8 against bare FP32, what export's gates measured, the gateway serving
INT8, and INT8's latency under load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.benchmarks.bare import bare_ort
from deploy.benchmarks.common import NAME, gateway_clients16, log
from deploy.benchmarks.inputs import calibration_images, export_model, onnx_of
from deploy.benchmarks.latency import latency_under_load

#: Photo crops INT8's export gate runs on (FP32, the kernels and the exact reference).
INT8_GATE_IMAGES = 64


def bench_int8(
    root: Path,
    body: bytes,
    seconds: float,
    bare8_fp32: float,
    latency_only: bool = False,
    latency: bool = True,
) -> dict[str, Any]:
    repo = export_int8(root)
    calib = root / "calibration"
    onnx_path = onnx_of(repo)
    log("bare ONNX Runtime, INT8 ...")
    bare1 = bare_ort(onnx_path, 1, seconds / 2)
    bare8 = bare_ort(onnx_path, 8, seconds)
    log(f"  batch 1: {bare1:.1f} img/s, batch 8: {bare8:.1f} img/s")
    out: dict[str, Any] = {
        "bare_batch1_images_per_s": round(bare1, 2),
        "bare_batch8_images_per_s": round(bare8, 2),
        "bare_int8_vs_fp32_batch8": round(bare8 / bare8_fp32, 3),
        "export_gates": int8_gates(repo / NAME / "1" / "export_report.json"),
    }
    if not latency_only:
        r16 = gateway_clients16("gateway INT8", repo, body, seconds)
        out["gateway_clients16"] = r16.summary()
        out["gateway_vs_bare_int8_batch8"] = round(r16.images_per_s / bare8, 3)
    if latency:
        out["latency_under_load"] = latency_under_load(repo, calib, seconds, bare1, bare8)
    return out


def export_int8(root: Path) -> Path:
    """The INT8 repository it exported under ``root`` (``root/int8``, calibrated on crops
    in ``root/calibration``)."""
    repo = root / "int8"
    calib = calibration_images(root / "calibration")
    # Other crops for the gate, so that its figures rest on more than calibration's
    # held-out fifth.
    sample = calibration_images(root / "sample", INT8_GATE_IMAGES, seed=1)
    export_model(
        repo,
        "--precision",
        "int8",
        "--calibration-dir",
        str(calib),
        "--sample-images",
        str(sample),
        "--calibration-method",
        "minmax",  # the fastest to calibrate; speed does not depend on the method
        "--min-agreement",
        "0",
    )
    return repo


def int8_gates(report_path: Path) -> dict[str, Any]:
    """What export measured of the INT8 file: top-1 agreement with FP32 on this CPU's
    kernels and for the exact reference, and the kernels' largest logit difference from
    the reference as a share of the largest logit (random weights: the gate only reports)."""
    report = json.loads(report_path.read_text())
    versus = report["kernels_vs_exact"]
    return {
        "kernels": versus["kernels"],
        "scheme": report["int8_scheme"],
        "images": report["accuracy_gate"]["images"],
        "kernels_top1_vs_fp32_pct": report["accuracy_gate"]["top1_agreement_pct"],
        "exact_top1_vs_fp32_pct": report["accuracy_gate_exact"]["top1_agreement_pct"],
        "kernels_top1_vs_exact_pct": versus["top1_agreement_pct"],
        "kernels_max_diff_vs_exact_pct_of_largest": round(
            100 * versus["max_abs_logit_diff"] / versus["largest_logit"], 3
        ),
    }
