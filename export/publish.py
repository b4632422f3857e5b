"""Publishing what an export proved: the version's contract stamped with its precision, its
parity probe, its ``export_report.json`` (what was checked, on what, with which tools), all
written as the next version through :func:`export.repository.publish`, atomically."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import torch

from export.gate import openvino_version, run_onnx
from export.images import Images, spread
from export.onnx_export import ParityReport, random_inputs
from export.precision import Reduced
from export.repository import PROBE_SIZE, Flavor, Probe, Publication, ServingConfig, publish
from service.host.cpus import cpu_isa
from service.model.contract import PreprocessContract


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: int
    model_dir: Path
    report: dict[str, Any]


def publish_export(
    *,
    repository: Path,
    name: str,
    contract: PreprocessContract,
    labels: list[str],
    flavor: Flavor,
    serving: ServingConfig,
    reduced: Reduced,
    validation: Images | None,
    source: str,
    opset: int,
    parity: ParityReport,
    extra_report: dict[str, Any] | None,
    log: Callable[[str], None],
) -> ExportResult:
    """Publish ``reduced`` as the next version of ``name``, its probe taken from
    ``validation`` (the images it was checked on), its report saying where it came from
    (``source``, ``opset``) and what it passed (``parity``, the reduction's gates)."""
    exact = reduced.precision == "int8"
    probe, probe_source = _probe(reduced.onnx, contract, validation, exact)
    openvino = openvino_version()
    contract = contract.model_copy(
        update={"precision": reduced.precision, "int8_scheme": reduced.int8_scheme}
    )
    report: dict[str, Any] = {
        "name": name,
        "arch": contract.arch,
        "source": source,
        "source_sha256": contract.source_sha256,
        "opset": opset,
        "precision": contract.precision,
        **({"int8_scheme": contract.int8_scheme} if contract.int8_scheme else {}),
        "cpu_isa": cpu_isa(),
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "onnx_checker": "pass",
        "parity": parity.as_dict(),
        **reduced.report,
        "probe": {
            "inputs": len(probe.inputs),
            "source": probe_source,
            "outputs": _PROBE_OUTPUTS.get(reduced.precision, "onnxruntime"),
        },
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            **({"openvino": openvino} if openvino else {}),
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


#: What the probe's outputs are, by precision where they are not the graph's ONNX Runtime
#: logits as this CPU computes them: the exact result every node's kernels are held to.
_PROBE_OUTPUTS = {"int8": "INT8 exact reference", "bf16": "FP32 (onnxruntime)"}


def _probe(
    published: Path, contract: PreprocessContract, images: Images | None, exact: bool
) -> tuple[Probe, str]:
    """The parity probe published with the version: up to PROBE_SIZE of the real images the
    published graph was checked on (the accuracy gate's, else the parity check's), and that
    graph's ONNX Runtime logits for them; for INT8 the exact reference's (``run_onnx``), not
    this CPU's kernels', so that a version loads wherever its kernels compute the exact
    result. For BF16 they are the FP32 logits: what a node without BF16 serves exactly, and
    what the gate held OpenVINO's BF16 to within the probe's tolerance on every image the
    probe's are picked from. With no real image at all, the parity check's random inputs
    (same seed): a probe checks the arithmetic, which random inputs exercise."""
    if images is not None and len(images):
        picked = spread(list(images.tensors), PROBE_SIZE)
        inputs, source = np.stack(picked).astype(contract.dtype), images.source
    else:
        inputs, source = (
            random_inputs(np.random.default_rng(0), PROBE_SIZE, contract),
            "random inputs",
        )
    return Probe(inputs, run_onnx(published, contract, inputs, exact=exact)), source
