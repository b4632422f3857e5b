"""The accuracy gate: a reduced-precision model (INT8, FP16, BF16, a TensorRT engine) is
compared with its FP32 reference on held-out real images before it may be published.

The figure that matters to a classifier's users is how often the top-1 class changes, so
that is what the gate thresholds (``--min-agreement``, default 99 %); the largest logit
difference is reported beside it, since a model can agree on top-1 and still have drifted.
A gate of 0 reports without refusing (benchmarks on untrained weights, whose near-tied
logits flip under any rounding). Each figure is logged as it is found, and a reduced
model that misses the gate is refused with an ExportError: nothing is published.

Where a node's fast kernels may compute something other than what the version's parity
probe stores (INT8 on any CPU's integer kernels, ONNX Runtime's and OpenVINO's; BF16 on a
CPU's BF16 instructions, OpenVINO's), they are also held to the probe's result within the
gateway's probe tolerance, so that a version published here loads on every node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from export.errors import ExportError
from export.images import Images
from export.quantize import Precision
from service.host.cpus import bf16_isa, cpu_isa
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


def openvino_version() -> str | None:
    """OpenVINO's release ("2026.4.1"), None where it is not installed (the ``openvino``
    extra: the gateway may serve with ONNX Runtime alone)."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.get_version()).split("-")[0]


def run_openvino(
    path: Path, contract: PreprocessContract, x: np.ndarray, precision: Literal["f32", "bf16"]
) -> tuple[np.ndarray, str]:
    """Logits of the ONNX model at ``path`` for ``x`` as OpenVINO's CPU plugin computes
    them with ``INFERENCE_PRECISION_HINT`` ``precision``, and the precision it really
    computed in: the plugin quietly runs f32 where the CPU cannot run the hint (a QDQ
    graph's quantized ops run as INT8 either way)."""
    import openvino as ov

    try:
        compiled = ov.Core().compile_model(
            str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision}
        )
    except RuntimeError as exc:
        reason = next(iter(str(exc).strip().splitlines()), type(exc).__name__)
        raise ExportError(f"OpenVINO cannot compile {path.name}: {reason}") from None
    request = compiled.create_infer_request()
    output = compiled.output(contract.output_name)
    out = [
        np.array(request.infer({contract.input_name: x[i : i + BATCH]})[output])
        for i in range(0, len(x), BATCH)
    ]
    ran = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    return np.concatenate(out).astype(np.float32), str(ran)


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
    """The accuracy gate of the reduced graph against FP32 (``reference``) on ``images``,
    and where a node's kernels may compute something else than the probe stores, those
    kernels against it: the report's part."""
    if precision == "int8":
        return _gate_int8(published, contract, reference, images, min_agreement, log)
    if precision == "bf16":
        return _gate_bf16(published, contract, reference, images, min_agreement, log)
    candidate = run_onnx(published, contract, images.tensors)
    gate = apply_gate(reference, candidate, precision.upper(), images, min_agreement, log)
    return {"accuracy_gate": gate.as_dict()}


def _gate_int8(
    published: Path,
    contract: PreprocessContract,
    reference: np.ndarray,
    images: Images,
    min_agreement: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """INT8 as this CPU's ONNX Runtime kernels run it and as the exact reference computes
    it (what the kernels of every other CPU must match): both against FP32, both reported
    before either refuses; then the kernels against the reference within the gateway's
    probe tolerance, so that the file published gives here what it gives on any node.
    OpenVINO's kernels, where it is installed, are held to the same reference and
    reported, not refused: OpenVINO is the optional engine, and ONNX Runtime serves the
    file as checked (measured here: on untrained weights, whose logits are near-tied,
    OpenVINO's INT8 was off by 3.5 % of the largest logit while ONNX Runtime's VNNI
    kernels were exact; refusing would take INT8 from every user who has OpenVINO
    installed)."""
    kernels = cpu_isa()
    candidate = run_onnx(published, contract, images.tensors)
    exact = run_onnx(published, contract, images.tensors, exact=True)
    what = f"INT8 on {kernels} kernels"
    on_kernels = apply_gate(reference, candidate, what, images, min_agreement, log, refuse=False)
    on_exact = apply_gate(
        reference, exact, "INT8 exact reference", images, min_agreement, log, refuse=False
    )
    versus, problem = _against_exact(exact, candidate, what, "INT8 exact reference", images, log)
    openvino, ov_problem = _openvino_int8(published, contract, exact, kernels, images, log)
    for gate in (on_kernels, on_exact):
        if not gate.passed:
            raise ExportError(gate.refusal())
    if problem is not None:
        raise ExportError(
            f"not published: INT8 on this CPU's {kernels} kernels differs from the exact "
            f"reference on {images.source}: {problem}"
        )
    if ov_problem is not None:
        log(
            f"warning: INT8 through {openvino['engine']} differs from the exact reference "
            f"beyond the gateway's probe tolerance ({ov_problem}): a gateway serving with "
            "OpenVINO will refuse this version at its parity probe; ONNX Runtime serves it"
        )
    return {
        "accuracy_gate": on_kernels.as_dict(),
        "accuracy_gate_exact": on_exact.as_dict(),
        "kernels_vs_exact": {"kernels": kernels, **versus},
        "openvino_vs_exact": openvino,
    }


def _openvino_int8(
    published: Path,
    contract: PreprocessContract,
    exact: np.ndarray,
    kernels: str,
    images: Images,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], str | None]:
    """The INT8 file through OpenVINO (f32 hint: the quantized ops in INT8, the rest in
    FP32, what its gateway engine serves an INT8 version with) against the exact
    reference: the report's section and the problem (None: within the probe tolerance).
    Skipped, and said so, where OpenVINO is not installed: the gateway then serves with
    ONNX Runtime, which the check above covers."""
    version = openvino_version()
    if version is None:
        log("INT8 through OpenVINO: skipped (OpenVINO is not installed)")
        return {"skipped": "OpenVINO is not installed (the openvino extra)"}, None
    engine = f"OpenVINO {version}"
    candidate, ran = run_openvino(published, contract, images.tensors, "f32")
    what = f"INT8 through {engine} on {kernels} kernels"
    versus, problem = _against_exact(exact, candidate, what, "INT8 exact reference", images, log)
    return {"engine": engine, "inference_precision": ran, "kernels": kernels, **versus}, problem


