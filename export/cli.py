"""``resnet-export``: trained ResNet -> verified ONNX -> Triton model repository.

Every failure caused by input (a bad checkpoint, an unknown arch, an unwritable
repository...) ends with one line on stderr and exit status 1; nothing is written.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from export.errors import ExportError
from service.cli_base import fail, make_app
from service.contract import ContractError, describe_validation_error

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


class KindOpt(enum.StrEnum):
    auto = "auto"
    cpu = "cpu"
    gpu = "gpu"


def _fail(message: str) -> typer.Exit:
    return fail("resnet-export", message)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn every anticipated failure into one line and exit 1 (never a traceback)."""
    from export.models import UnknownArch

    try:
        yield
    except (typer.Exit, typer.Abort):
        raise  # a deliberate exit (validate's status), not a failure of ours
    except (ExportError, UnknownArch, ContractError) as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        typer.echo("resnet-export: interrupted; nothing was published", err=True)
        raise typer.Exit(130) from None
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise _fail(f"{exc.strerror or exc}{where}") from None
    except Exception as exc:
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
InstanceKindOpt = Annotated[
    KindOpt,
    typer.Option(
        help="Triton instance_group kind for flavor onnxruntime (python-ort is always CPU)."
    ),
]


@app.command()
def export(
    arch: Annotated[
        str, typer.Option(help="Network from the registry; see `resnet-export archs`.")
    ],
    weights: Annotated[
        str,
        typer.Option(
            help="Checkpoint: a .pth/.pt (state_dict, or a dict holding 'state_dict'/'model') or "
            ".safetensors file; 'torchvision:IMAGENET1K_V2'-style names download torchvision's "
            "weights (needs a network); 'random' exports untrained weights (benchmarks only)."
        ),
    ],
    name: Annotated[str, typer.Option(help="Model name in the repository (and in URLs).")],
    repository: RepositoryOpt,
    num_classes: Annotated[int, typer.Option(min=1, help="Classes of the final layer.")] = 1000,
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Class names, one per line, in class-index order. Default: ImageNet-1k "
            "names for 1000-class models; required otherwise."
        ),
    ] = None,
    channels: Annotated[
        ChannelsOpt, typer.Option(help="Input colour model: RGB (3 planes) or L (greyscale).")
    ] = ChannelsOpt.RGB,
    resize: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Shorter side after resize. Default: the weight set's (232 for torchvision "
            "V2 weights), else 256.",
        ),
    ] = None,
    crop: Annotated[int, typer.Option(min=1, help="Side of the square center crop.")] = 224,
    interpolation: Annotated[
        InterpOpt, typer.Option(help="Resize interpolation.")
    ] = InterpOpt.bilinear,
    mean: Annotated[
        str | None,
        typer.Option(help="Per-channel mean in 0..1, comma-separated. Default: ImageNet's."),
    ] = None,
    std: Annotated[
        str | None,
        typer.Option(help="Per-channel std in 0..1, comma-separated. Default: ImageNet's."),
    ] = None,
    max_batch_size: MaxBatchOpt = 32,
    max_queue_delay_us: QueueDelayOpt = 2000,
    instance_count: InstanceCountOpt = 1,
    instance_kind: InstanceKindOpt = KindOpt.auto,
    flavor: FlavorOption = FlavorOpt.onnxruntime,
    opset: Annotated[int, typer.Option(help="ONNX opset (13-21).")] = 17,
) -> None:
    """Export a trained ResNet to ONNX, verify it against PyTorch, and publish a new version."""
    with _errors():
        from export.models import build_model
        from export.onnx_export import MAX_OPSET, MIN_OPSET, real_images
        from export.pipeline import default_labels, export_and_publish, read_labels_file
        from export.repository import ServingConfig, check_name, ensure_writable
        from export.weights import IMAGENET_MEAN, IMAGENET_STD, load_weights, resolve_torchvision
        from service.contract import PreprocessContract

        # Everything that can be checked cheaply is checked before any heavy work.
        check_name(name)
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise ExportError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET}, got {opset}")
        in_chans = 3 if channels == ChannelsOpt.RGB else 1
        model = build_model(arch, num_classes=num_classes, in_chans=in_chans)
        class_names = (
            read_labels_file(labels, num_classes) if labels else default_labels(num_classes)
        )
        ensure_writable(repository)

        weight_set = None
        if weights.startswith("torchvision:"):
            weight_set = resolve_torchvision(arch, weights.split(":", 1)[1])
        default_mean = IMAGENET_MEAN if in_chans == 3 else (sum(IMAGENET_MEAN) / 3,)
        default_std = IMAGENET_STD if in_chans == 3 else (sum(IMAGENET_STD) / 3,)
        try:
            contract = PreprocessContract(
                arch=arch,
                input_name="input",
                output_name="logits",
                channels=channels.value,
                resize=resize or (weight_set.resize if weight_set else 256),
                crop=crop,
                interpolation=interpolation.value,
                mean=_floats(mean, "--mean") or default_mean,
                std=_floats(std, "--std") or default_std,
                num_classes=num_classes,
            )
        except ValidationError as exc:
            detail = describe_validation_error(exc)
            raise ExportError(f"invalid preprocessing options: {detail}") from None

        if weights == "random":
            typer.echo("weights: random (untrained; for benchmarks only)")
        else:
            loaded = load_weights(model, arch, weights)
            contract = contract.model_copy(update={"source_sha256": loaded.sha256})
            typer.echo(f"weights: {weights} (sha256 {loaded.sha256[:12]}...)")
        serving = ServingConfig(
            max_batch_size=max_batch_size,
            max_queue_delay_us=max_queue_delay_us,
            instance_count=instance_count,
            instance_kind=instance_kind.value,
        )
        result = export_and_publish(
            model=model,
            contract=contract,
            labels=class_names,
            name=name,
            repository=repository,
            flavor=flavor.value,
            serving=serving,
            opset=opset,
            real_images=real_images(),
            source=weights,
            log=typer.echo,
        )
        typer.echo(f"report: {result.model_dir / str(result.version) / 'export_report.json'}")


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
) -> None:
    """Train the demo model (ResNet-18 on scikit-learn's digits, offline); export as 'digits'."""
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
        from service.repository import latest_version

        models, problems = validate_repository(repository)
        for problem in problems:
            typer.echo(f"resnet-export: invalid: {problem}", err=True)
        if problems:
            raise typer.Exit(1)
        if not quiet:
            for model in models:
                typer.echo(f"ok: {model} (version {latest_version(repository / model)})")


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
