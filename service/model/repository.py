"""The model repository: its layout, reading it, and checking it. Torch-free; both halves
import it (export writes what this module reads, and validates with it before publishing).

Layout of one model (Triton's, plus the preprocessing contract)::

    DIR/NAME/config.pbtxt              Triton ModelConfig: tensors, batching, instances
    DIR/NAME/labels.txt                one class name per line (the config's label_filename)
    DIR/NAME/<v>/preprocess.json       the preprocessing contract of version <v>
    DIR/NAME/<v>/model.onnx            the verified graph
    DIR/NAME/<v>/model.py              flavor python-ort only: Triton python backend + ORT
    DIR/NAME/<v>/export_report.json    what was checked before <v> was published
    DIR/NAME/<v>/probe.npz             a few inputs and the outputs export verified for them
    DIR/NAME/rollout.json              optional: canary weights and a shadow version

Which versions are served is config.pbtxt's ``version_policy`` (Triton's: latest N, the
default latest 1; all; specific), plus any version rollout.json names: :func:`served_versions`,
the one reading of it for both backends.

The contract is per version, in exactly one copy: what it records (precision, the source
checkpoint, the mean/std and resize the weights were trained with) belongs to the weights
of one version, and an INT8 or retrained version may differ there. What Triton fixes per
model (config.pbtxt: tensor names and shapes) every version's contract must agree with;
:func:`layout_problems` checks that, and :func:`tensor_problems` is the one comparison
used by export (against the ONNX graph), ``validate``, and both backends (against the
ONNX Runtime session and against Triton's metadata).
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from google.protobuf import text_format
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator
from tritonclient.grpc import model_config_pb2 as mc

from service.model.contract import (
    LABELS_FILENAME,
    ContractError,
    PreprocessContract,
    describe_validation_error,
    read_labels,
)

CONFIG_FILENAME = "config.pbtxt"
CONTRACT_FILENAME = "preprocess.json"
MODEL_FILENAME = "model.onnx"
PYTHON_MODEL_FILENAME = "model.py"
REPORT_FILENAME = "export_report.json"
PROBE_FILENAME = "probe.npz"
ROLLOUT_FILENAME = "rollout.json"


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
    """(inputs, outputs) the contract promises: images in (FP32 planes, or UINT8 pixels),
    FP32 logits out."""
    return (
        [TensorSig(contract.input_name, contract.datatype, (-1, *contract.input_shape))],
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
    except OSError as exc:  # unreadable to the gateway's user, a directory...
        raise RepositoryError(f"{CONFIG_FILENAME}: {exc.strerror or exc}") from exc
    except (text_format.ParseError, UnicodeDecodeError) as exc:
        raise RepositoryError(
            f"{CONFIG_FILENAME} does not parse as a Triton ModelConfig ({exc})"
        ) from exc


def numbered_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    # ASCII digits only (version_key's rule, and Triton's): "²" is a digit to str.isdigit()
    # but not to int(), and int("١") is 1.
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isascii() and p.name.isdigit()
    )


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

    @functools.cached_property
    def labels_json(self) -> tuple[str, ...]:
        """Each class name as a JSON string, encoded once (every REST answer carries some)."""
        return tuple(json.dumps(label, ensure_ascii=False) for label in self.labels)


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


# --- which versions are served ---------------------------------------------------------------


def version_key(text: str) -> str:
    """A version number as the gateway keys versions ("01" is "1"), or ValueError."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{text!r} is not a version number")
    return str(int(text))


#: A weight is a JSON number: pydantic's lax mode would read true as 1.0 and "50" as 50.0.
StrictWeight = Annotated[float, Strict()]


