"""The model repository: its layout, reading it, and checking it. Torch-free; both halves
import it (export writes what this module reads, and validates with it before publishing).

Layout of one model (Triton's, plus the preprocessing contract)::

    DIR/NAME/config.pbtxt              Triton ModelConfig: tensors, batching, instances
    DIR/NAME/labels.txt                one class name per line (the config's label_filename)
    DIR/NAME/<v>/preprocess.json       the preprocessing contract of version <v>
    DIR/NAME/<v>/model.onnx            the verified graph
    DIR/NAME/<v>/model.py              flavor python-ort only: Triton python backend + ORT
    DIR/NAME/<v>/export_report.json    what was checked before <v> was published

The contract is per version, in exactly one copy: what it records (precision, the source
checkpoint, the mean/std and resize the weights were trained with) belongs to the weights
of one version, and an INT8 or retrained version may differ there. What Triton fixes per
model (config.pbtxt: tensor names and shapes) every version's contract must agree with;
:func:`validate_model` checks that, and :func:`tensor_problems` is the one comparison
used by export (against the ONNX graph), ``validate``, and both backends (against the
ONNX Runtime session and against Triton's metadata).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.contract import LABELS_FILENAME, ContractError, PreprocessContract, read_labels

CONFIG_FILENAME = "config.pbtxt"
CONTRACT_FILENAME = "preprocess.json"
MODEL_FILENAME = "model.onnx"
PYTHON_MODEL_FILENAME = "model.py"
REPORT_FILENAME = "export_report.json"


class RepositoryError(ValueError):
    """The repository (or a model in it) cannot be served; the message says why."""


# --- tensors ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSig:
    """A tensor as the Open Inference Protocol describes it: -1 marks a dynamic axis."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.name!r} {self.datatype} {list(self.shape)}"


def contract_tensors(contract: PreprocessContract) -> tuple[list[TensorSig], list[TensorSig]]:
    """(inputs, outputs) the contract promises: FP32 images in, FP32 logits out."""
    return (
        [TensorSig(contract.input_name, "FP32", (-1, *contract.input_shape))],
        [TensorSig(contract.output_name, "FP32", (-1, contract.num_classes))],
    )


def tensor_problems(
    contract: PreprocessContract,
    inputs: list[TensorSig],
    outputs: list[TensorSig],
    source: str,
) -> list[str]:
    """How the tensors ``source`` declares disagree with the contract (empty if they agree)."""
    want_in, want_out = contract_tensors(contract)
    problems = []
    for kind, got, want in (("inputs", inputs, want_in), ("outputs", outputs, want_out)):
        if got != want:
            problems.append(
                f"{source} {kind} [{', '.join(map(str, got))}] != preprocess.json "
                f"[{', '.join(map(str, want))}]"
            )
    return problems


def config_tensors(cfg: mc.ModelConfig) -> tuple[list[TensorSig], list[TensorSig]]:
    """config.pbtxt's tensors (the batch axis, implied by max_batch_size, made explicit)."""
    batch = (-1,) if cfg.max_batch_size > 0 else ()

    def sig(t: mc.ModelInput | mc.ModelOutput) -> TensorSig:
        dtype = mc.DataType.Name(t.data_type).removeprefix("TYPE_")
        return TensorSig(t.name, dtype, (*batch, *t.dims))

    return [sig(i) for i in cfg.input], [sig(o) for o in cfg.output]


# --- reading ----------------------------------------------------------------------------------


def parse_config(text: str) -> mc.ModelConfig:
    """Parse config.pbtxt with Triton's own ModelConfig protobuf."""
    cfg = mc.ModelConfig()
    text_format.Parse(text, cfg)
    return cfg


def read_config(model_dir: Path) -> mc.ModelConfig:
    path = model_dir / CONFIG_FILENAME
    try:
        return parse_config(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise RepositoryError(f"{CONFIG_FILENAME} missing") from exc
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise RepositoryError(
            f"{CONFIG_FILENAME} does not parse as a Triton ModelConfig ({exc})"
        ) from exc


def numbered_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def latest_version(model_dir: Path) -> int | None:
    versions = numbered_versions(model_dir)
    return versions[-1] if versions else None


def model_dirs(repository: Path) -> list[Path]:
    """Model directories of a repository (hidden entries and plain files are not models)."""
    return sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))


