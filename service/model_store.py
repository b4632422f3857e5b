"""Reading the model repository on the gateway side (no torch): what each model is.

A :class:`ModelSpec` is everything above the backend needs to know about a model: its
contract (preprocessing, tensor names), labels, version, and batch limit. Both backends
serve the same specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.contract import (
    CONTRACT_FILENAME,
    ContractError,
    PreprocessContract,
    read_labels,
)

CONFIG_FILENAME = "config.pbtxt"
MODEL_FILENAME = "model.onnx"


class RepositoryError(ValueError):
    """The repository (or a model in it) cannot be served; the message says why."""


def parse_config(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt with Triton's own ModelConfig protobuf."""
    cfg = mc.ModelConfig()
    text_format.Parse(text, cfg)
    return cfg


def numbered_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def model_dirs(repository: Path) -> list[Path]:
    """Model directories of a repository (hidden entries and plain files are not models)."""
    return sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    contract: PreprocessContract
    labels: tuple[str, ...]
    max_batch_size: int
    onnx_path: Path
    #: Triton's platform or backend for the model ("onnxruntime_onnx", "python").
    platform: str = ""
    #: config.pbtxt as Triton's JSON (GET /v2/models/{m}/config).
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return self.contract.precision


def load_spec(model_dir: Path) -> ModelSpec:
    name = model_dir.name
    try:
        cfg = parse_config((model_dir / CONFIG_FILENAME).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RepositoryError(f"model {name!r}: {CONFIG_FILENAME} missing") from exc
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise RepositoryError(f"model {name!r}: {CONFIG_FILENAME} does not parse ({exc})") from exc
    try:
        contract = PreprocessContract.load(model_dir / CONTRACT_FILENAME)
        labels = read_labels(model_dir / contract.labels_file)
    except ContractError as exc:
        raise RepositoryError(f"model {name!r}: {exc}") from exc
    if len(labels) != contract.num_classes:
        raise RepositoryError(
            f"model {name!r}: {len(labels)} labels for {contract.num_classes} classes"
        )
    versions = numbered_versions(model_dir)
    if not versions:
        raise RepositoryError(f"model {name!r}: no numbered version directory")
    onnx_path = model_dir / str(versions[-1]) / MODEL_FILENAME
    return ModelSpec(
        name=name,
        version=str(versions[-1]),
        contract=contract,
        labels=tuple(labels),
        max_batch_size=max(1, cfg.max_batch_size),
        onnx_path=onnx_path,
        platform=cfg.platform or cfg.backend,
        config=json_format.MessageToDict(cfg, preserving_proto_field_name=True),
    )


def load_repository(repository: Path, only: list[str] | None = None) -> list[ModelSpec]:
    """Specs of the models to serve (all, or those named in ``only``), or RepositoryError."""
    if not repository.is_dir():
        raise RepositoryError(f"model repository {repository} is not a directory")
    dirs = {p.name: p for p in model_dirs(repository)}
    if only:
        unknown = [n for n in only if n not in dirs]
        if unknown:
            raise RepositoryError(
                f"models not in {repository}: {', '.join(unknown)}; "
                f"available: {', '.join(dirs) or 'none'}"
            )
        dirs = {n: dirs[n] for n in only}
    if not dirs:
        raise RepositoryError(
            f"model repository {repository} holds no model "
            f"(try `resnet-export demo -r {repository}`)"
        )
    return [load_spec(p) for p in dirs.values()]
