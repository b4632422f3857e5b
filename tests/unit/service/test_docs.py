"""README documents every setting, so the docs cannot drift from the Settings class."""

from __future__ import annotations

from pathlib import Path

from service.settings import Settings

README = (Path(__file__).resolve().parents[3] / "README.md").read_text()


def test_every_setting_is_documented_with_a_description():
    for name, field in Settings.model_fields.items():
        assert f"`RESNET_SERVE_{name.upper()}`" in README, name
        assert field.description, f"{name} has no description"


def test_readme_starts_with_the_two_commands():
    head = README.split("## ", 1)[0]
    assert "make serve" in head and "make test" in head


def test_settings_table_is_what_make_docs_writes():
    """Descriptions and defaults too, not only the names: run `make docs` after a change."""
    from deploy.settings_doc import rows

    assert rows() in README, "README's settings table is stale: run `make docs`"
