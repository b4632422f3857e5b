"""Reduced precision behind the accuracy gate: the graph (INT8 or FP16) and the TensorRT
engine that a :class:`~export.plan.PrecisionPlan` asks for, each made from the FP32 graph
and proved against it (:mod:`export.gate`) before it may be published.

BF16 makes no graph of its own: a version says ``bf16`` and publishes the FP32 graph,
which OpenVINO computes in BF16 on a CPU with BF16 instructions (about twice ONNX
Runtime's FP32 speed) and every other node computes exactly in FP32. What it proves is
the BF16 computation, measured on this CPU (which must have BF16: export.plan)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.gate import apply_gate, gate_reduced, run_onnx
from export.images import Images
from export.onnx_export import check_onnx
from export.plan import PrecisionPlan
from export.quantize import Precision, convert_fp16, quantize_int8
from export.repository import Engine
from service.model.contract import Int8Scheme, PreprocessContract


@dataclass(frozen=True)
class Reduced:
    """The graph (and engine) to publish, and what their making and gating reported."""

    onnx: Path
    engine: Engine | None
    precision: Precision
    report: dict[str, Any]

    @property
    def int8_scheme(self) -> Int8Scheme | None:
        if self.precision != "int8":
            return None
        scheme: Int8Scheme = self.report["quantization"]["scheme"]
        return scheme


def reduce_precision(
    fp32: Path,
    contract: PreprocessContract,
    plan: PrecisionPlan,
    validation: Images | None,
    max_batch_size: int,
    log: Callable[[str], None],
) -> Reduced:
    """The graph (and engine) to publish for ``plan``, each through the accuracy gate
    against the FP32 graph on ``validation``."""
    if plan.precision == "fp32" and not plan.tensorrt:
        return Reduced(fp32, None, plan.precision, {})
    if validation is None or not len(validation):
        raise ExportError("no images to check the reduced-precision model on (--sample-images DIR)")
    reference = run_onnx(fp32, contract, validation.tensors)
    report: dict[str, Any] = {}
    published = fp32
    if plan.precision != "fp32":
        published, settings = _reduced_graph(fp32, contract, plan, log)
        check_onnx(published, contract)
        report["quantization"] = settings
        report.update(
            gate_reduced(
                published,
                contract,
                reference,
                plan.precision,
                validation,
                plan.min_agreement,
                log,
            )
        )
    engine = None
    if plan.tensorrt:
        engine, outputs = _engine(fp32, published, contract, plan, validation, max_batch_size, log)
        gate = apply_gate(
            reference, outputs, "TensorRT engine", validation, plan.min_agreement, log
        )
        report["tensorrt"] = {**json.loads(engine.manifest), "accuracy_gate": gate.as_dict()}
    return Reduced(published, engine, plan.precision, report)


def _reduced_graph(
    fp32: Path, contract: PreprocessContract, plan: PrecisionPlan, log: Callable[[str], None]
) -> tuple[Path, dict[str, Any]]:
    """The graph ``plan.precision`` publishes, written beside ``fp32`` (BF16's is ``fp32``
    itself), and how it was made (the report's ``quantization``)."""
    if plan.precision == "bf16":
        log("BF16: the FP32 graph, to be computed in BF16 where the CPU has BF16 ...")
        return fp32, {
            "weights": "fp32 (the FP32 graph)",
            "compute": "bf16 on CPUs with BF16 instructions (OpenVINO), fp32 elsewhere",
            "inputs": contract.dtype,
            "outputs": "float32",
        }
    published = fp32.with_name(f"model.{plan.precision}.onnx")
    if plan.precision == "fp16":
        log(f"converting to FP16 ({contract.dtype} inputs, float32 outputs) ...")
        return published, convert_fp16(fp32, published, contract)
    if plan.calibration is None:
        raise ExportError("--precision int8 needs --calibration-dir DIR")
    log(
        f"quantizing to INT8: {plan.method} calibration on {len(plan.calibration)} "
        f"{plan.calibration.source} ..."
    )
    settings = quantize_int8(
        fp32,
        published,
        contract,
        plan.calibration.tensors,
        plan.method,
        # TensorRT takes only symmetric INT8; ORT's fast x86 path is uint8.
        symmetric_activations=plan.symmetric_int8 or plan.tensorrt,
    )
    settings["calibration_source"] = plan.calibration.source
    return published, settings


def _engine(
    fp32: Path,
    published: Path,
    contract: PreprocessContract,
    plan: PrecisionPlan,
    validation: Images,
    max_batch_size: int,
    log: Callable[[str], None],
) -> tuple[Engine, np.ndarray]:
    """Build the TensorRT plan (FP16 from the FP32 graph, INT8 from the QDQ graph: its
    scales are the calibrated ones) and run it on the validation images."""
    from export import tensorrt as trt

    source = published if plan.precision == "int8" else fp32
    plan_path = fp32.with_name(trt.PLAN_FILENAME)
    log(f"building the TensorRT engine ({plan.precision}) on this GPU ...")
    manifest = trt.build_engine(
        source, plan_path, contract, max_batch_size, plan.precision, plan.timing_cache, log
    )
    step = min(8, max_batch_size)
    outputs = np.concatenate(
        [
            trt.run_engine(
                plan_path,
                validation.tensors[i : i + step],
                contract.input_name,
                contract.output_name,
            )
            for i in range(0, len(validation), step)
        ]
    )
    return Engine(plan_path, manifest.to_json()), outputs
