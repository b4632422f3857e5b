"""The documentation site's pages and anchors, as mkdocs makes them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass


def doc_sections(root: Path) -> set[str]:
    """``docs/<page>.md`` and ``docs/<page>.md#<anchor>`` for every page of the site and
    every heading in it (anchors as mkdocs makes them: Python-Markdown's toc slugify)."""
    from markdown.extensions.toc import slugify

    found = set()
    for page in sorted((root / "docs").glob("*.md")):
        name = f"docs/{page.name}"
        found.add(name)
        fenced = False
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                fenced = not fenced
            elif not fenced and (m := re.match(r"#+ (.+)", line)):
                found.add(f"{name}#{slugify(m.group(1), '-')}")
    return found
