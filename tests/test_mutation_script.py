"""``scripts/mutation`` (#19): what it counts as a text-only mutant (the
score leaves those out, so the rule must not let a behaviour change through),
and how ``--recheck`` applies a mutant's diff to the module.  mutmut itself
is not needed for these."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "mutation"


def load() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("mutation_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader("mutation_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


M = load()

SOURCE = '''def check(x):
    if x > 3:
        raise LocalProtocolError("x is too big")
    if x < 0:
        raise PeerMisbehaved(Reason.BAD_SCHEMA,
                             f"x is {x}")
    if x == 2:
        raise s.fail("x", "must not be 2")
    return FundsVerdict(ok=False, reason="low")
'''


def diff(old: str, new: str) -> str:
    """A one-line mutant in mutmut's diff form (a hunk of the function)."""
    lines = SOURCE.splitlines()
    i = lines.index(old)
    body = [" " + ln for ln in lines[max(0, i - 2):i]] + ["-" + old, "+" + new] + \
        [" " + ln for ln in lines[i + 1:i + 3]]
    return "--- p2pgpu/core/x.py\n+++ p2pgpu/core/x.py\n@@ -1,5 +1,5 @@\n" + "\n".join(body) + "\n"


@pytest.mark.parametrize("old,new", [
    ('        raise LocalProtocolError("x is too big")', '        raise LocalProtocolError("XXx is too bigXX")'),
    ('        raise LocalProtocolError("x is too big")', '        raise LocalProtocolError(None)'),
    ('        raise LocalProtocolError("x is too big")', '        raise LocalProtocolError()'),
    ('                             f"x is {x}")', '                             None)'),
    ('                             f"x is {x}")', '                             )'),
    ('        raise s.fail("x", "must not be 2")', '        raise s.fail("x", "XXmust not be 2XX")'),
    ('    return FundsVerdict(ok=False, reason="low")', '    return FundsVerdict(ok=False, reason="XXlowXX")'),
], ids=["words", "None", "dropped", "a message on its own line, None", "a message on its own line, dropped",
        "a fail's words", "a reason's words"])
def test_text_only_mutants(old: str, new: str) -> None:
    assert M.is_text_only(diff(old, new), SOURCE)


@pytest.mark.parametrize("old,new", [
    ("    if x > 3:", "    if x >= 3:"),
    ('        raise PeerMisbehaved(Reason.BAD_SCHEMA,', '        raise PeerMisbehaved(None,'),
    ('        raise PeerMisbehaved(Reason.BAD_SCHEMA,', '        raise PeerMisbehaved('),
    ('        raise s.fail("x", "must not be 2")', '        raise s.fail("must not be 2")'),
    ('        raise s.fail("x", "must not be 2")', '        raise s.fail("x", )'),
    ('    return FundsVerdict(ok=False, reason="low")', '    return FundsVerdict(ok=None, reason="low")'),
], ids=["a bound", "the reason code", "the reason code dropped", "a fail's field dropped (a TypeError)",
        "a fail's words dropped (a TypeError)", "a returned value"])
def test_behaviour_changes_are_never_text(old: str, new: str) -> None:
    assert not M.is_text_only(diff(old, new), SOURCE)


def test_apply_diff_finds_a_methods_hunk_dedented() -> None:
    method = "class A:\n    " + SOURCE.replace("\n", "\n    ").rstrip() + "\n"
    d = diff("    if x > 3:", "    if x >= 3:")
    assert "        if x >= 3:" in M.apply_diff(method, d)
    assert M.apply_diff(SOURCE, d) == SOURCE.replace("if x > 3:", "if x >= 3:")
    with pytest.raises(ValueError, match="not found exactly once"):
        M.apply_diff(SOURCE + SOURCE, d)


def test_scratch_copy_narrows_the_module_and_its_test_selection(tmp_path: Path) -> None:
    work = M.scratch_copy("p2pgpu/core/_codec.py", tmp_path)
    text = (work / "pyproject.toml").read_text()
    assert 'only_mutate = ["p2pgpu/core/_codec.py"]' in text
    assert "pytest_add_cli_args_test_selection = [\"tests/core/test_codec.py\", " in text
    for t in M.MODULE_TESTS["_codec"]:
        assert (work / t).is_file()
    plain = (M.scratch_copy("p2pgpu/core/_chunks.py", tmp_path) / "pyproject.toml").read_text()
    assert 'only_mutate = ["p2pgpu/core/_chunks.py"]' in plain
    assert 'pytest_add_cli_args_test_selection = ["tests/core"]' in plain
    assert not (work.parent / "_codec" / "mutants").exists()


def test_every_selected_test_file_exists_and_each_module_selects_its_edge_tests() -> None:
    root = SCRIPT.parent.parent
    for stem, tests in M.MODULE_TESTS.items():
        for t in tests:
            assert (root / t).is_file(), (stem, t)
        edges = root / "tests" / "core" / f"test{stem}_edges.py"
        if edges.is_file():
            assert str(edges.relative_to(root)) in tests, stem
