"""The README's generated tables match the registries, and the test command is what CI runs."""

import re
from pathlib import Path

from vlmprune.tables import methods_markdown, models_markdown, render

ROOT = Path(__file__).resolve().parents[1]


def test_readme_tables_are_current():
    text = (ROOT / "README.md").read_text()
    assert render(text) == text, (
        "README tables are stale: run `python -m vlmprune.tables README.md`"
    )
    assert methods_markdown() in text and models_markdown() in text
    assert "| `cls` | vision |" in methods_markdown()


def test_readme_names_the_ci_test_command():
    assert "bash .ci/run" in (ROOT / "README.md").read_text()
    assert "python -m pytest -q tests" in (ROOT / ".ci/run").read_text()


# third-party modules that only the optional parts import (the `kernels` extra brings triton; the
# `eval` extra brings lmms-eval, and with it accelerate, loguru and tqdm): module -> where allowed
OPTIONAL_IMPORTS = {
    "triton": "vlmprune/kernels/",
    "lmms_eval": "vlmprune/eval/lmms",
    "accelerate": "vlmprune/eval/lmms",
    "loguru": "vlmprune/eval/lmms",
    "tqdm": "vlmprune/eval/lmms",
}
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
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module]
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                else []
            )
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "vlmprune":
                    continue
                dist = DISTRIBUTIONS.get(top, top).lower().replace("_", "-")
                if not (dist in base or rel.startswith(OPTIONAL_IMPORTS.get(top, "-"))):
                    missing.append(f"{rel}: {top}")
    assert not missing, missing


def vlmprune_imports() -> dict[str, set[str]]:
    """module -> the vlmprune modules it imports, at module level and inside functions (lazy
    imports count too), relative imports resolved; `from a import b` is an edge to a.b when that
    is a module, else to a. Importing a.b.c does not count as importing the packages a and a.b."""
    import ast

    paths = {}
    for path in (ROOT / "vlmprune").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def module_of(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in paths.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base
                    for a in node.names
                ]
            else:
                continue
            edges |= {m for m in map(module_of, targets) if m and m != mod}
        graph[mod] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of `graph` as a path [a, b, ..., a], or [] when it has none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_cycle_between_vlmprune_modules():
    """Imports between vlmprune's modules run one way, lazy ones included (issue 23): e.g. a
    kernel's dispatcher imports its Triton twin, which imports the torch reference, never back."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        "a",
        "b",
        "c",
        "a",
    ]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    graph = vlmprune_imports()
    # the parser sees lazy imports (inside functions) and `from package import module`
    assert "vlmprune.kernels.maxmin_triton" in graph["vlmprune.kernels.maxmin"]
    assert "vlmprune.kernels.maxmin_ref" in graph["vlmprune.kernels.maxmin_triton"]
    assert "vlmprune.embedded.core" in graph["vlmprune.embedded.train"]
    assert "vlmprune.scorers" in graph["vlmprune.adapters.base"]
    assert not find_cycle(graph), " -> ".join(find_cycle(graph))


BENCH_PATH = re.compile(r"docs/bench/[A-Za-z0-9_.\-]+[A-Za-z0-9]")


def test_every_bench_file_is_cited_and_every_cited_file_exists():
    """BENCHMARKS.md cites every raw file under docs/bench/ (the rest is git history), and every
    docs/bench/ path that BENCHMARKS.md, README.md or docs/*.md names exists."""
    bench = ROOT / "docs" / "bench"
    files = {p.relative_to(ROOT).as_posix() for p in bench.rglob("*") if p.is_file()}
    cited = set(BENCH_PATH.findall((ROOT / "BENCHMARKS.md").read_text()))
    assert files and cited, "no raw files or no citations found"
    assert not files - cited, f"not cited by BENCHMARKS.md: {sorted(files - cited)}"
    for doc in [
        ROOT / "BENCHMARKS.md",
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
    ]:
        missing = {
            p for p in BENCH_PATH.findall(doc.read_text()) if not (ROOT / p).is_file()
        }
        assert not missing, f"{doc.name} cites missing files: {sorted(missing)}"


def test_benchmarks_first_screen_has_the_current_numbers_and_readme_links_it():
    """A newcomer reaches the current numbers from README: the at-a-glance table is BENCHMARKS.md's
    first section, and README links BENCHMARKS.md and docs/architecture.md."""
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert text.split("\n## ")[1].startswith("At a glance")
    assert "| question | answer | device, date | section |" in text.split("\n## ")[1]
    readme = (ROOT / "README.md").read_text()
    assert "(BENCHMARKS.md)" in readme and "(docs/architecture.md)" in readme
    for heading in (
        "Decoder stages on LLaVA-1.5-7B shapes (accelerator)",
        "LLaVA-NeXT-7B shapes (accelerator)",
    ):
        assert f"\n## {heading}\n" in text
