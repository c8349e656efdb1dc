"""``toml_depth`` reads how deep a TOML text nests without parsing it (#12).

Its invariant, checked against Python's own parser on generated documents
full of hostile characters (brackets, quotes, backslashes, dots and hashes in
strings of every TOML form): on any document ``tomllib`` accepts, the
nesting it reports is exactly the depth of the parsed values, and the dots
it reports are those of the longest dotted key (a float adds at most one).
"""

from __future__ import annotations

import json
import tomllib
from random import Random
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from p2pgpu.core._manifest import (
    ManifestError,
    check_toml_depth,
    manifest_from_toml,
    toml_depth,
    toml_nesting_max,
)

HOSTILE = "ab.[]{}\"'#\\=,\n \t"
BARE = st.text(alphabet="abcXYZ019_-", min_size=1, max_size=4)


@st.composite
def toml_string(draw: st.DrawFn) -> tuple[str, str]:
    """(a TOML string literal in one of the four forms, the value it means)."""
    value = draw(st.text(alphabet=HOSTILE, max_size=12))
    form = draw(st.sampled_from(["basic", "literal", "ml_basic", "ml_literal"]))
    if form == "literal" and "'" not in value and "\n" not in value:
        return f"'{value}'", value
    if form == "ml_basic":
        esc = value.replace("\\", "\\\\").replace('"', '\\"')
        tail = draw(st.sampled_from(["", '"', '""']))  # raw quotes before the closing ones: """x"""""
        return f'"""{esc}{tail}"""', value + tail
    if form == "ml_literal" and "'''" not in value and not value.startswith("\n"):
        return f"'''{value}'''", value  # may end in up to two quotes: '''x'''''
    return json.dumps(value), value  # a JSON string is a valid TOML basic string


def _leaf() -> st.SearchStrategy[tuple[str, Any, int, int]]:
    """(text, value, nesting depth, dots outside strings)."""
    ints = st.integers(-1000, 1000).map(lambda i: (str(i), i, 0, 0))
    floats = st.sampled_from(["1.5", "-0.25", "6.0e3"]).map(lambda f: (f, float(f), 0, 1))
    strings = toml_string().map(lambda sv: (sv[0], sv[1], 0, 0))
    return st.one_of(ints, floats, strings)


def _extend(children: st.SearchStrategy[tuple[str, Any, int, int]]) -> st.SearchStrategy[tuple[str, Any, int, int]]:
    def array(items: list[tuple[str, Any, int, int]]) -> tuple[str, Any, int, int]:
        return ("[" + ", ".join(t for t, *_ in items) + "]", [v for _, v, *_ in items],
                1 + max((d for *_, d, _ in items), default=0), max((k for *_, k in items), default=0))

    def table(items: dict[str, tuple[str, Any, int, int]]) -> tuple[str, Any, int, int]:
        return ("{" + ", ".join(f"{k} = {t}" for k, (t, *_) in items.items()) + "}",
                {k: v for k, (_, v, *_) in items.items()},
                1 + max((d for *_, d, _ in items.values()), default=0), max((k for *_, k in items.values()), default=0))

    return st.one_of(st.lists(children, max_size=3).map(array),
                     st.dictionaries(BARE, children, max_size=3).map(table))


VALUES = st.recursive(_leaf(), _extend, max_leaves=12)


@st.composite
def document(draw: st.DrawFn) -> tuple[str, int, int]:
    """A document of dotted-key lines, with the nesting and dots it really has."""
    lines, nesting, dots = [], 0, 0
    for i in range(draw(st.integers(1, 4))):
        quoted = st.text(alphabet=HOSTILE, max_size=6).map(json.dumps)  # keys are never multi-line strings
        parts = [f"k{i}"] + draw(st.lists(st.one_of(BARE, quoted), max_size=5))
        text, _, depth, value_dots = draw(VALUES)
        comment = draw(st.sampled_from(["", " # [[[{{ \"'", " #"]))
        lines.append(".".join(parts) + " = " + text + comment)
        nesting, dots = max(nesting, depth), max(dots, len(parts) - 1, value_dots)
    return "\n".join(lines) + "\n", nesting, dots


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(document())
def test_the_depth_read_without_parsing_is_the_parsed_depth(doc: tuple[str, int, int]) -> None:
    text, nesting, dots = doc
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        assume(False)  # e.g. a quoted key part that repeats another: not a document to judge by
    d = toml_depth(text)
    assert (d.nesting, d.key_dots) == (nesting, dots), text


@pytest.mark.parametrize(("text", "nesting"), [
    ("a = ['''x'''', [[1]]]\n", 3),  # a multi-line string may end in one or two extra quotes
    ("a = ['''x''''', [[1]]]\n", 3),
    ('a = ["""x""\\"""", [[1]]]\n', 3),
    ('a = ["""\\\\""", [[1]]]\n', 3),  # an escaped backslash, then the closing quotes
    ('a = ["x\\\\", [[1]]]\n', 3),
    ("a = ['x\\', [[1]]]\n", 3),  # no escapes in literal strings
])
def test_the_ends_of_strings(text: str, nesting: int) -> None:
    tomllib.loads(text)
    assert toml_depth(text).nesting == nesting


def test_table_headers_and_comments() -> None:
    d = toml_depth('[a.b]\nx = 1 # [[[[\n[[c."d.e".f]]\ny = "#[["\n')
    assert (d.nesting, d.key_dots, d.key_dots_line) == (2, 2, 3)


@pytest.mark.parametrize("text", [
    "a = " + "[" * 17 + "]" * 17,
    "a = " + "{b = " * 17 + "1" + "}" * 17,
    "a = " + "[{b = " * 9 + "1" + "}]" * 9,
    "a" + ".b" * 16 + " = 1",
    "[a" + ".b" * 16 + "]",
])
def test_too_deep_is_refused_with_a_reason(text: str) -> None:
    with pytest.raises(ManifestError, match=f"more than {toml_nesting_max}"):
        check_toml_depth(text, toml_nesting_max)


def test_the_limit_itself_is_allowed() -> None:
    check_toml_depth("a = " + "[" * 16 + "]" * 16, toml_nesting_max)
    check_toml_depth("a" + ".b" * 15 + " = 1", toml_nesting_max)


def test_manifest_from_toml_refuses_before_parsing() -> None:
    text = 'name = "deep"\n[runtime]\ncommand = ["true"]\nenv = ' + "[" * 3000 + "]" * 3000 + "\n"
    with pytest.raises(ManifestError, match="nested more than 16 levels deep") as refused:
        manifest_from_toml(text, submitter="x", now_ms=0, rng=Random(0), payer="y")
    assert refused.value.field == "toml"
