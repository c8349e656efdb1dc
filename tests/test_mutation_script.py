"""``scripts/mutation`` (#19): what it counts as a text-only mutant (the
score leaves those out, so the rule must not let a behaviour change through),
and how ``--recheck`` applies a mutant's diff to the module.  mutmut itself
is not needed for these."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import random
import sys
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


def test_every_selected_test_file_exists_and_each_module_selects_the_tests_named_after_it() -> None:
    root = SCRIPT.parent.parent
    for stem, tests in M.MODULE_TESTS.items():
        for t in tests:
            # a test file, or a whole folder (``tests/core``, the default selection)
            assert (root / t).is_file() or (t.startswith("tests/") and (root / t).is_dir()), (stem, t)
        # every test file named after the module (its edges, its images, its publishing...)
        core = root / "tests" / "core"
        for own in sorted([*core.glob(f"test{stem}.py"), *core.glob(f"test{stem}_*.py")]):
            assert str(own.relative_to(root)) in tests or "tests/core" in tests, (stem, own.name)


def _stopped_run(tmp_path: Path, results: dict[str, int | None], fingerprint: str) -> Path:
    """A scratch copy as an interrupted run leaves it: mutants generated, some tested."""
    work = tmp_path / "_codec"
    meta = work / "mutants" / "p2pgpu" / "core" / "_codec.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": results}))
    (work / "p2pgpu" / "core").mkdir(parents=True)
    (work / "p2pgpu" / "core" / "_codec.py").write_text("def f():\n    return 1\n")
    (work / M.FINGERPRINT).write_text(fingerprint)
    return work


def test_resume_goes_on_with_the_copy_and_says_when_the_tree_changed(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert M.resumable("p2pgpu/core/_codec.py", tmp_path) is None  # nothing to resume
    work = _stopped_run(tmp_path, {"m_1": 1}, M.tree_fingerprint())
    assert M.resumable("p2pgpu/core/_codec.py", tmp_path) == work
    assert capsys.readouterr().err == ""
    (work / M.FINGERPRINT).write_text("0" * 64)
    (work / M.COMMIT).write_text("abc1234")
    assert M.resumable("p2pgpu/core/_codec.py", tmp_path) == work
    assert "resuming the copy of abc1234" in capsys.readouterr().err


def test_a_resumed_sample_tests_only_its_mutants_without_a_result(tmp_path: Path) -> None:
    """mutmut (a stand-in here that records what it was asked and marks those
    killed) is asked for the sampled mutants still untested, and the report
    counts the whole sample."""
    work = _stopped_run(tmp_path, {"m_1": 1, "m_2": None, "m_3": 36, "m_4": None}, M.tree_fingerprint())
    fake = tmp_path / "fake_mutmut.py"
    fake.write_text("import json, sys, pathlib\n"
                    "meta = pathlib.Path('mutants/p2pgpu/core/_codec.py.meta')\n"
                    "data = json.loads(meta.read_text())\n"
                    "names = sys.argv[4:]\n"
                    "pathlib.Path('asked').write_text(json.dumps(names))\n"
                    "data['exit_code_by_key'].update({n: 1 for n in names})\n"
                    "meta.write_text(json.dumps(data))\n")
    cmd = [sys.executable, str(fake)]
    rep = M.run_module(cmd, "p2pgpu/core/_codec.py", base=tmp_path, sample=3, seed=1, children=1, resume=True)
    chosen = sorted(random.Random(1).sample(["m_1", "m_2", "m_3", "m_4"], 3))
    assert json.loads((work / "asked").read_text()) == [n for n in chosen if n in ("m_2", "m_4")]
    assert rep["resumed"] and rep["mutants"] == 3 and rep["sampled"]
    assert rep["killed"] == 3 and rep["survived"] == 0  # m_3 hung (a kill), the others killed


def test_a_partial_report_counts_only_what_was_tested_and_runs_nothing(tmp_path: Path) -> None:
    work = _stopped_run(tmp_path, {"m_1": 1, "m_2": None, "m_3": 36, "m_4": 1}, M.tree_fingerprint())
    rep = M.run_module([sys.executable, "-c", "raise SystemExit('mutmut must not run')"], "p2pgpu/core/_codec.py",
                       base=tmp_path, sample=0, seed=1, children=1, partial=True)
    assert (rep["mutants"], rep["untested"], rep["killed"], rep["score"], rep["partial"]) == (3, 1, 3, 100.0, True)
    assert not (work / "mutmut.log").exists()
    with pytest.raises(SystemExit, match="no stopped run"):
        M.run_module([sys.executable], "p2pgpu/core/_chunks.py", base=tmp_path, sample=0, seed=1, children=1,
                     partial=True)


@pytest.mark.parametrize("n", [301, 700, 1_100, 1_700, 3_000])
def test_a_smaller_sample_is_a_prefix_of_a_larger_one(n: int) -> None:
    """What lets ``--sample 300 --resume`` extend a finished ``--sample 100``
    (docs/testing.md): with one seed, the first picks do not depend on how many."""
    names = [f"m_{i}" for i in range(n)]
    assert random.Random(1).sample(names, 100) == random.Random(1).sample(names, 300)[:100]
