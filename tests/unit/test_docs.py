"""The docs: a short README with the two commands first, a site that mkdocs builds with
--strict (no broken link, anchor or page), and a settings page that cannot drift from the
Settings class."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import Settings
from tests.helpers.docs import doc_sections
from tests.helpers.paths import ROOT

README = (ROOT / "README.md").read_text()
SETTINGS_PAGE = (ROOT / "docs" / "operations.md").read_text()


def test_readme_starts_with_the_two_commands_and_stays_short():
    head = README.split("## ", 1)[0]
    assert "make serve" in head and "make test" in head
    assert len(README.splitlines()) <= 200


def test_readmes_links_into_the_docs_reach_a_page_and_section():
    links = re.findall(r"\]\((docs/[^)]+)\)", README)
    assert len(links) >= 10
    sections = doc_sections(ROOT)
    assert [link for link in links if link not in sections] == []


@pytest.mark.external
def test_the_site_builds_strictly(tmp_path):
    """What `make docs` builds; --strict fails on a broken link or anchor, a page missing
    from the nav or a nav entry without a page."""
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mkdocs"), "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")} - {"index"}
    assert {p for p in pages if not (tmp_path / p / "index.html").is_file()} == set()
    html = (tmp_path / "operations" / "index.html").read_text()
    assert "RESNET_SERVE_TRITON_SHARED_MEMORY" in html  # the settings table, rendered
    assert (tmp_path / "img" / "latency.png").stat().st_size > 10_000  # the example chart


def test_every_setting_is_documented_with_a_description():
    for name, field in Settings.model_fields.items():
        assert f"`RESNET_SERVE_{name.upper()}`" in SETTINGS_PAGE, name
        assert field.description, f"{name} has no description"


def test_settings_table_is_what_make_docs_writes():
    """Descriptions and defaults too, not only the names: run `make docs` after a change."""
    from deploy.settings_doc import rows

    assert rows() in SETTINGS_PAGE, "docs/operations.md's settings table is stale: `make docs`"
