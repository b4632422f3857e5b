"""Regenerate README's settings table from service.settings.Settings (`make docs`)."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

HEAD = "| variable | default | meaning |\n|---|---|---|\n"


def rows() -> str:
    out = []
    for name, f in Settings.model_fields.items():
        d = f.get_default(call_default_factory=True)
        if isinstance(d, list):
            d = ",".join(d) or "(empty)"
        if d is None:
            d = "(none)"
        out.append(f"| `RESNET_SERVE_{name.upper()}` | `{d}` | {f.description or ''} |")
    return "\n".join(out)


def main() -> None:
    readme = Path("README.md")
    text = readme.read_text()
    start = text.index(HEAD) + len(HEAD)
    end = text.index("\n\n", start)
    readme.write_text(text[:start] + rows() + text[end:])


if __name__ == "__main__":
    main()
