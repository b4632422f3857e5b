"""Folders of the user's own images, read the way the gateway reads a request.

Calibration (``--calibration-dir``), the parity and agreement checks (``--sample-images``)
and ``evaluate`` (``--images``, ImageFolder layout ``DIR/<label>/*``) all start here, so an
image the gateway would refuse is skipped with the gateway's reason, and an image that is
used becomes exactly the tensor the gateway would make of it (``service.dataplane.preprocess``).
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from export.errors import ExportError
from service.dataplane.preprocess import preprocess
from service.errors import ServiceError
from service.model.contract import PreprocessContract

T = TypeVar("T")
#: Share of a folder held apart from calibration to judge the quantized model by, when no
#: separate --sample-images folder is given (images calibrated on would flatter it).
HOLDOUT_FRACTION = 0.2


def held_out(path: Path, root: Path) -> bool:
    """Whether ``path`` belongs to the validation share of ``root``: decided by a hash of
    its relative path, so adding images never moves an old one across the split."""
    digest = hashlib.sha256(str(path.relative_to(root)).encode()).digest()
    return int.from_bytes(digest[:4], "big") < HOLDOUT_FRACTION * 2**32


def split_holdout(files: list[Path], root: Path) -> tuple[list[Path], list[Path]]:
    """(calibration, validation) shares of one folder; each gets at least one file where
    the folder has two."""
    rest = [p for p in files if not held_out(p, root)]
    held = [p for p in files if held_out(p, root)]
    if len(files) >= 2 and not held:
        held, rest = rest[-1:], rest[:-1]
    elif len(files) >= 2 and not rest:
        rest, held = held[:1], held[1:]
    return rest, held


def spread(files: list[T], count: int) -> list[T]:
    """``count`` of ``files`` evenly spaced through the sorted list: a folder in ImageFolder
    layout is sorted by class, so its first ``count`` files would be one or two classes."""
    if count >= len(files):
        return files
    return [files[i * len(files) // count] for i in range(count)]


@dataclass(frozen=True)
class Loaded:
    """Images that became tensors, and the files skipped (path, the gateway's reason)."""

    paths: list[Path]
    tensors: np.ndarray
    skipped: list[tuple[Path, str]]


@dataclass(frozen=True)
class Images:
    """Preprocessed images and where they came from (for the report)."""

    tensors: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.tensors)


def load_images(
    files: list[Path],
    contract: PreprocessContract,
    option: str,
    log: Callable[[str], None] = print,
    label: str = "reading images",
) -> Loaded:
    """Preprocess ``files`` by ``contract``; corrupt or unsupported files are skipped with a
    warning; none left is an error naming ``option``."""
    paths: list[Path] = []
    tensors: list[np.ndarray] = []
    skipped: list[tuple[Path, str]] = []
    for path in progress(files, label):
        try:
            tensors.append(preprocess(path.read_bytes(), contract))
            paths.append(path)
            continue
        except ServiceError as exc:  # InvalidImage, PayloadTooLarge: the gateway's 4xx
            reason = exc.message
        except OSError as exc:
            reason = exc.strerror or str(exc)
        skipped.append((path, reason))
        log(f"warning: skipping {path}: {reason}")
    if not paths:
        raise ExportError(
            f"{option}: none of the {len(files)} files is an image the model accepts "
            f"(first: {skipped[0][0]}: {skipped[0][1]})"
        )
    return Loaded(paths, np.stack(tensors), skipped)


def progress(items: Sequence[T], label: str) -> Iterator[T]:
    """Yield ``items`` while showing ``label i/n`` on stderr: one line redrawn on a
    terminal, a line per tenth otherwise (logs stay short)."""
    n = len(items)
    tty = sys.stderr.isatty()
    step = max(1, n // 10)
    for i, item in enumerate(items, 1):
        yield item
        # Shown once the caller is done with the item (asks for the next): a failure on the
        # first item leaves only its own message on stderr.
        if tty:
            print(f"\r{label}: {i}/{n}", end="" if i < n else "\n", file=sys.stderr, flush=True)
        elif i % step == 0 or i == n:
            print(f"{label}: {i}/{n}", file=sys.stderr, flush=True)
