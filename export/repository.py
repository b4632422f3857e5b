"""Writing the Triton model repository: one model version at a time, atomically.

The layout, and every check that needs no graph, are ``service.model.repository``'s (the
gateway reads with the same code); this module adds the ONNX graph check to validation.

Publishing builds the complete new ``DIR/NAME`` beside the old one (earlier versions are
hard-linked, not copied), then swaps it in with renames under a lock. Any failure before
the swap removes the staging directory; the repository is left exactly as it was.
Changing which versions take traffic (``rollout.json``) takes the same lock, so a rollout
written while a version is being published is neither lost nor raced.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.errors import ExportError
from service.errors import brief
from service.model.contract import ContractError, PreprocessContract
from service.model.repository import (
    CONFIG_FILENAME,
    CONTRACT_FILENAME,
    LABELS_FILENAME,
    MODEL_FILENAME,
    PROBE_FILENAME,
    PYTHON_MODEL_FILENAME,
    REPORT_FILENAME,
    ROLLOUT_FILENAME,
    RepositoryError,
    Rollout,
    contract_tensors,
    latest_version,
    layout_problems,
    load_probe,
    load_spec,
    model_dirs,
    numbered_versions,
    policy_versions,
    read_config,
    served_versions,
    write_rollout,
)

LOCK_FILENAME = ".resnet-export.lock"
Flavor = Literal["onnxruntime", "python-ort"]
InstanceKind = Literal["auto", "cpu", "gpu"]
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_KINDS = {
    "auto": mc.ModelInstanceGroup.KIND_AUTO,
    "cpu": mc.ModelInstanceGroup.KIND_CPU,
    "gpu": mc.ModelInstanceGroup.KIND_GPU,
}


@dataclass(frozen=True)
class ServingConfig:
    """Triton scheduling knobs written into config.pbtxt."""

    max_batch_size: int = 32
    max_queue_delay_us: int = 2000
    instance_count: int = 1
    instance_kind: InstanceKind = "auto"
    preferred_batch_sizes: tuple[int, ...] = field(default=())

    def preferred(self) -> list[int]:
        if self.preferred_batch_sizes:
            return sorted(set(self.preferred_batch_sizes))
        sizes = [s for s in (4, 8, 16, 32, 64) if s <= self.max_batch_size]
        return sizes or [self.max_batch_size]


def check_name(name: str) -> None:
    if not _NAME_RE.match(name):
        raise ExportError(
            f"model name {name!r} is not valid: use letters, digits, '_', '.', '-' "
            "(at most 128, not starting with '.', '_' or '-')"
        )


def build_config(
    name: str, contract: PreprocessContract, flavor: Flavor, serving: ServingConfig
) -> mc.ModelConfig:
    if serving.max_batch_size < 1:
        raise ExportError(f"--max-batch-size must be at least 1, got {serving.max_batch_size}")
    bad = [s for s in serving.preferred() if not 1 <= s <= serving.max_batch_size]
    if bad:
        raise ExportError(f"preferred batch sizes {bad} exceed --max-batch-size")
    cfg = mc.ModelConfig(name=name, max_batch_size=serving.max_batch_size)
    if flavor == "onnxruntime":
        cfg.platform = "onnxruntime_onnx"
        kind = _KINDS[serving.instance_kind]
    else:
        cfg.backend = "python"
        kind = mc.ModelInstanceGroup.KIND_CPU  # the python backend runs ORT on the CPU
        cfg.parameters["onnx_file"].string_value = MODEL_FILENAME
    datatype = mc.DataType.Value("TYPE_" + contract.datatype)  # TYPE_FP32, TYPE_UINT8
    cfg.input.add(name=contract.input_name, data_type=datatype, dims=contract.input_shape)
    cfg.output.add(
        name=contract.output_name,
        data_type=mc.TYPE_FP32,
        dims=[contract.num_classes],
        label_filename=contract.labels_file,
    )
    cfg.dynamic_batching.preferred_batch_size.extend(serving.preferred())
    cfg.dynamic_batching.max_queue_delay_microseconds = serving.max_queue_delay_us
    cfg.instance_group.add(kind=kind, count=serving.instance_count)
    # Only the newest version is served; older ones stay on disk for rollback.
    cfg.version_policy.latest.num_versions = 1
    # Triton warms each model instance with every batch size the gateway may send (any,
    # up to max_batch_size): the first batch of a size it has not run is slow (cuDNN and
    # TensorRT pick kernels per shape; server#7776, #3473).
    for n in range(1, serving.max_batch_size + 1):
        warm = cfg.model_warmup.add(name=f"zeros_batch{n}", batch_size=n)
        warm.inputs[contract.input_name].data_type = datatype
        warm.inputs[contract.input_name].dims.extend(contract.input_shape)
        warm.inputs[contract.input_name].zero_data = True
    return cfg


def render_config(cfg: mc.ModelConfig) -> str:
    header = (
        "# Generated by resnet-export. The model's input contract is preprocess.json;\n"
        "# edit scheduling knobs here, but re-export to change tensors or classes.\n"
    )
    return header + text_format.MessageToString(cfg)


def ensure_writable(repository: Path, what: str = "repository") -> None:
    """Fail early (before any work, creating nothing) if the repository (or the directory
    ``what`` names) cannot be written."""
    probe_dir = repository
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(probe_dir))
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".resnet-export-probe-"):
            pass
    except OSError as exc:
        raise ExportError(f"{what} {repository} is not writable ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def _locked(repository: Path) -> Iterator[None]:
    with (repository / LOCK_FILENAME).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _link_tree(src: Path, dst: Path) -> None:
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)


def tensorrt_config(cfg: mc.ModelConfig) -> mc.ModelConfig:
    """The TensorRT variant of an ONNX model's config: same tensors, batching and warm-up,
    the plan file, GPU instances. Written as ``configs/tensorrt.pbtxt`` (Triton's custom
    model configurations: ``tritonserver --model-config-name=tensorrt`` selects it, and a
    server started without that flag serves the ONNX graph from config.pbtxt), so that
    serving the engine is a deployment-time choice made where the GPU is known."""
    from export.tensorrt import PLAN_FILENAME

    trt = mc.ModelConfig()
    trt.CopyFrom(cfg)
    trt.ClearField("backend")
    trt.ClearField("parameters")
    trt.platform = "tensorrt_plan"
    trt.default_model_filename = PLAN_FILENAME
    for group in trt.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_GPU
    return trt


@dataclass(frozen=True)
class Engine:
    """A TensorRT plan built for one GPU model and TensorRT version, and its manifest."""

    plan: Path
    manifest: str


@dataclass(frozen=True)
class Probe:
    """A few preprocessed inputs and the published graph's logits for them, computed with
    ONNX Runtime at export (``probe.npz``): what the gateway checks its backend against
    before a version takes traffic."""

    inputs: np.ndarray
    outputs: np.ndarray


#: Inputs in a probe, at most: enough to catch a backend that computes something else,
#: small enough to run at every load (a ResNet-50 probe is 2.4 MB).
PROBE_SIZE = 4


@dataclass
class Publication:
    name: str
    contract: PreprocessContract
    labels: list[str]
    onnx_file: Path
    flavor: Flavor
    serving: ServingConfig
    report: dict[str, Any]
    engine: Engine | None = None
    probe: Probe | None = None


def publish(repository: Path, pub: Publication) -> int:
    """Add ``pub`` as the next version of ``repository/pub.name``; return that version."""
    check_name(pub.name)
    if len(pub.labels) != pub.contract.num_classes:
        raise ExportError(f"{len(pub.labels)} labels for {pub.contract.num_classes} classes")
    config = build_config(pub.name, pub.contract, pub.flavor, pub.serving)
    config_text = render_config(config)
    ensure_writable(repository)
    try:
        repository.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(
            f"repository {repository} is not writable ({exc.strerror or exc})"
        ) from exc
    with _locked(repository):
        final = repository / pub.name
        if final.exists() and not final.is_dir():
            raise ExportError(f"{final} exists and is not a model directory")
        check_same_input(final, pub.contract)
        version = (latest_version(final) or 0) + 1
        staging = Path(tempfile.mkdtemp(dir=repository, prefix=f".{pub.name}.staging-"))
        # mkdtemp makes it 0700: the gateway and Triton run as other users (uid 10001 in
        # the image) and must read the model directory it becomes.
        staging.chmod(0o755)
        try:
            for v in numbered_versions(final):
                _link_tree(final / str(v), staging / str(v))
            vdir = staging / str(version)
            vdir.mkdir()
            shutil.copyfile(pub.onnx_file, vdir / MODEL_FILENAME)
            if pub.flavor == "python-ort":
                # config.pbtxt is per model: every version must be servable by the python
                # backend, older ones (kept for rollback) too.
                template = resources.files("export.templates").joinpath("python_ort_model.py")
                code = template.read_text(encoding="utf-8")
                for v in numbered_versions(staging):
                    target = staging / str(v) / PYTHON_MODEL_FILENAME
                    target.unlink(missing_ok=True)  # a hard link into the live tree: replace
                    target.write_text(code)
            report = {**pub.report, "version": version, "flavor": pub.flavor}
            (vdir / REPORT_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
            (vdir / CONTRACT_FILENAME).write_text(pub.contract.to_json())
            if pub.probe is not None:
                np.savez(
                    vdir / PROBE_FILENAME,
                    inputs=np.ascontiguousarray(pub.probe.inputs, dtype=pub.contract.dtype),
                    outputs=np.ascontiguousarray(pub.probe.outputs, dtype=np.float32),
                )
            (staging / CONFIG_FILENAME).write_text(config_text)
            if (final / ROLLOUT_FILENAME).is_file():
                # The operator's traffic split outlives a new version (which it does not name).
                shutil.copy2(final / ROLLOUT_FILENAME, staging / ROLLOUT_FILENAME)
            if pub.engine is not None:
                # Only the newest version is served, so the TensorRT config exists only
                # while the newest version has an engine (a later ONNX-only version drops it).
                from export.tensorrt import MANIFEST_FILENAME, PLAN_FILENAME, TRT_CONFIG_NAME

                shutil.copyfile(pub.engine.plan, vdir / PLAN_FILENAME)
                (vdir / MANIFEST_FILENAME).write_text(pub.engine.manifest)
                (staging / "configs").mkdir()
                (staging / "configs" / f"{TRT_CONFIG_NAME}.pbtxt").write_text(
                    render_config(tensorrt_config(config))
                )
            (staging / LABELS_FILENAME).write_text("\n".join(pub.labels) + "\n", encoding="utf-8")
            problems = validate_model(staging, expected_name=pub.name)
            if problems:
                raise ExportError("refusing to publish: " + "; ".join(problems))
            _swap(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return version


def check_same_input(model_dir: Path, contract: PreprocessContract) -> None:
    """A new version takes the input its model's other versions take: config.pbtxt, Triton's
    and the gateway's, holds one input per model (a uint8-pixel graph beside float-plane
    ones needs a model of its own)."""
    new = contract_tensors(contract)[0][0]
    for v in numbered_versions(model_dir):
        try:
            old = contract_tensors(PreprocessContract.load(model_dir / str(v) / CONTRACT_FILENAME))
        except ContractError:
            continue  # a broken version: the layout check names it
        if old[0][0] != new:
            raise ExportError(
                f"model {model_dir.name!r} takes {old[0][0]} (version {v}); this version would "
                f"take {new}, and config.pbtxt holds one input per model: publish it under "
                "another --name (or with the other --input)"
            )


def republish(
    model_dir: Path, repository: Path, flavor: Flavor, serving: ServingConfig | None = None
) -> int:
    """Publish the newest version of ``model_dir`` (its verified graph, contract, labels,
    report and probe, untouched) into ``repository`` with another flavor; return the new
    version."""
    spec = load_spec(model_dir)
    cfg = spec.config
    report = json.loads((spec.model_path.parent / REPORT_FILENAME).read_text())
    serving = serving or ServingConfig(
        max_batch_size=cfg.max_batch_size, instance_kind="cpu" if flavor == "python-ort" else "auto"
    )
    probe = load_probe(spec)  # same graph, so the same outputs; None for an older export
    pub = Publication(
        spec.name,
        spec.contract,
        list(spec.labels),
        spec.model_path,
        flavor,
        serving,
        report,
        probe=Probe(*probe) if probe is not None else None,
    )
    return publish(repository, pub)


def find_model(repository: Path, name: str) -> Path:
    """``repository/name``, or ExportError saying what is there instead."""
    check_name(name)
    if not repository.is_dir():
        raise ExportError(f"model repository {repository} is not a directory")
    model_dir = repository / name
    if not model_dir.is_dir():
        held = ", ".join(m.name for m in model_dirs(repository)) or "none"
        raise ExportError(f"no model {name!r} in {repository} (models: {held})")
    return model_dir


def set_rollout(repository: Path, name: str, rollout: Rollout) -> tuple[list[int], Rollout]:
    """Write ``rollout`` as ``repository/name``'s rollout.json (an empty one removes it),
    once every version it names is on disk; return :func:`served_versions` after it.

    Under the publishing lock: a publish in flight swaps the model directory, and a file
    written into the one it retires would be lost."""
    find_model(repository, name)  # before the lock file is created in a wrong directory
    with _locked(repository):
        model_dir = find_model(repository, name)  # again: it may have gone while we waited
        available = numbered_versions(model_dir)
        # Every version named, a weight of 0 included: a typo must not pass as "no traffic".
        named = {int(v) for v in rollout.weights}
        if rollout.shadow is not None:
            named.add(int(rollout.shadow))
        missing = sorted(named - set(available))
        if missing:
            raise ExportError(
                f"model {name!r} has no version {', '.join(map(str, missing))} "
                f"(versions: {', '.join(map(str, available)) or 'none'})"
            )
        try:
            # A model whose config the gateway cannot serve from gets no rollout written.
            policy_versions(read_config(model_dir), available)
        except RepositoryError as exc:
            raise ExportError(f"model {name!r}: {exc}") from exc
        write_rollout(model_dir, rollout)
        return served_versions(model_dir)


def _swap(staging: Path, final: Path) -> None:
    """Replace ``final`` with ``staging`` using renames; on failure ``final`` is restored."""
    if not final.exists():
        staging.rename(final)
        return
    retired = final.with_name(f".{final.name}.retired-{os.getpid()}")
    final.rename(retired)
    try:
        staging.rename(final)
    except BaseException:
        retired.rename(final)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def validate_model(model_dir: Path, expected_name: str | None = None) -> list[str]:
    """Every problem with one model directory, as ``"NAME: reason"`` strings: the layout
    checks (``service.model.repository.layout_problems``), then each version's ONNX graph
    against its contract."""
    import onnx

    from export.onnx_export import graph_problems

    name = expected_name or model_dir.name
    problems = layout_problems(model_dir, name)
    for version in numbered_versions(model_dir):
        vdir = model_dir / str(version)
        onnx_path = vdir / MODEL_FILENAME
        if not onnx_path.is_file():
            continue  # reported by the layout check
        try:
            contract = PreprocessContract.load(vdir / CONTRACT_FILENAME)
        except ContractError:
            continue  # reported by the layout check
        try:
            graph = onnx.load(str(onnx_path), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError and others for bad files
            problems.append(
                f"{name}: version {version}: {MODEL_FILENAME} is not a readable ONNX file "
                f"({brief(exc)})"
            )
            continue
        problems += [f"{name}: version {version}: {p}" for p in graph_problems(graph, contract)]
    return problems + [f"{name}: {p}" for p in _engine_problems(model_dir)]


def _engine_problems(model_dir: Path) -> list[str]:
    """configs/tensorrt.pbtxt promises a plan in the newest version (the one Triton serves),
    with the manifest that says which GPU and TensorRT it was built for."""
    from export.tensorrt import MANIFEST_FILENAME, PLAN_FILENAME, TRT_CONFIG_NAME, EngineManifest

    config = model_dir / "configs" / f"{TRT_CONFIG_NAME}.pbtxt"
    newest = latest_version(model_dir)
    if not config.is_file() or newest is None:
        return []
    vdir = model_dir / str(newest)
    if not (vdir / PLAN_FILENAME).is_file():
        return [
            f"{config.relative_to(model_dir)} serves {PLAN_FILENAME}, missing in version {newest}"
        ]
    try:
        EngineManifest.load(vdir / MANIFEST_FILENAME)
    except ExportError as exc:
        return [f"version {newest}: {exc}"]
    return []


def validate_repository(repository: Path) -> tuple[list[str], list[str]]:
    """(models found, problems) for a whole repository."""
    if not repository.is_dir():
        return [], [f"{repository}: not a directory"]
    models = model_dirs(repository)
    if not models:
        return [], [f"{repository}: holds no model"]
    problems: list[str] = []
    for model_dir in models:
        problems.extend(validate_model(model_dir))
    return [m.name for m in models], problems
