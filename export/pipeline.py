"""One path from a PyTorch model to a published, verified model version.

``resnet-export export`` and ``resnet-export demo`` both end here, so the demo model goes
through exactly the checks a production export does. The stages are their own modules:
what will be built (:mod:`export.plan`), the ONNX export and its proof against PyTorch
(:mod:`export.onnx_export`), reduced precision behind the accuracy gate
(:mod:`export.precision`), and publishing (:mod:`export.publish`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.errors import ExportError
from export.images import Images
from export.onnx_export import (
    check_onnx,
    export_onnx,
    for_contract,
    parity_check,
    preprocess_real,
)
from export.plan import (
    ExportRequest,
    PrecisionPlan,
    check_precision,
    check_request,
    class_names,
    contract_for,
    precision_plan,
    sample_images,
)
from export.precision import reduce_precision
from export.publish import ExportResult, publish_export
from export.repository import (
    Flavor,
    ServingConfig,
    check_name,
    check_same_input,
    ensure_writable,
)
from service.model.contract import PreprocessContract

#: What a training script imports (docs/export.md): the entry point, its request and result.
__all__ = ["ExportRequest", "ExportResult", "export", "export_and_publish"]

#: The seed of ``--weights random`` (and of the init a checkpoint's weights then replace).
RANDOM_WEIGHTS_SEED = 0


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
    from export.onnx_export import real_images
    from export.weights import load_weights

    r = request
    check_request(r)
    if isinstance(r.weights, nn.Module):
        model = r.weights
    else:
        # Drawn from a fixed seed (the caller's generator untouched): `--weights random`
        # publishes the same file from run to run, so benchmarks compare like with like and
        # INT8's kernel check on near-tied untrained logits gives one verdict, not a coin flip.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = build_model(r.arch, num_classes=r.num_classes, in_chans=r.in_chans)
    labels = class_names(r)
    ensure_writable(r.repository)
    contract = contract_for(r)
    if isinstance(r.weights, nn.Module):
        log("weights: the model given (in memory)")
    elif r.source == "random":
        log("weights: random (untrained; for benchmarks only)")
    else:
        loaded = load_weights(model, r.arch, r.source, r.weights_key)
        contract = contract.model_copy(update={"source_sha256": loaded.sha256})
        log(f"weights: {r.source} (sha256 {loaded.sha256[:12]}...)")
    return export_and_publish(
        model=model,
        contract=contract,
        labels=labels,
        name=r.name,
        repository=r.repository,
        flavor=r.flavor,
        serving=r.serving,
        opset=r.opset,
        real_images=real_images(),
        source=r.source,
        sample=sample_images(r, contract, warn),
        plan=precision_plan(r, contract, warn),
        log=log,
    )


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
    check_precision(plan.precision, plan.tensorrt)
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
        reduced = reduce_precision(
            onnx_path, contract, plan, validation, serving.max_batch_size, log
        )
        return publish_export(
            repository=repository,
            name=name,
            contract=contract,
            labels=labels,
            flavor=flavor,
            serving=serving,
            reduced=reduced,
            validation=validation,
            source=source,
            opset=opset,
            parity=parity,
            extra_report=extra_report,
            log=log,
        )
