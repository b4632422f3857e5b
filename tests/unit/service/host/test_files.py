"""Folders of the user's files, listed the same way by both command lines."""

from __future__ import annotations

import pytest

from service.host.files import FolderError, image_files
from tests.helpers.images import image_bytes


def test_missing_empty_and_file_folders_are_one_line_errors(tmp_path):
    with pytest.raises(FolderError, match=r"^--calibration-dir .*nope: no such directory$"):
        image_files(tmp_path / "nope", "--calibration-dir")
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "x.png").write_bytes(image_bytes())
    with pytest.raises(FolderError, match=r"empty: holds no files$"):
        image_files(tmp_path / "empty", "--calibration-dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match=r"file: not a directory$"):
        image_files(tmp_path / "file", "--sample-images")
    (tmp_path / "ok" / "a").mkdir(parents=True)
    for name in ("b.png", "a/c.png", "a.png"):
        (tmp_path / "ok" / name).write_bytes(image_bytes())
    assert [
        p.relative_to(tmp_path / "ok").as_posix() for p in image_files(tmp_path / "ok", "-x")
    ] == [
        "a/c.png",  # by path parts: the folder "a" before the file "a.png"
        "a.png",
        "b.png",
    ]
