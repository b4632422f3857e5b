"""Where things are: the repository, this interpreter's scripts, the chart, deploy/; the
checkers `make tools` installs."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CHART = ROOT / "helm" / "resnet-serving"

DEPLOY = ROOT / "deploy"


def tool(name: str) -> str:
    """Path of a checker installed by `make tools` (next to this interpreter, else on PATH)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: run `make tools`")
    return found


BIN = Path(sys.executable).parent
