"""The accuracy gate: a reduced-precision model (INT8, FP16, a TensorRT engine) is compared
with its FP32 reference on held-out real images before it may be published.

The figure that matters to a classifier's users is how often the top-1 class changes, so
that is what the gate thresholds (``--min-agreement``, default 99 %); the largest logit
difference is reported beside it, since a model can agree on top-1 and still have drifted.
A gate of 0 reports without refusing (benchmarks on untrained weights, whose near-tied
logits flip under any rounding). Each figure is logged as it is found, and a reduced
model that misses the gate is refused with an ExportError: nothing is published.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.images import Images
from export.quantize import Precision
from service.host.cpus import cpu_isa
from service.model.contract import PreprocessContract
from service.model.repository import PROBE_TOLERANCE, parity_problem

DEFAULT_MIN_AGREEMENT = 99.0
#: Images per ONNX Runtime run when scoring a folder (memory stays bounded).
BATCH = 8


def run_onnx(
    path: Path, contract: PreprocessContract, x: np.ndarray, *, exact: bool = False
) -> np.ndarray:
    """Logits of the ONNX model at ``path`` for ``x`` (N images), on the CPU.

    ``exact``: with graph optimizations off, nothing fuses a QDQ graph's
    QuantizeLinear/DequantizeLinear pairs into integer kernels, so each quantized op runs
    as float arithmetic on dequantized values: what an exact integer kernel computes, on
    any CPU (the INT8 reference; export.quantize says why the kernels may differ)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = [
        session.run([contract.output_name], {contract.input_name: x[i : i + BATCH]})[0]
        for i in range(0, len(x), BATCH)
    ]
    return np.concatenate(out).astype(np.float32)


@dataclass(frozen=True)
class AgreementReport:
    """How a candidate's logits compare with the reference's on the same images."""

    candidate: str
    reference: str
    images: int
    images_source: str
    top1_agreement_pct: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    min_agreement_pct: float
    passed: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        if self.min_agreement_pct == 0:
            verdict = "REPORT ONLY (--min-agreement 0)"
        return (
            f"accuracy gate {verdict}: {self.candidate} agrees with {self.reference} on "
            f"top-1 for {self.top1_agreement_pct:.2f}% of {self.images} {self.images_source} "
            f"(minimum {self.min_agreement_pct:g}%); max |logit diff| "
            f"{self.max_abs_logit_diff:.3g}, mean {self.mean_abs_logit_diff:.3g}"
        )

    def refusal(self) -> str:
        missed = self.min_agreement_pct - self.top1_agreement_pct
        return (
            f"not published: {self.candidate} top-1 agreement with {self.reference} is "
            f"{self.top1_agreement_pct:.2f}% on {self.images} {self.images_source}, "
            f"{missed:.2f} points below --min-agreement {self.min_agreement_pct:g}"
        )


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    names: tuple[str, str],
    images_source: str,
    min_agreement_pct: float = DEFAULT_MIN_AGREEMENT,
) -> AgreementReport:
    """Score ``candidate`` logits against ``reference`` logits (same images, same order)."""
    if reference.shape != candidate.shape or not len(reference):
        raise ValueError(f"logits differ in shape: {reference.shape} vs {candidate.shape}")
    agree = float((reference.argmax(1) == candidate.argmax(1)).mean()) * 100
    diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
    return AgreementReport(
        candidate=names[0],
        reference=names[1],
        images=len(reference),
        images_source=images_source,
        top1_agreement_pct=round(agree, 4),
        max_abs_logit_diff=float(diff.max()),
        mean_abs_logit_diff=float(diff.mean()),
        min_agreement_pct=min_agreement_pct,
        passed=agree >= min_agreement_pct,
    )


def apply_gate(
    reference: np.ndarray,
    candidate: np.ndarray,
    what: str,
    images: Images,
    min_agreement: float,
    log: Callable[[str], None],
    refuse: bool = True,
) -> AgreementReport:
    """Score ``candidate`` against FP32 on ``images`` and log it; refuse (unless not
    ``refuse``: the caller reports several before refusing) if it misses ``min_agreement``."""
    gate = compare(
        reference,
        candidate,
        names=(what, "FP32"),
        images_source=images.source,
        min_agreement_pct=min_agreement,
    )
    log(gate.summary())
    if refuse and not gate.passed:
        raise ExportError(gate.refusal())
    return gate


def gate_reduced(
    published: Path,
    contract: PreprocessContract,
    reference: np.ndarray,
    precision: Precision,
    images: Images,
    min_agreement: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The accuracy gate of the reduced graph as this CPU's kernels run it and, for INT8,
    as the exact reference computes it (what the kernels of every other CPU must match):
    both against FP32, both reported before either refuses; then the kernels against the
    reference within the gateway's probe tolerance, so that the file published gives here
    what it gives on any node. The report's part."""
    candidate = run_onnx(published, contract, images.tensors)
    if precision != "int8":
        gate = apply_gate(reference, candidate, precision.upper(), images, min_agreement, log)
        return {"accuracy_gate": gate.as_dict()}
    kernels = cpu_isa()
    exact = run_onnx(published, contract, images.tensors, exact=True)
    what = f"INT8 on {kernels} kernels"
    on_kernels = apply_gate(reference, candidate, what, images, min_agreement, log, refuse=False)
    on_exact = apply_gate(
        reference, exact, "INT8 exact reference", images, min_agreement, log, refuse=False
    )
    versus = compare(
        exact,
        candidate,
        names=(what, "INT8 exact reference"),
        images_source=images.source,
    )
    problem = parity_problem(exact, candidate)
    log(
        f"{what} vs the exact reference: top-1 agreement "
        f"{versus.top1_agreement_pct:.2f}% of {versus.images}, max |logit diff| "
        f"{versus.max_abs_logit_diff:.3g} ({'PASS' if problem is None else 'FAIL'}: the "
        f"gateway's probe allows {PROBE_TOLERANCE:.0%} of the largest logit)"
    )
    for gate in (on_kernels, on_exact):
        if not gate.passed:
            raise ExportError(gate.refusal())
    if problem is not None:
        raise ExportError(
            f"not published: INT8 on this CPU's {kernels} kernels differs from the exact "
            f"reference on {images.source}: {problem}"
        )
    return {
        "accuracy_gate": on_kernels.as_dict(),
        "accuracy_gate_exact": on_exact.as_dict(),
        "kernels_vs_exact": {
            "kernels": kernels,
            "top1_agreement_pct": versus.top1_agreement_pct,
            "max_abs_logit_diff": versus.max_abs_logit_diff,
            "largest_logit": float(np.abs(exact).max()),
            "tolerance_pct_of_largest": PROBE_TOLERANCE * 100,
        },
    }
