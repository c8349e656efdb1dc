"""The drivers' import graphs: no cycles in ``p2pgpu/node/`` or ``p2pgpu/sim/``,
and nothing in ``p2pgpu/node/`` reaches back into the daemon.

An import cycle makes the order modules load in matter, hides who depends on
whom, and is usually patched with imports moved into functions, which this
test counts too: every ``import`` that runs (at module level or inside a
function) is an edge.  Imports under ``if TYPE_CHECKING:`` never run and are
left out, with one exception: no module of the node may name ``_daemon`` at
all (the daemon wires the node together; the jobs service, the runner and
the rest get what they need through ``node/_ports.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "p2pgpu"


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(package: str, path: Path, *, runtime_only: bool = True) -> set[str]:
    """The modules of ``p2pgpu.<package>`` that ``path`` imports."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if _type_checking(node):
                skipped.update(id(n) for n in ast.walk(node))
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:
                out.update(a.name for a in node.names)
            elif node.module and node.module.startswith(f"p2pgpu.{package}."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(f"p2pgpu.{package}."):
                    out.add(a.name.split(".")[2])
    return out


def graph(package: str) -> dict[str, set[str]]:
    mods = {p.stem: p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    return {m: imports(package, p) & set(mods) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by a depth-first walk (one per back edge)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(g.get(m, ())):
            if state.get(dep) == 1:
                found.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            walk(m)
    return found


@pytest.mark.parametrize("package", ["node", "sim"])
def test_no_import_cycles(package: str) -> None:
    assert cycles(graph(package)) == []


def test_nothing_in_the_node_reaches_back_into_the_daemon() -> None:
    offenders = sorted(p.stem for p in (ROOT / "node").glob("*.py")
                       if p.stem not in ("__init__", "_daemon") and "_daemon" in imports("node", p, runtime_only=False))
    assert offenders == []


def test_the_checker_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
