"""The README's generated tables match the registries, and the test command is what CI runs."""

from pathlib import Path

from vlmprune.tables import methods_markdown, models_markdown, render

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_current():
    text = (ROOT / "README.md").read_text()
    assert render(text) == text, "README tables are stale: run `python -m vlmprune.tables README.md`"
    assert methods_markdown() in text and models_markdown() in text
    assert "| `cls` | vision |" in methods_markdown()


def test_readme_names_the_ci_test_command():
    assert "bash .ci/run" in (ROOT / "README.md").read_text()
    assert "python -m pytest -q tests" in (ROOT / ".ci/run").read_text()
