"""No docstring cites a file that is not in the repository (#13).

Docstrings name the files that explain them (``docs/formation.md``,
``core/_verdict.py``); when a file is renamed, split or lives outside the
repository (the team's design notes), the citation sends a reader nowhere.
Every path-like word in a module, class or function docstring under
``p2pgpu/``, ``tests/``, ``benchmarks/`` and ``scripts/`` must name a file of
the repository: as written from the repository root, or as the tail of a
repository path (``core/_verdict.py``, ``_collect.py``).  Files the program
itself reads or writes at run time (not repository files) are listed in
:data:`RUNTIME_FILES`.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("p2pgpu", "tests", "benchmarks", "scripts")
SKIPPED_DIRS = {".git", ".venv", "__pycache__", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
#: Files made at run time that docstrings describe: a node's control file, a
#: job's output in an example, a GPU inventory the user writes.
RUNTIME_FILES = {"control.json", "out.txt", "inventory.json"}
_PATH = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.(?:py|md|toml|json|sh|yml|yaml|txt))(?![\w/])")


def repository_files(root: Path) -> set[str]:
    out: set[str] = set()
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        base = Path(folder).relative_to(root)
        out.update((base / n).as_posix() for n in names)
    return out


def cited_paths(source: str) -> list[tuple[int, str]]:
    """(line, path) for every path-like word in the docstrings of ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                line = getattr(node, "lineno", 1)
                found += [(line, m.group(1)) for m in _PATH.finditer(doc)]
    return found


def missing(cited: str, files: set[str]) -> bool:
    if cited.rsplit("/", 1)[-1] in RUNTIME_FILES:
        return False
    if cited in files:
        return False
    return not any(f.endswith("/" + cited) for f in files)


def test_every_docstring_cites_files_that_exist() -> None:
    files = repository_files(REPO)
    bad: list[str] = []
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            if any(part in SKIPPED_DIRS for part in Path(rel).parts):
                continue
            for line, cited in cited_paths(path.read_text()):
                if missing(cited, files):
                    bad.append(f"{rel}:{line} cites {cited}")
    assert not bad, "docstrings citing files not in the repository:\n" + "\n".join(bad)


def test_a_citation_of_a_missing_file_is_caught() -> None:
    files = {"docs/cli.md", "p2pgpu/core/_verdict.py", "p2pgpu/node/_collect.py"}
    src = '"""See shared/CLI.md, docs/cli.md, core/_verdict.py and _collect.py."""\n' \
          'def f():\n    """Also CONVENTIONS.md and control.json."""\n'
    cited = cited_paths(src)
    assert [c for _, c in cited] == ["shared/CLI.md", "docs/cli.md", "core/_verdict.py", "_collect.py",
                                    "CONVENTIONS.md", "control.json"]
    assert [c for _, c in cited if missing(c, files)] == ["shared/CLI.md", "CONVENTIONS.md"]
