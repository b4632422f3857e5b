"""``resnet-export``: trained ResNet -> verified ONNX -> Triton model repository.

Every failure caused by input (a bad checkpoint, an unknown arch, an unwritable
repository...) ends with one line on stderr and exit status 1; nothing is written.
"""

from __future__ import annotations

import contextlib
import enum
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError

from export.errors import ExportError
from export.gate import DEFAULT_MIN_AGREEMENT
from export.quantize import DEFAULT_CALIBRATION_COUNT
from service.model.contract import ContractError, describe_validation_error
from service.tools.cli_common import fail, make_app

if TYPE_CHECKING:
    from service.model.repository import Rollout

app = make_app(
    "resnet-export",
    "Export trained ResNets to verified ONNX and write a Triton model repository.",
)


class FlavorOpt(enum.StrEnum):
    onnxruntime = "onnxruntime"
    python_ort = "python-ort"


class ChannelsOpt(enum.StrEnum):
    RGB = "RGB"
    L = "L"


class InterpOpt(enum.StrEnum):
    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"


class InputOpt(enum.StrEnum):
    float32 = "float32"
    uint8 = "uint8"


#: --input: what the published graph takes (the contract's dtype and layout).
InputOption = Annotated[
    InputOpt,
    typer.Option(
        "--input",
        help="float32: normalized NCHW planes, the gateway normalizes. uint8: the cropped "
        "image's NHWC pixels as decoded; the graph's first nodes normalize them (no float "
        "work per pixel in the gateway, a quarter of the bytes to Triton).",
    ),
]


class WeightsKeyOpt(enum.StrEnum):
    auto = "auto"
    model = "model"
    model_ema = "model_ema"
    state_dict = "state_dict"


