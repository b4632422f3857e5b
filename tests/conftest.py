"""Shared fixtures: the trained digits demo model (once per session) and small helpers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_cli(
    *args: str, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a console script of this project as a user would, capturing its output."""
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        check=False,
    )


def tree_digest(path: Path) -> dict[str, str]:
    """relative path -> sha256 for every file under ``path`` (hidden ones included)."""
    if not path.exists():
        return {}
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".resnet-export.lock"
    }


@dataclass(frozen=True)
class Demo:
    repository: Path
    images: Path
    stdout: str

    @property
    def model_dir(self) -> Path:
        return self.repository / "digits"

    def pngs(self) -> list[tuple[Path, int]]:
        return sorted((p, int(p.parent.name)) for p in self.images.rglob("*.png"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """`resnet-export demo` run once, for real: trains ResNet-18 on the digits and exports it."""
    base = tmp_path_factory.mktemp("demo")
    repo, images = base / "repo", base / "digits_png"
    proc = run_cli("resnet-export", "demo", "--repository", str(repo), "--images-out", str(images))
    assert proc.returncode == 0, proc.stderr
    return Demo(repo, images, proc.stdout)
