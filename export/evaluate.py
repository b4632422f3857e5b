"""``resnet-export evaluate``: accuracy of a published model on a labelled image folder.

The folder is in ImageFolder layout (``DIR/<label>/<image>``); a folder's name is matched
with the model's class names (labels.txt). In-process, images go through the gateway's
own preprocessing (``service.dataplane.preprocess``) and ONNX Runtime; with ``--url`` the same
images are sent to a running gateway over HTTP, so the deployed path is measured by the
same command and the two reports can be compared figure for figure.

``--compare`` scores the model against a reference (another version of it, or an ONNX
file such as the FP32 export), always computed in-process from the repository.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.errors import ExportError
from export.gate import compare, run_onnx
from export.images import load_images, progress
from service.host.files import image_files
from service.model.repository import ModelSpec, load_spec

#: Images per HTTP request to a gateway (well under its default per-request limit).
HTTP_BATCH = 16
HTTP_TIMEOUT_S = 60.0


def labelled_images(root: Path) -> tuple[list[Path], list[str]]:
    """Files of an ImageFolder tree and each one's label (its top-level folder's name)."""
    files = [p for p in image_files(root, "--images") if p.parent != root]
    if not files:
        raise ExportError(f"--images {root}: no images in sub-folders (expected DIR/<label>/*)")
    return files, [p.relative_to(root).parts[0] for p in files]


def parse_model(text: str) -> tuple[str, int | None]:
    name, _, version = text.partition(":")
    if version and not version.isdigit():
        raise ExportError(f"--model takes NAME or NAME:VERSION, got {text!r}")
    return name, int(version) if version else None


def _topk(logits: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-logits, axis=1, kind="stable")[:, :k]


def gateway_predictions(
    url: str, name: str, files: list[Path], top_k: int, api_key: str | None
) -> tuple[list[list[str]], str]:
    """Top-k labels per file from a gateway's REST API, and the version that answered."""
    endpoint = f"{url.rstrip('/')}/v1/models/{name}/classify"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    labels: list[list[str]] = []
    version = "?"
    batches = [files[i : i + HTTP_BATCH] for i in range(0, len(files), HTTP_BATCH)]
    for batch in progress(batches, f"evaluating {name} at {url} (requests)"):
        body = json.dumps(
            {
                "images": [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in batch],
                "top_k": top_k,
            }
        ).encode()
        answer = _post(endpoint, body, headers)
        version = str(answer.get("version", version))
        labels += [[p["label"] for p in row] for row in answer["predictions"]]
    return labels, version


def _post(url: str, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode("utf-8", "replace")
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = json.loads(detail)["error"]["message"]
        raise ExportError(f"{url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ExportError(f"cannot reach {url} ({getattr(exc, 'reason', exc)})") from None


def score(
    truth: list[str], predicted: list[list[str]], files: list[Path], root: Path
) -> dict[str, Any]:
    """Top-1/top-5 accuracy and per-class errors (what each class is mistaken for)."""
    per_class: dict[str, dict[str, Any]] = {}
    confusions: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    top1 = top5 = 0
    wrong: list[dict[str, str]] = []
    for label, preds, path in zip(truth, predicted, files, strict=True):
        entry = per_class.setdefault(label, {"images": 0, "top1_errors": 0})
        entry["images"] += 1
        top5 += label in preds[:5]
        if preds[0] == label:
            top1 += 1
        else:
            entry["top1_errors"] += 1
            confusions[label][preds[0]] += 1
            wrong.append({"image": str(path.relative_to(root)), "label": label, "got": preds[0]})
    for label, entry in per_class.items():
        entry["top1_accuracy_pct"] = round(100 * (1 - entry["top1_errors"] / entry["images"]), 3)
        entry["mistaken_for"] = dict(confusions[label].most_common(3))
    n = len(truth)
    return {
        "images": n,
        "top1_accuracy_pct": round(100 * top1 / n, 3),
        "top5_accuracy_pct": round(100 * top5 / n, 3),
        "per_class": dict(sorted(per_class.items())),
        "misclassified": wrong[:100],
    }


def evaluate(
    images: Path,
    model: str,
    *,
    repository: Path | None,
    url: str | None,
    compare_with: str | None,
    top_k: int = 5,
    api_key: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The evaluation report (see the module's docstring)."""
    name, version = parse_model(model)
    if repository is None and (url is None or compare_with is not None):
        raise ExportError("--repository DIR is needed (it holds the model, or --compare's)")
    files, truth = labelled_images(images)
    report: dict[str, Any] = {"images_dir": str(images)}
    if repository is None:  # --url alone: the gateway reads the files as they are
        predicted, served = gateway_predictions(url or "", name, files, top_k, api_key)
        return {**report, "model": f"{name}:{served}", "url": url,
                **score(truth, predicted, files, images)}  # fmt: skip
    # The repository's model (its contract and labels) decides how images are read.
    spec = load_spec(repository / name, version)
    reference = _reference(repository, spec, compare_with) if compare_with else None
    unknown = sorted(set(truth) - set(spec.labels))
    if unknown:
        raise ExportError(
            f"--images {images}: folders not among {name}'s labels: {', '.join(unknown[:8])}"
        )
    loaded = load_images(files, spec.contract, "--images", log)
    keep = set(loaded.paths)
    truth = [t for t, f in zip(truth, files, strict=True) if f in keep]
    files = loaded.paths
    logits = None
    if url is not None:
        predicted, served = gateway_predictions(url, name, files, top_k, api_key)
        report.update(model=f"{name}:{served}", url=url)
    else:
        logits = run_onnx(spec.model_path, spec.contract, loaded.tensors)
        predicted = [[spec.labels[i] for i in row] for row in _topk(logits, top_k)]
        report["model"] = f"{name}:{spec.version}"
    report.update(score(truth, predicted, files, images))
    report["skipped"] = [{"image": str(p), "reason": r} for p, r in loaded.skipped]
    if reference is not None:
        report["agreement"] = _agreement(reference, loaded.tensors, predicted, logits)
    return report


@dataclass(frozen=True)
class Reference:
    """What ``--compare`` names: an ONNX graph read by a contract, with its class names."""

    name: str
    onnx: Path
    spec: ModelSpec


def _reference(repository: Path, spec: ModelSpec, text: str) -> Reference:
    """``--compare VERSION|FILE.onnx``, resolved before any image is read."""
    if text.isdigit():
        other = load_spec(repository / spec.name, int(text))
        return Reference(f"{spec.name}:{other.version}", other.model_path, other)
    if Path(text).is_file():
        return Reference(text, Path(text), spec)
    raise ExportError(f"--compare takes a version of {spec.name} or an ONNX file, got {text!r}")


def _agreement(
    reference: Reference,
    tensors: np.ndarray,
    predicted: list[list[str]],
    logits: np.ndarray | None,
) -> dict[str, Any]:
    """Top-1 agreement of the evaluated model's answers with the reference's (and the logit
    difference where the answers were computed in-process)."""
    ref_logits = run_onnx(reference.onnx, reference.spec.contract, tensors)
    ref_top1 = [reference.spec.labels[i] for i in ref_logits.argmax(1)]
    agree = float(np.mean([p[0] == r for p, r in zip(predicted, ref_top1, strict=True)]))
    result: dict[str, Any] = {
        "reference": reference.name,
        "top1_agreement_pct": round(100 * agree, 3),
    }
    if logits is not None:
        gate = compare(ref_logits, logits, names=("model", reference.name), images_source="images")
        result["max_abs_logit_diff"] = gate.max_abs_logit_diff
        result["mean_abs_logit_diff"] = gate.mean_abs_logit_diff
    return result