@dataclass(frozen=True)
class ModelSpec:
    """One servable version of a model: everything above the backend needs to know."""

    name: str
    version: str
    contract: PreprocessContract
    labels: tuple[str, ...]
    max_batch_size: int
    model_path: Path
    #: Triton's platform or backend ("onnxruntime_onnx", "python").
    platform: str
    #: config.pbtxt, as Triton's protobuf (served by the model configuration extension).
    config: mc.ModelConfig

    @property
    def precision(self) -> str:
        return self.contract.precision


def _contract(model_dir: Path, version: int) -> PreprocessContract:
    try:
        return PreprocessContract.load(model_dir / str(version) / CONTRACT_FILENAME)
    except ContractError as exc:
        raise RepositoryError(str(exc).replace(f"{model_dir}/", "")) from exc


def load_spec(model_dir: Path, version: int | None = None) -> ModelSpec:
    """The spec of one version (default: the newest), or RepositoryError naming the model."""
    try:
        cfg = read_config(model_dir)
        if version is None:
            version = latest_version(model_dir)
            if version is None:
                raise RepositoryError("no numbered version directory")
        elif version not in numbered_versions(model_dir):
            held = ", ".join(map(str, numbered_versions(model_dir))) or "none"
            raise RepositoryError(f"no version {version} (versions: {held})")
        contract = _contract(model_dir, version)
        try:
            labels = read_labels(model_dir / contract.labels_file)
        except ContractError as exc:
            raise RepositoryError(str(exc).replace(f"{model_dir}/", "")) from exc
        if len(labels) != contract.num_classes:
            raise RepositoryError(
                f"{contract.labels_file} has {len(labels)} names for {contract.num_classes} classes"
            )
    except RepositoryError as exc:
        raise RepositoryError(f"model {model_dir.name!r}: {exc}") from exc
    return ModelSpec(
        name=model_dir.name,
        version=str(version),
        contract=contract,
        labels=tuple(labels),
        max_batch_size=max(1, cfg.max_batch_size),
        model_path=model_dir / str(version) / MODEL_FILENAME,
        platform=cfg.platform or cfg.backend,
        config=cfg,
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


# --- checking ---------------------------------------------------------------------------------


def validate_model(model_dir: Path, expected_name: str | None = None) -> list[str]:
    """Every problem with one model directory that can be found without opening a graph,
    as ``"NAME: reason"`` strings: config, labels, and each version's contract and files.
    (The graph itself is checked by whoever opens it: export, and both backends.)"""
    name = expected_name or model_dir.name
    problems: list[str] = []

    def bad(msg: str, version: int | None = None) -> None:
        where = f"version {version}: " if version is not None else ""
        problems.append(f"{name}: {where}{msg}")

    cfg: mc.ModelConfig | None = None
    try:
        cfg = read_config(model_dir)
    except RepositoryError as exc:
        bad(str(exc))
    if cfg is not None:
        if cfg.name and cfg.name != name:
            bad(f"config name {cfg.name!r} differs from the directory name")
        if cfg.max_batch_size < 1:
            bad("config max_batch_size must be at least 1")
    labels: list[str] | None = None
    try:
        labels = read_labels(model_dir / LABELS_FILENAME)
    except ContractError as exc:
        bad(str(exc).replace(f"{model_dir}/", ""))

    versions = numbered_versions(model_dir)
    if not versions:
        bad("no numbered version directory")
    for version in versions:
        try:
            contract = _contract(model_dir, version)
        except RepositoryError as exc:
            bad(str(exc).removeprefix(f"{version}/"), version)
            continue
        if contract.labels_file != LABELS_FILENAME:
            bad(f"contract labels_file {contract.labels_file!r} is not {LABELS_FILENAME}", version)
        elif labels is not None and len(labels) != contract.num_classes:
            bad(f"{LABELS_FILENAME} has {len(labels)} names for {contract.num_classes} classes")
        if not (model_dir / str(version) / MODEL_FILENAME).is_file():
            bad(f"{MODEL_FILENAME} missing", version)
        if cfg is None:
            continue
        inputs, outputs = config_tensors(cfg)
        for p in tensor_problems(contract, inputs, outputs, CONFIG_FILENAME):
            bad(p, version)
        if cfg.output and cfg.output[0].label_filename not in ("", contract.labels_file):
            bad(f"config label_filename {cfg.output[0].label_filename!r} is not the contract's")
        python_model = model_dir / str(version) / PYTHON_MODEL_FILENAME
        if cfg.backend == "python" and not python_model.is_file():
            bad(f"{PYTHON_MODEL_FILENAME} missing (python backend)", version)
    return list(dict.fromkeys(problems))  # a model-level problem found per version: once
