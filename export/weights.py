"""Loading weights: torchvision-layout checkpoints from files or torchvision's weight names.

A checkpoint never runs code: ``.pth``/``.pt`` files are read with
``torch.load(weights_only=True)``, ``.safetensors`` with safetensors. The one non-tensor
type let through is ``argparse.Namespace``, which torchvision's reference training script
(references/classification/train.py) saves as ``args`` beside ``model``, ``model_ema``,
``optimizer``, ``lr_scheduler`` and ``epoch``; it holds only the command line's values, and
is allowed by name (``torch.serialization.safe_globals``), never by turning
``weights_only`` off. A bare state_dict or a dict holding one under ``state_dict``,
``model`` or ``model_ema`` is accepted (``WeightsKey``); a ``module.`` prefix
(DataParallel / DDP / ``AveragedModel``) is stripped and EMA bookkeeping
(``n_averaged``) dropped.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from export.errors import ExportError
from export.trt_node import sha256_file  # stdlib-only there: that script runs on its own
from service.errors import brief

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_URL = "https://download.pytorch.org/models/"
#: Which weight set of a checkpoint to load (``--weights-key``). ``auto``: a training
#: checkpoint's ``model`` entry (the weights torchvision's reference script evaluates with
#: ``--resume --test-only`` unless it is also given ``--model-ema``), else its
#: ``state_dict`` entry (Lightning and most other trainers), else the file itself.
WeightsKey = Literal["auto", "model", "model_ema", "state_dict"]
#: Non-tensor entries of a weight set that are bookkeeping, not weights
#: (torch.optim.swa_utils.AveragedModel counts its updates in ``n_averaged``).
_BOOKKEEPING = frozenset({"n_averaged"})
#: The only Python types a checkpoint may hold besides tensors and plain containers.
_SAFE_GLOBALS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [argparse.Namespace]
#: Overrides TORCHVISION_URL (a mirror, or a local server in tests).
URL_ENV = "RESNET_EXPORT_WEIGHTS_URL"
DOWNLOAD_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class WeightSet:
    """A published torchvision weight set and the eval transform it was measured with."""

    filename: str
    resize: int
    crop: int = 224


# torchvision's published ImageNet-1k weights (torchvision.models.*_Weights).
TORCHVISION_WEIGHTS: dict[str, dict[str, WeightSet]] = {
    "resnet18": {"IMAGENET1K_V1": WeightSet("resnet18-f37072fd.pth", 256)},
    "resnet34": {"IMAGENET1K_V1": WeightSet("resnet34-b627a593.pth", 256)},
    "resnet50": {
        "IMAGENET1K_V1": WeightSet("resnet50-0676ba61.pth", 256),
        "IMAGENET1K_V2": WeightSet("resnet50-11ad3fa6.pth", 232),
    },
    "resnet101": {
        "IMAGENET1K_V1": WeightSet("resnet101-63fe2227.pth", 256),
        "IMAGENET1K_V2": WeightSet("resnet101-cd907fc2.pth", 232),
    },
    "resnet152": {
        "IMAGENET1K_V1": WeightSet("resnet152-394f9c45.pth", 256),
        "IMAGENET1K_V2": WeightSet("resnet152-f82ba261.pth", 232),
    },
    "resnext50_32x4d": {
        "IMAGENET1K_V1": WeightSet("resnext50_32x4d-7cdf4587.pth", 256),
        "IMAGENET1K_V2": WeightSet("resnext50_32x4d-1a0047aa.pth", 232),
    },
    "resnext101_32x8d": {
        "IMAGENET1K_V1": WeightSet("resnext101_32x8d-8ba56ff5.pth", 256),
        "IMAGENET1K_V2": WeightSet("resnext101_32x8d-110c445d.pth", 232),
    },
    "wide_resnet50_2": {
        "IMAGENET1K_V1": WeightSet("wide_resnet50_2-95faca4d.pth", 256),
        "IMAGENET1K_V2": WeightSet("wide_resnet50_2-9ba9bcbe.pth", 232),
    },
    "wide_resnet101_2": {
        "IMAGENET1K_V1": WeightSet("wide_resnet101_2-32ee1156.pth", 256),
        "IMAGENET1K_V2": WeightSet("wide_resnet101_2-d733dc28.pth", 232),
    },
}


@dataclass(frozen=True)
class LoadedWeights:
    state_dict: dict[str, torch.Tensor]
    sha256: str
    source: str
    weight_set: WeightSet | None = None


def resolve_torchvision(arch: str, name: str) -> WeightSet:
    sets = TORCHVISION_WEIGHTS.get(arch, {})
    if name == "DEFAULT" and sets:
        name = sorted(sets)[-1]
    if name not in sets:
        known = ", ".join(sorted(sets)) or "none"
        raise ExportError(f"torchvision has no weights {name!r} for {arch}; known: {known}")
    return sets[name]


def _cache_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def download_torchvision(arch: str, name: str) -> tuple[Path, WeightSet]:
    """Fetch (or reuse from torch's hub cache) a torchvision weight file, hash-checked."""
    ws = resolve_torchvision(arch, name)
    cached = _cache_dir() / ws.filename
    if cached.is_file():
        return cached, ws
    base = os.environ.get(URL_ENV, TORCHVISION_URL)
    url = base.rstrip("/") + "/" + ws.filename
    cached.parent.mkdir(parents=True, exist_ok=True)
    expected = ws.filename.rsplit("-", 1)[1].split(".", 1)[0]
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
            fd, tmp_name = tempfile.mkstemp(dir=cached.parent, prefix=".download-")
            tmp = Path(tmp_name)
            try:
                digest = hashlib.sha256()
                with os.fdopen(fd, "wb") as out:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
                if not digest.hexdigest().startswith(expected):
                    raise ExportError(
                        f"downloaded {url} does not match its published hash prefix {expected}"
                    )
                tmp.replace(cached)
            finally:
                tmp.unlink(missing_ok=True)
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ExportError(
            f"cannot download torchvision weights {arch}:{name} from {url} ({reason}); "
            f"without a network, pass a local checkpoint file with --weights PATH"
        ) from exc
    return cached, ws


def read_checkpoint(path: Path, key: WeightsKey = "auto") -> dict[str, torch.Tensor]:
    """Read the state_dict ``key`` picks from ``path`` without executing anything in it."""
    if not path.is_file():
        raise ExportError(f"checkpoint {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExportError(
                f"checkpoint {path} is not a readable safetensors file ({exc})"
            ) from exc
    else:
        try:
            with torch.serialization.safe_globals(_SAFE_GLOBALS):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "Weights only load failed" in str(exc):
                # torch names the refused type: "Unsupported global: GLOBAL pkg.Type ..."
                found = re.search(r"GLOBAL ([\w.]+)", str(exc))
                what = f"a {found.group(1)} object" if found else "Python objects"
                raise ExportError(
                    f"checkpoint {path} holds {what}, which is not a tensor, a plain value "
                    f"or argparse.Namespace; refusing to unpickle it, since unpickling can "
                    f"run code (save the model's state_dict instead)"
                ) from exc
            raise ExportError(
                f"checkpoint {path} is corrupt or truncated ({brief(exc, 160)})"
            ) from exc
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
            raise ExportError(
                f"checkpoint {path} is corrupt or truncated ({brief(exc, 160)})"
            ) from exc
    return _unwrap(raw, path, key)


def _unwrap(raw: object, path: Path, key: WeightsKey = "auto") -> dict[str, torch.Tensor]:
    if not isinstance(raw, dict) or not raw:
        raise ExportError(f"checkpoint {path} does not hold a state_dict")
    entries: dict[Any, Any]
    if key == "auto":
        picked = (raw[k] for k in ("model", "state_dict") if isinstance(raw.get(k), dict))
        entries = next(picked, raw)
    elif isinstance(raw.get(key), dict):
        entries = raw[key]
    elif key == "state_dict" and all(isinstance(v, torch.Tensor) for v in raw.values()):
        entries = raw  # the file is a bare state_dict: what was asked for
    else:
        held = ", ".join(repr(k) for k in list(raw)[:8])
        raise ExportError(
            f"checkpoint {path} has no {key!r} weight set (--weights-key); its entries: {held}"
        )
    state: dict[str, torch.Tensor] = {}
    for entry, value in entries.items():
        name = entry.removeprefix("module.") if isinstance(entry, str) else entry
        if name in _BOOKKEEPING:
            continue
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ExportError(
                f"checkpoint {path} does not hold a state_dict (entry {name!r} is not a tensor)"
            )
        state[name] = value
    if not state:
        raise ExportError(f"checkpoint {path} does not hold a state_dict")
    return state


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, naming every key that does not fit."""
    expected = model.state_dict()
    fc_w = state.get("fc.weight")
    n_expected = expected["fc.weight"].shape[0]
    if fc_w is not None and fc_w.ndim == 2 and fc_w.shape[0] != n_expected:
        raise ExportError(
            f"{source} has {fc_w.shape[0]} classes (fc.weight {tuple(fc_w.shape)}), "
            f"but the model was built with {n_expected}; pass --num-classes "
            f"{fc_w.shape[0]}"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_some(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatches: {_some(mismatched)}")
    if problems:
        raise ExportError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _some(items: list[str], limit: int = 6) -> str:
    head = ", ".join(items[:limit])
    return head + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def load_weights(model: nn.Module, arch: str, spec: str, key: WeightsKey = "auto") -> LoadedWeights:
    """Load ``spec`` (a file path or ``torchvision:NAME``) into ``model``."""
    weight_set = None
    if spec.startswith("torchvision:"):
        path, weight_set = download_torchvision(arch, spec.split(":", 1)[1])
    else:
        path = Path(spec)
    state = read_checkpoint(path, key)
    apply_state_dict(model, state, f"checkpoint {path}")
    return LoadedWeights(state, sha256_file(path), str(spec), weight_set)
