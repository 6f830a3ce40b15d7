"""The generated reference docs match the code (regenerate with `python -m meshnode.cli.docgen`)."""

from __future__ import annotations

from meshnode.cli.docgen import ROOT, cli_markdown, config_markdown


def test_cli_reference_is_current() -> None:
    assert (ROOT / "docs" / "cli.md").read_text() == cli_markdown(), "run: python -m meshnode.cli.docgen"


def test_configuration_reference_is_current() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert text == config_markdown(), "run: python -m meshnode.cli.docgen"
    assert "`MESHNODE_ROOM__PASSWORD`" in text and "`LEGION_RELAY_URLS`" in text
