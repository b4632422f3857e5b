"""The project's console scripts run as a user runs them, and what a one-line failure looks
like."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.helpers.paths import BIN


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


def without_package(name: str, where: Path) -> dict[str, str]:
    """An environment for :func:`run_cli` in which ``import name`` fails as it does where
    the package is not installed: a stub package of that name under ``where``, first on
    PYTHONPATH, that raises ImportError (only the import is simulated; the real package
    stays installed for every other process)."""
    stub = where / "uninstalled" / name
    stub.mkdir(parents=True, exist_ok=True)
    message = f"No module named {name!r}"
    (stub / "__init__.py").write_text(f"raise ImportError({message!r})\n")
    path = [str(stub.parent), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {"PYTHONPATH": os.pathsep.join(path)}


def assert_one_line_failure(proc, *fragments):
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("resnet-export: error: ")
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