class PrecisionOpt(enum.StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"
    int8 = "int8"


class CalibrationOpt(enum.StrEnum):
    percentile = "percentile"
    minmax = "minmax"
    entropy = "entropy"


class FormatOpt(enum.StrEnum):
    onnx = "onnx"
    tensorrt = "tensorrt"


class KindOpt(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


def _fail(message: str) -> typer.Exit:
    return fail("resnet-export", message)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn every anticipated failure into one line and exit 1 (never a traceback)."""
    from service.host.files import FolderError
    from service.model.repository import RepositoryError

    try:
        yield
    except (typer.Exit, typer.Abort):
        raise  # a deliberate exit (validate's status), not a failure of ours
    except (ExportError, ContractError, RepositoryError, FolderError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        typer.echo("resnet-export: interrupted; nothing was published", err=True)
        raise typer.Exit(130) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise _fail(f"{exc.strerror or exc}{where}") from None
    except Exception as exc:
        # An unknown arch can only come from export.models, imported by then (importing it
        # here would load torch, seconds, into commands that never need it: rollout).
        models = sys.modules.get("export.models")
        if models is not None and isinstance(exc, models.UnknownArch):
            raise _fail(str(exc)) from None
        if os.environ.get("RESNET_EXPORT_DEBUG"):
            raise
        raise _fail(
            f"internal error: {type(exc).__name__}: {exc} "
            "(RESNET_EXPORT_DEBUG=1 shows the traceback)"
        ) from None


def _floats(text: str | None, option: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ExportError(f"{option} takes comma-separated numbers, got {text!r}") from None


RepositoryOpt = Annotated[
    Path,
    typer.Option("--repository", "-r", help="Model repository directory (created if missing)."),
]
FlavorOption = Annotated[
    FlavorOpt,
    typer.Option(
        help="onnxruntime: platform onnxruntime_onnx for NVIDIA's Triton image. python-ort: a "
        "python-backend model running ONNX Runtime on the same file, for Triton builds "
        "without the ORT backend (the CPU tritonserver in nvidia-pytriton).",
    ),
]
MaxBatchOpt = Annotated[
    int, typer.Option(min=1, max=1024, help="Triton max_batch_size; also the gateway's batch cap.")
]
QueueDelayOpt = Annotated[
    int,
    typer.Option(
        min=0, max=1_000_000, help="Triton dynamic_batching max_queue_delay_microseconds."
    ),
]
InstanceCountOpt = Annotated[
    int, typer.Option(min=1, max=64, help="Triton instance_group count (model copies).")
]
PrecisionOption = Annotated[
    PrecisionOpt,
    typer.Option(
        help="fp32; int8: calibrated static quantization (QDQ, per-channel weights), the "
        "CPU speed-up (2-3x on VNNI CPUs); bf16: the FP32 graph, served in BF16 by "
        "OpenVINO on CPUs with BF16 instructions (about 2x FP32) and exactly in FP32 "
        "elsewhere; measured here, so this CPU needs BF16 and OpenVINO (the openvino "
        "extra); fp16: FP16 weights and compute with FP32 inputs and outputs, for GPU "
        "backends. Reduced precision is published only if it passes the accuracy gate "
        "(--min-agreement)."
    ),
]
MinAgreementOpt = Annotated[
    float,
    typer.Option(
        min=0,
        max=100,
        help="Accuracy gate: the minimum top-1 agreement (percent) of a reduced-precision "
        "model with the FP32 model on held-out images; 0 reports without refusing "
        "(benchmarks on untrained weights).",
    ),
]
InstanceKindOpt = Annotated[
    KindOpt,
    typer.Option(
        help="Triton instance_group kind for flavor onnxruntime (python-ort is always CPU)."
    ),
]


# --- export's options, in the order --help lists them ---------------------------------------

ArchOpt = Annotated[str, typer.Option(help="Network from the registry; see `resnet-export archs`.")]
WeightsOpt = Annotated[
    str,
    typer.Option(
        help="Checkpoint: a .pth/.pt (state_dict, or a dict holding 'state_dict'/'model') or "
        ".safetensors file; 'torchvision:IMAGENET1K_V2'-style names download torchvision's "
        "weights (needs a network); 'random' exports untrained weights (benchmarks only)."
    ),
]
NameOpt = Annotated[str, typer.Option(help="Model name in the repository (and in URLs).")]
NumClassesOpt = Annotated[int, typer.Option(min=1, help="Classes of the final layer.")]
LabelsOpt = Annotated[
    Path | None,
    typer.Option(
        help="Class names, one per line, in class-index order. Default: ImageNet-1k "
        "names for 1000-class models; required otherwise."
    ),
]
ChannelsOption = Annotated[
    ChannelsOpt, typer.Option(help="Input colour model: RGB (3 planes) or L (greyscale).")
]
ResizeOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Shorter side after resize. Default: the weight set's (232 for torchvision "
        "V2 weights), else 256.",
    ),
]
CropOpt = Annotated[int, typer.Option(min=1, help="Side of the square center crop.")]
InterpolationOpt = Annotated[InterpOpt, typer.Option(help="Resize interpolation.")]
MeanOpt = Annotated[
    str | None,
    typer.Option(help="Per-channel mean in 0..1, comma-separated. Default: ImageNet's."),
]
StdOpt = Annotated[
    str | None,
    typer.Option(help="Per-channel std in 0..1, comma-separated. Default: ImageNet's."),
]
OpsetOpt = Annotated[int, typer.Option(help="ONNX opset (13-21).")]
WeightsKeyOption = Annotated[
    WeightsKeyOpt,
    typer.Option(
        help="Which weights of a training checkpoint to export. auto: the 'model' entry "
        "(what torchvision's reference script evaluates unless told --model-ema), else "
        "'state_dict', else the file itself; model_ema: the EMA weights (torchvision's "
        "published V2 weights are EMA weights)."
    ),
]
SampleImagesOpt = Annotated[
    Path | None,
    typer.Option(
        help="A folder of your own images: the parity check and the accuracy gate also "
        "run on them (preprocessed by the model's contract)."
    ),
]
CalibrationDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="INT8: real images to calibrate on (any format the gateway accepts; "
        "corrupt files are skipped). 20% are held apart for the accuracy gate unless "
        "--sample-images is given."
    ),
]
CalibrationCountOpt = Annotated[
    int, typer.Option(min=1, max=100_000, help="INT8: images to calibrate on, at most.")
]
CalibrationMethodOpt = Annotated[
    CalibrationOpt,
    typer.Option(
        help="INT8 activation ranges. percentile (99.999th of |x|): robust to the rare "
        "large ReLU activations that minmax spends the 256 levels on; entropy: "
        "TensorRT's KL method, slower."
    ),
]
SymmetricInt8Opt = Annotated[
    bool,
    typer.Option(
        "--symmetric-int8",
        help="INT8: symmetric int8 activations, as TensorRT requires (implied by --format "
        "tensorrt); without it, uint8 activations, ONNX Runtime's fast path on x86.",
    ),
]
FormatOption = Annotated[
    FormatOpt,
    typer.Option(
        "--format",
        help="tensorrt: also build a TensorRT plan on this machine's GPU (needs TensorRT "
        "and an NVIDIA GPU) and configs/tensorrt.pbtxt; see `resnet-export tensorrt-job`.",
    ),
]
TimingCacheOpt = Annotated[
    Path | None, typer.Option(help="TensorRT timing cache file (read and updated).")
]


@app.command()
def export(
    arch: ArchOpt,
    weights: WeightsOpt,
    name: NameOpt,
    repository: RepositoryOpt,
    num_classes: NumClassesOpt = 1000,
    labels: LabelsOpt = None,
    channels: ChannelsOption = ChannelsOpt.RGB,
    resize: ResizeOpt = None,
    crop: CropOpt = 224,
    interpolation: InterpolationOpt = InterpOpt.bilinear,
    mean: MeanOpt = None,
    std: StdOpt = None,
    input: InputOption = InputOpt.float32,
    max_batch_size: MaxBatchOpt = 32,
    max_queue_delay_us: QueueDelayOpt = 2000,
    instance_count: InstanceCountOpt = 1,
    instance_kind: InstanceKindOpt = KindOpt.auto,
    flavor: FlavorOption = FlavorOpt.onnxruntime,
    opset: OpsetOpt = 17,
    weights_key: WeightsKeyOption = WeightsKeyOpt.auto,
    sample_images: SampleImagesOpt = None,
    precision: PrecisionOption = PrecisionOpt.fp32,
    calibration_dir: CalibrationDirOpt = None,
    calibration_count: CalibrationCountOpt = DEFAULT_CALIBRATION_COUNT,
    calibration_method: CalibrationMethodOpt = CalibrationOpt.percentile,
    min_agreement: MinAgreementOpt = DEFAULT_MIN_AGREEMENT,
    symmetric_int8: SymmetricInt8Opt = False,
    format: FormatOption = FormatOpt.onnx,
    timing_cache: TimingCacheOpt = None,
) -> None:
    """Export a trained ResNet to ONNX, verify it against PyTorch, and publish a new version."""
    with _errors():
        from export.pipeline import export as run_export
        from export.plan import ExportRequest
        from export.repository import ServingConfig

        request = ExportRequest(
            arch=arch,
            weights=weights,
            name=name,
            repository=repository,
            num_classes=num_classes,
            labels=labels,
            channels=channels.value,
            resize=resize,
            crop=crop,
            interpolation=interpolation.value,
            mean=_floats(mean, "--mean"),
            std=_floats(std, "--std"),
            input_dtype=input.value,
            serving=ServingConfig(
                max_batch_size=max_batch_size,
                max_queue_delay_us=max_queue_delay_us,
                instance_count=instance_count,
                instance_kind=instance_kind.value,
            ),
            flavor=flavor.value,
            opset=opset,
            weights_key=weights_key.value,
            sample_images=sample_images,
            precision=precision.value,
            calibration_dir=calibration_dir,
            calibration_count=calibration_count,
            calibration_method=calibration_method.value,
            min_agreement=min_agreement,
            symmetric_int8=symmetric_int8,
            tensorrt=format == FormatOpt.tensorrt,
            timing_cache=timing_cache,
        )
        result = run_export(request, log=typer.echo, warn=_warn)
        typer.echo(f"report: {result.model_dir / str(result.version) / 'export_report.json'}")


def _check_tensorrt_int8(version_dir: Path) -> None:
    """TensorRT takes only symmetric INT8: a graph quantized for ONNX Runtime's uint8 CPU
    kernels cannot become an engine."""
    import json

    from export.trt_node import int8_problem
    from service.model.repository import REPORT_FILENAME

    problem = int8_problem(json.loads((version_dir / REPORT_FILENAME).read_text()))
    if problem:
        raise ExportError(f"{version_dir} is {problem}")


def _warn(message: str) -> None:
    typer.echo(f"resnet-export: {message}", err=True)


@app.command()
def demo(
    repository: RepositoryOpt,
    flavor: FlavorOption = FlavorOpt.onnxruntime,
    epochs: Annotated[int, typer.Option(min=1, max=200, help="Training epochs.")] = 12,
    seed: Annotated[int, typer.Option(help="Random seed (split, init, shuffling).")] = 0,
    images_out: Annotated[
        Path | None,
        typer.Option(help="Also write the held-out digits as PNGs: DIR/<label>/<n>.png."),
    ] = None,
    max_batch_size: MaxBatchOpt = 32,
    max_queue_delay_us: QueueDelayOpt = 2000,
    precision: PrecisionOption = PrecisionOpt.fp32,
    min_agreement: MinAgreementOpt = DEFAULT_MIN_AGREEMENT,
    input: InputOption = InputOpt.float32,
    checkpoint_out: Annotated[
        Path | None,
        typer.Option(
            help="Also save the trained weights (a state_dict that `export --weights` reads) "
            "to this file."
        ),
    ] = None,
) -> None:
    """Train the demo model (ResNet-18 on scikit-learn's digits, offline); export as 'digits'.

    With --precision int8 it calibrates on the training digits; every reduced precision is
    gated on the held-out ones.
    """
    with _errors():
        from export.demo import run_demo
        from export.repository import ServingConfig

        result = run_demo(
            repository,
            flavor=flavor.value,
            epochs=epochs,
            seed=seed,
            images_out=images_out,
            serving=ServingConfig(
                max_batch_size=max_batch_size,
                max_queue_delay_us=max_queue_delay_us,
                instance_kind="cpu",
            ),
            precision=precision.value,
            min_agreement=min_agreement,
            input_dtype=input.value,
            checkpoint_out=checkpoint_out,
            log=typer.echo,
        )
        acc = result.report["training"]["heldout_accuracy_torch"]
        typer.echo(f"digits: held-out accuracy {acc:.2%}; version {result.version}")


@app.command()
def validate(
    repository: RepositoryOpt,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print problems only.")] = False,
) -> None:
    """Check every model: config parses, files exist, contract agrees with the ONNX graph."""
    with _errors():
        from export.repository import validate_repository
        from service.host.cpus import cpu_isa
        from service.model.repository import load_spec

        models, problems = validate_repository(repository)
        for problem in problems:
            typer.echo(f"resnet-export: invalid: {problem}", err=True)
        if problems:
            raise typer.Exit(1)
        if not quiet:
            kernels = cpu_isa()
            for model in models:
                spec = load_spec(repository / model)
                precision = spec.precision
                if precision == "int8":
                    # An INT8 file from before the scheme was recorded has 8-bit weights,
                    # whose answers depend on the CPU's kernels (export.quantize).
                    scheme = (
                        spec.contract.int8_scheme
                        or "(scheme not recorded: answers may differ by CPU)"
                    )
                    precision = f"int8 {scheme}"
                typer.echo(f"ok: {model} (version {spec.version}, {precision}; {kernels} kernels)")


def _version(text: str, what: str) -> str:
    """A version number as rollout.json spells it ("02" -> "2")."""
    from service.model.repository import version_key

    try:
        return version_key(text)
    except ValueError as exc:
        raise ExportError(f"{what} {exc}") from None


def _weights(pairs: list[str]) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in pairs:
        version, sep, weight = pair.partition("=")
        try:
            if not sep:
                raise ValueError
            share = float(weight)
        except ValueError:
            raise ExportError(
                f"--weight takes VERSION=WEIGHT (e.g. --weight 2=10), got {pair!r}"
            ) from None
        key = _version(version.strip(), "--weight: version")
        if key in weights:
            raise ExportError(f"--weight: version {key} given twice")
        weights[key] = share
    return weights


def _rollout_line(name: str, versions: list[int], rollout: Rollout) -> str:
    if rollout.weights:
        split = " ".join(f"{v}={w:g}" for v, w in sorted(rollout.weights.items(), key=_by_version))
    else:
        split = f"all to {max(versions)} (the newest served)"
    line = f"{name}: serving versions {', '.join(map(str, versions))}; unpinned traffic {split}"
    return line + (f"; shadow {rollout.shadow}" if rollout.shadow else "")


def _by_version(item: tuple[str, float]) -> int:
    return int(item[0])


@app.command()
def rollout(
    model: Annotated[str, typer.Argument(metavar="MODEL", help="Model name in the repository.")],
    repository: Annotated[
        Path, typer.Option("--repository", "-r", help="Model repository directory.")
    ],
    weight: Annotated[
        list[str] | None,
        typer.Option(
            "--weight",
            metavar="VERSION=WEIGHT",
            help="Share of the unpinned requests (no version pinned) for VERSION, relative to "
            "the others given (90 and 10 split 90/10; 0 = none); repeat for each version.",
        ),
    ] = None,
    shadow: Annotated[
        str | None,
        typer.Option(
            metavar="VERSION",
            help="A version that gets a copy of live traffic; its answers are compared, "
            "never returned.",
        ),
    ] = None,
    clear: Annotated[
        bool,
        typer.Option(
            "--clear", help="Remove the rollout: the newest served version gets every request."
        ),
    ] = False,
) -> None:
    """Split a model's unpinned traffic between versions (canary) and mirror it to a shadow
    version: writes DIR/MODEL/rollout.json. Each call states the whole rollout (what it does
    not give is dropped); without options it prints the current one and changes nothing."""
    with _errors():
        from export.repository import find_model, set_rollout
        from service.model.repository import Rollout, served_versions

        model_dir = find_model(repository, model)
        if clear and (weight or shadow is not None):
            raise ExportError("--clear takes no --weight or --shadow")
        if not (clear or weight or shadow is not None):
            typer.echo(_rollout_line(model, *served_versions(model_dir)))
            return
        try:
            new = Rollout(
                weights=_weights(weight or []),
                shadow=_version(shadow, "--shadow") if shadow is not None else None,
            )
        except ValidationError as exc:
            raise ExportError(f"invalid rollout: {describe_validation_error(exc)}") from None
        versions, written = set_rollout(repository, model, new)
        typer.echo(_rollout_line(model, versions, written))


@app.command()
def evaluate(
    images: Annotated[
        Path, typer.Option(help="Labelled images, ImageFolder layout: DIR/<label>/<image>.")
    ],
    model: Annotated[str, typer.Option(help="NAME or NAME:VERSION (default: the newest).")],
    repository: Annotated[
        Path | None,
        typer.Option(
            "--repository",
            "-r",
            help="Model repository: the model evaluated in-process (the gateway's "
            "preprocessing, ONNX Runtime), and the labels and contract --url's images are "
            "checked against.",
        ),
    ] = None,
    url: Annotated[
        str | None,
        typer.Option(help="Evaluate a running gateway at this base URL instead (REST /v1)."),
    ] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Also report top-1 agreement with another VERSION of the model or with an "
            "ONNX file (e.g. the FP32 export).",
        ),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="RESNET_API_KEY", help="API key for --url.")
    ] = None,
    output: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
) -> None:
    """Top-1/top-5 accuracy and per-class errors of a model on labelled images."""
    with _errors():
        import json

        from export.evaluate import evaluate as run

        report = run(
            images,
            model,
            repository=repository,
            url=url,
            compare_with=compare,
            api_key=api_key,
            log=_warn,
        )
        line = (
            f"{report['model']}: top-1 {report['top1_accuracy_pct']:.2f}%, top-5 "
            f"{report['top5_accuracy_pct']:.2f}% on {report['images']} images"
        )
        if "agreement" in report:
            agreement = report["agreement"]
            line += (
                f"; top-1 agreement with {agreement['reference']} "
                f"{agreement['top1_agreement_pct']:.2f}%"
            )
        typer.echo(line)
        worst = sorted(report["per_class"].items(), key=lambda kv: kv[1]["top1_accuracy_pct"])
        for label, entry in worst[:5]:
            if entry["top1_errors"]:
                typer.echo(
                    f"  {label}: {entry['top1_errors']}/{entry['images']} wrong, mistaken for "
                    + ", ".join(f"{k} ({v})" for k, v in entry["mistaken_for"].items())
                )
        if output is not None:
            output.write_text(json.dumps(report, indent=2) + "\n")
            typer.echo(f"report: {output}")


@app.command("tensorrt-job")
def tensorrt_job(
    repository: RepositoryOpt,
    model: Annotated[str, typer.Option(help="NAME or NAME:VERSION (default: the newest).")],
    output: Annotated[
        Path | None, typer.Option(help="Write the Kubernetes Job manifest here (YAML).")
    ] = None,
    claim: Annotated[
        str, typer.Option(help="PersistentVolumeClaim holding the model repository.")
    ] = "model-repository",
    image: Annotated[str, typer.Option(help="TensorRT container image (has trtexec).")] = "",
    namespace: Annotated[str | None, typer.Option(help="Namespace of the Job.")] = None,
) -> None:
    """Print the trtexec command that builds a published model's TensorRT engine, and write
    a Kubernetes Job that runs it on a GPU node (engines are tied to the GPU they are built
    on, so they are built where they will be served)."""
    with _errors():
        from export import tensorrt as trt
        from export.evaluate import parse_model
        from service.model.repository import load_spec

        name, version = parse_model(model)
        spec = load_spec(repository / name, version)
        _check_tensorrt_int8(spec.model_path.parent)
        vdir = f"/models/{name}/{spec.version}"
        argv = trt.trtexec_command(
            f"{vdir}/model.onnx",
            f"{vdir}/{trt.PLAN_FILENAME}",
            spec.contract,
            spec.max_batch_size,
            spec.precision,
        )
        typer.echo(trt.shell_command(argv))
        if output is not None:
            from export.build_job import TRT_IMAGE, render_build_job

            job = render_build_job(
                name,
                int(spec.version),
                spec.max_batch_size,
                spec.precision,
                repository_claim=claim,
                image=image or TRT_IMAGE,
                namespace=namespace,
            )
            output.write_text(job)
            typer.echo(f"job: {output}")


@app.command()
def archs() -> None:
    """List the registered architectures and their torchvision weight names."""
    from export.models import ARCHS
    from export.weights import TORCHVISION_WEIGHTS

    for arch in ARCHS:
        names = ", ".join(f"torchvision:{n}" for n in sorted(TORCHVISION_WEIGHTS.get(arch, {})))
        typer.echo(f"{arch:20s} {names}")


def main() -> None:
    app(prog_name="resnet-export")


if __name__ == "__main__":  # pragma: no cover
    main()
