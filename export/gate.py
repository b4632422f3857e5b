"""The accuracy gate: a reduced-precision model (INT8, FP16, a TensorRT engine) is compared
with its FP32 reference on held-out real images before it may be published.

The figure that matters to a classifier's users is how often the top-1 class changes, so
that is what the gate thresholds (``--min-agreement``, default 99 %); the largest logit
difference is reported beside it, since a model can agree on top-1 and still have drifted.
A gate of 0 reports without refusing (benchmarks on untrained weights, whose near-tied
logits flip under any rounding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.contract import PreprocessContract

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
