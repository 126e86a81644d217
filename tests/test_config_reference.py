"""docs/configuration.md is generated from the config's help strings and must stay in step with them."""

from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config import REFERENCE_COMMAND, SECTIONS, _help, options_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_docs_configuration_md_is_up_to_date() -> None:
    assert DOC.read_text() == options_markdown(), (
        f"docs/configuration.md is out of date with the help strings in fedlora/config.py; run: {REFERENCE_COMMAND}"
    )


def test_reference_starts_by_saying_it_is_generated_and_how_to_regenerate() -> None:
    first_line = options_markdown().splitlines()[0]
    assert "generated" in first_line.lower()
    assert "fedlora config --markdown > docs/configuration.md" in first_line


def _as_cell(help_text: str) -> str:
    """The help text as the reference shows it: one line, `|` escaped, `<` escaped outside `code`."""
    parts = " ".join(help_text.split()).split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts)).replace("|", "\\|")


def test_every_field_of_every_section_appears_with_its_help() -> None:
    text = options_markdown()
    for section_name, section_type in SECTIONS.items():
        assert f"## [{section_name}]\n" in text
        section_text = text.split(f"## [{section_name}]\n", 1)[1].split("\n## ", 1)[0]
        for section_field in fields(section_type):
            help_text = _as_cell(section_field.metadata["help"])
            row = next((line for line in section_text.splitlines() if line.startswith(f"| `{section_field.name}` |")), None)
            assert row is not None, f"{section_name}.{section_field.name} is missing from the reference"
            assert row.endswith(f"| {help_text} |"), f"{section_name}.{section_field.name}: help text not in {row!r}"


@dataclass
class _PipeSection:
    """A section for testing.

    Only this first paragraph is shown.
    """

    choice: str = _help("'a|b' or 'c', e.g. kind:<name>; see `x|<y>`.", "a|b")
    sizes: list[int] = _help("Sizes.", [1, 2])


@dataclass
class _BareSection:
    flag: bool = _help("A flag.", False)


def test_table_cells_escape_pipes_and_html_on_any_sections() -> None:
    text = options_markdown({"pipes": _PipeSection, "bare": _BareSection}, title="Local config", intro="")
    lines = text.splitlines()
    assert "# Local config" in lines
    assert "## [pipes]" in lines and "## [bare]" in lines
    assert """| `choice` | `"a\\|b"` | 'a\\|b' or 'c', e.g. kind:&lt;name>; see `x\\|<y>`. |""" in lines
    assert "| `sizes` | `[1, 2]` | Sizes. |" in lines  # a list default stays on its row
    # every table row has exactly four unescaped pipes, i.e. three cells
    for line in lines:
        if line.startswith("| "):
            assert line.replace("\\|", "").count("|") == 4, line
    # the docstring's first paragraph only, and no signature @dataclass invents for a class without one
    assert "A section for testing." in lines
    assert "Only this first paragraph is shown." not in text
    assert "_BareSection(" not in text


def test_cli_config_markdown_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--markdown"]) == 0
    assert capsys.readouterr().out == options_markdown()


def test_cli_config_markdown_refuses_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--markdown", "federation.rounds=5"]) == 2
    assert "--markdown" in capsys.readouterr().err