def _gate_bf16(
    published: Path,
    contract: PreprocessContract,
    reference: np.ndarray,
    images: Images,
    min_agreement: float,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The FP32 graph computed in BF16 by OpenVINO on this CPU's BF16 instructions,
    against FP32 (``reference``, ONNX Runtime): the gate on top-1, and the logits within
    the gateway's probe tolerance, since the probe stores the FP32 result (what a node
    without BF16 serves) and a BF16 node must load the version too."""
    kernels = bf16_isa()
    version = openvino_version()
    if kernels is None or version is None:  # export.plan.check_precision refuses earlier
        raise ExportError("BF16 is measured with OpenVINO on a CPU with BF16 instructions")
    engine = f"OpenVINO {version}"
    candidate, ran = run_openvino(published, contract, images.tensors, "bf16")
    if ran != "bf16":
        raise ExportError(
            f"not published: {engine} computed in {ran}, not bf16, on this CPU "
            f"({kernels}); the accuracy gate cannot measure BF16 here"
        )
    what = f"BF16 through {engine} on {kernels}"
    gate = apply_gate(reference, candidate, what, images, min_agreement, log, refuse=False)
    versus, problem = _against_exact(reference, candidate, what, "FP32", images, log)
    if not gate.passed:
        raise ExportError(gate.refusal())
    if problem is not None:
        raise ExportError(
            f"not published: BF16 through {engine} differs from FP32 on {images.source} "
            f"beyond the gateway's probe tolerance: {problem}"
        )
    return {
        "accuracy_gate": gate.as_dict(),
        "kernels_vs_exact": {
            "kernels": kernels,
            "engine": engine,
            "inference_precision": ran,
            **versus,
        },
    }


def _against_exact(
    exact: np.ndarray,
    candidate: np.ndarray,
    what: str,
    reference: str,
    images: Images,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], str | None]:
    """``candidate`` (a node's fast kernels) against ``exact`` (what the version's probe
    stores) on ``images``, by the gateway's own probe check: the report's figures, logged,
    and the problem (None: the gateway's probe would pass)."""
    versus = compare(exact, candidate, names=(what, reference), images_source=images.source)
    problem = parity_problem(exact, candidate)
    largest = float(np.abs(exact).max())
    share = 100 * versus.max_abs_logit_diff / largest if largest else 0.0
    log(
        f"{what} vs {reference}: top-1 agreement {versus.top1_agreement_pct:.2f}% of "
        f"{versus.images}, max |logit diff| {versus.max_abs_logit_diff:.3g} ({share:.2f}% of "
        f"the largest logit; {'PASS' if problem is None else 'FAIL'}: the gateway's probe "
        f"allows {PROBE_TOLERANCE:.0%})"
    )
    return {
        "reference": reference,
        "top1_agreement_pct": versus.top1_agreement_pct,
        "max_abs_logit_diff": versus.max_abs_logit_diff,
        "largest_logit": largest,
        "max_diff_pct_of_largest": round(share, 4),
        "tolerance_pct_of_largest": PROBE_TOLERANCE * 100,
        "passed": problem is None,
    }, problem