class Rollout(BaseModel):
    """``rollout.json``: how unpinned traffic is split between versions, and which version
    gets a copy of it. Absent: every unpinned request goes to the newest served version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: dict[str, StrictWeight] = Field(
        default_factory=dict,
        description="Version -> share of the unpinned requests (relative; 0 = none).",
    )
    shadow: str | None = Field(
        None, description="A version that gets a copy of live traffic; its answers are compared."
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        weights: dict[str, float] = {}
        for version, weight in value.items():
            if not 0 <= weight < float("inf"):
                raise ValueError(f"weight of version {version} must be 0 or more, got {weight}")
            key = version_key(version)
            if key in weights:
                raise ValueError(f"version {key} is given twice")
            weights[key] = weight
        if weights and not any(weights.values()):
            raise ValueError("at least one weight must be above 0")
        return weights

    @field_validator("shadow")
    @classmethod
    def _shadow(cls, value: str | None) -> str | None:
        return None if value is None else version_key(value)

    def named(self) -> set[int]:
        """Every version this rollout sends traffic (or a copy of it) to."""
        named = {int(v) for v, w in self.weights.items() if w > 0}
        return named | ({int(self.shadow)} if self.shadow else set())

    def mentioned(self) -> set[int]:
        """Every version the file names, weight 0 included: each must exist (a typo must
        not pass as "no traffic")."""
        return {int(v) for v in self.weights} | ({int(self.shadow)} if self.shadow else set())


def read_rollout(model_dir: Path) -> Rollout:
    """The model's rollout.json (an empty Rollout if there is none), or RepositoryError."""
    path = model_dir / ROLLOUT_FILENAME
    try:
        return Rollout.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return Rollout()
    except OSError as exc:
        raise RepositoryError(f"{ROLLOUT_FILENAME}: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        raise RepositoryError(f"{ROLLOUT_FILENAME}: {describe_validation_error(exc)}") from exc


def write_rollout(model_dir: Path, rollout: Rollout) -> None:
    """Replace the model's rollout.json atomically (an empty rollout removes it)."""
    path = model_dir / ROLLOUT_FILENAME
    if rollout == Rollout():
        path.unlink(missing_ok=True)
        return
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=f".{ROLLOUT_FILENAME}.")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600: the gateways reading it run as other users
        with os.fdopen(fd, "w") as fh:
            fh.write(rollout.model_dump_json(indent=2, exclude_defaults=True) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def policy_versions(cfg: mc.ModelConfig, available: list[int]) -> list[int]:
    """The versions config.pbtxt's ``version_policy`` serves out of ``available``, as
    Triton reads it (no policy: the latest one), or RepositoryError for a specific
    version that is not there (Triton refuses such a model too)."""
    policy = cfg.version_policy
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return list(available)
    if which == "specific":
        if not policy.specific.versions:
            raise RepositoryError("version_policy specific lists no version")
        missing = sorted(set(policy.specific.versions) - set(available))
        if missing:
            raise RepositoryError(
                f"version_policy names version {', '.join(map(str, missing))}, "
                f"not in the repository (versions: {', '.join(map(str, available)) or 'none'})"
            )
        return sorted(set(policy.specific.versions))
    latest = policy.latest.num_versions if which == "latest" else 1
    return list(available[-max(1, latest) :])


def served_versions(model_dir: Path) -> tuple[list[int], Rollout]:
    """Which versions of a model to serve (its policy's, plus those its rollout names) and
    its rollout, or RepositoryError naming the model."""
    try:
        available = numbered_versions(model_dir)
        if not available:
            raise RepositoryError("no numbered version directory")
        rollout = read_rollout(model_dir)
        missing = sorted(rollout.mentioned() - set(available))
        if missing:
            raise RepositoryError(
                f"{ROLLOUT_FILENAME} names version {', '.join(map(str, missing))}, "
                f"not in the repository (versions: {', '.join(map(str, available))})"
            )
        versions = set(policy_versions(read_config(model_dir), available)) | rollout.named()
    except RepositoryError as exc:
        raise RepositoryError(f"model {model_dir.name!r}: {exc}") from exc
    return sorted(versions), rollout


#: Parity probe: a backend's logits may differ from export's by this share of the largest
#: logit (another execution provider, Triton's own ONNX Runtime build or another CPU's INT8
#: kernels may round differently; a wrong or corrupted graph is off by far more), and top-1
#: must agree.
PROBE_TOLERANCE = 0.02


def parity_problem(expected: np.ndarray, logits: np.ndarray) -> str | None:
    """Why ``logits`` are not the ``expected`` ones within PROBE_TOLERANCE (None: they are).

    One check for the gateway's probe at load and export's check of an INT8 file's kernels
    against the exact result."""
    diff = float(np.abs(logits - expected).max())
    tolerance = PROBE_TOLERANCE * max(1.0, float(np.abs(expected).max()))
    # A different top-1 counts only where the expected top two were a tie (within the
    # tolerance): there any rounding may pick either.
    rows = np.arange(len(expected))
    picked = expected[rows, logits.argmax(1)]
    agree = int((picked >= expected.max(1) - tolerance).sum())
    if diff > tolerance or agree < len(expected):
        return (
            f"max abs logit difference {diff:.4g} (tolerance {tolerance:.4g}), "
            f"top-1 agrees on {agree} of {len(expected)}"
        )
    return None


def load_probe(spec: ModelSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """The stored parity probe of a version: (inputs, the outputs export verified), or None
    for a version published without one."""
    path = spec.model_path.parent / PROBE_FILENAME
    if not path.is_file():
        return None
    try:
        inputs, outputs = _probe_arrays(path)
    except Exception as exc:  # numpy raises many kinds for a damaged archive (BadZipFile...)
        raise RepositoryError(
            f"model {spec.name!r} version {spec.version}: {PROBE_FILENAME} unreadable ({exc})"
        ) from exc
    return inputs, outputs


def _probe_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """probe.npz's inputs and outputs, or an exception: KeyError for a missing one,
    ValueError for a member that is not a .npy array (numpy would hand back its bytes)."""
    # np.load leaves a file it opened open when it is not a zip: open it here.
    with path.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
        arrays = data["inputs"], data["outputs"]
    if not all(isinstance(a, np.ndarray) for a in arrays):
        raise ValueError("its inputs and outputs are not .npy arrays")
    return arrays


def load_repository(repository: Path, only: list[str] | None = None) -> list[ModelSpec]:
    """Specs of every served version (:func:`served_versions`) of the models to serve (all,
    or those named in ``only``), or RepositoryError."""
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
    return [load_spec(p, v) for p in dirs.values() for v in served_versions(p)[0]]


# --- checking ---------------------------------------------------------------------------------


def layout_problems(model_dir: Path, expected_name: str | None = None) -> list[str]:
    """Every problem with one model directory that can be found without opening a graph,
    as ``"NAME: reason"`` strings: config, labels, each version's contract and files (a
    probe.npz, where there is one, included), and the versions rollout.json names.
    (The graph itself is checked by whoever opens it: export, and both backends.)"""
    name = expected_name or model_dir.name
    problems: list[str] = []  # NAME is put before each at the end
    cfg: mc.ModelConfig | None = None
    try:
        cfg = read_config(model_dir)
    except RepositoryError as exc:
        problems.append(str(exc))
    if cfg is not None:
        if cfg.name and cfg.name != name:
            problems.append(f"config name {cfg.name!r} differs from the directory name")
        if cfg.max_batch_size < 1:
            problems.append("config max_batch_size must be at least 1")
    labels: list[str] | None = None
    try:
        labels = read_labels(model_dir / LABELS_FILENAME)
    except ContractError as exc:
        problems.append(str(exc).replace(f"{model_dir}/", ""))

    versions = numbered_versions(model_dir)
    if not versions:
        problems.append("no numbered version directory")
    for version in versions:
        problems += _version_problems(model_dir, version, cfg, labels)
    try:
        missing = sorted(read_rollout(model_dir).mentioned() - set(versions))
    except RepositoryError as exc:
        problems.append(str(exc))
    else:
        if missing:
            versions_named = ", ".join(map(str, missing))
            problems.append(f"{ROLLOUT_FILENAME} names version {versions_named}, not on disk")
    # A model-level problem found per version: once.
    return [f"{name}: {problem}" for problem in dict.fromkeys(problems)]


def _version_problems(
    model_dir: Path, version: int, cfg: mc.ModelConfig | None, labels: list[str] | None
) -> list[str]:
    """One version's problems (``cfg`` and ``labels``: the model's, None where unreadable):
    its contract against the labels and the config, its files; each ``"version N: reason"``,
    or the bare reason where the fault is the model's (its labels, its config's label file)."""
    at = f"version {version}: "
    try:
        contract = _contract(model_dir, version)
    except RepositoryError as exc:
        return [at + str(exc).removeprefix(f"{version}/")]
    vdir = model_dir / str(version)
    problems: list[str] = []
    if contract.labels_file != LABELS_FILENAME:
        problems.append(
            f"{at}contract labels_file {contract.labels_file!r} is not {LABELS_FILENAME}"
        )
    elif labels is not None and len(labels) != contract.num_classes:
        problems.append(
            f"{LABELS_FILENAME} has {len(labels)} names for {contract.num_classes} classes"
        )
    if not (vdir / MODEL_FILENAME).is_file():
        problems.append(f"{at}{MODEL_FILENAME} missing")
    if (vdir / PROBE_FILENAME).exists():
        problems += [at + p for p in _probe_problems(vdir / PROBE_FILENAME, contract)]
    if cfg is None:
        return problems
    inputs, outputs = config_tensors(cfg)
    problems += [at + p for p in tensor_problems(contract, inputs, outputs, CONFIG_FILENAME)]
    if cfg.output and cfg.output[0].label_filename not in ("", contract.labels_file):
        problems.append(
            f"config label_filename {cfg.output[0].label_filename!r} is not the contract's"
        )
    if cfg.backend == "python" and not (vdir / PYTHON_MODEL_FILENAME).is_file():
        problems.append(f"{at}{PYTHON_MODEL_FILENAME} missing (python backend)")
    return problems


def _probe_problems(path: Path, contract: PreprocessContract) -> list[str]:
    """A probe must load and hold what the contract says: inputs of its dtype
    (n, *input_shape) and logits (n, num_classes), 1 <= n. None is fine (older exports)."""
    if not zipfile.is_zipfile(path):
        return [f"{PROBE_FILENAME} is not an .npz archive"]
    try:
        with path.open("rb") as fh, np.load(fh, allow_pickle=False) as data:
            absent = [k for k in ("inputs", "outputs") if k not in data.files]
        if absent:
            return [f"{PROBE_FILENAME} has no {' or '.join(absent)} array"]
        inputs, outputs = _probe_arrays(path)
    except Exception as exc:  # zipfile, zlib and numpy each raise their own errors
        return [f"{PROBE_FILENAME} unreadable ({type(exc).__name__}: {exc})"]
    n = inputs.shape[0] if inputs.ndim else 0
    if inputs.dtype != contract.dtype or inputs.shape != (n, *contract.input_shape) or n < 1:
        dims = ", ".join(map(str, contract.input_shape))
        return [
            f"{PROBE_FILENAME} inputs are {inputs.dtype} {list(inputs.shape)}, the contract "
            f"says {contract.dtype} [n, {dims}] with n >= 1"
        ]
    if outputs.dtype != np.float32 or outputs.shape != (n, contract.num_classes):
        return [
            f"{PROBE_FILENAME} outputs are {outputs.dtype} {list(outputs.shape)}, the "
            f"contract says float32 [{n}, {contract.num_classes}] (logits per input)"
        ]
    return []
