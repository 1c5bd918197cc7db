"""The README's generated tables match the registries, and the test command is what CI runs."""

import re
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


# third-party modules that only the optional parts import (the `kernels` extra brings triton; the
# `eval` extra brings lmms-eval, and with it accelerate, loguru and tqdm): module -> where allowed
OPTIONAL_IMPORTS = {"triton": "vlmprune/kernels/", "lmms_eval": "vlmprune/eval/lmms",
                    "accelerate": "vlmprune/eval/lmms", "loguru": "vlmprune/eval/lmms", "tqdm": "vlmprune/eval/lmms"}
DISTRIBUTIONS = {"PIL": "pillow"}


def test_base_dependencies_cover_every_import():
    """`pip install .` alone must run the README's main command: every third-party module that
    vlmprune imports is a base dependency, except in the optional parts (kernels, lmms-eval)."""
    import ast
    import sys
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = {re.split(r"[<>=!\[ ;]", d)[0].lower() for d in project["dependencies"]}
    missing = []
    for path in sorted((ROOT / "vlmprune").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "vlmprune":
                    continue
                dist = DISTRIBUTIONS.get(top, top).lower().replace("_", "-")
                if not (dist in base or rel.startswith(OPTIONAL_IMPORTS.get(top, "-"))):
                    missing.append(f"{rel}: {top}")
    assert not missing, missing
