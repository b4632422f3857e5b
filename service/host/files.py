"""Folders of the user's own files (images to calibrate, evaluate or load-test with), listed
the same way by both command lines."""

from __future__ import annotations

from pathlib import Path


class FolderError(ValueError):
    """A folder that cannot be used, in one line naming the option that gave it."""


def image_files(root: Path, option: str) -> list[Path]:
    """Every file under ``root`` (recursively, hidden ones skipped), in a stable order."""
    if not root.is_dir():
        what = "no such directory" if not root.exists() else "not a directory"
        raise FolderError(f"{option} {root}: {what}")
    try:
        files = sorted(
            p
            for p in root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        )
    except OSError as exc:
        raise FolderError(f"{option} {root}: cannot be read ({exc.strerror or exc})") from None
    if not files:
        raise FolderError(f"{option} {root}: holds no files")
    return files
