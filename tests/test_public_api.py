"""The public API of ``p2pgpu.core`` is exactly its ``__all__``.

As in trio's test of its exports: every name in ``__all__`` exists, nothing
public is missing from it, nothing private is in it, and the private modules
(``_codec``, ``_advert``...) are reached only through the package.
"""

from __future__ import annotations

import enum
import importlib
import pkgutil
import types
import typing

import pytest

import p2pgpu.core as core


def test_all_names_exist_and_are_unique() -> None:
    assert len(core.__all__) == len(set(core.__all__))
    for name in core.__all__:
        assert hasattr(core, name), name


def test_nothing_private_is_exported() -> None:
    assert [n for n in core.__all__ if n.startswith("_")] == []


def test_every_public_name_is_in_all() -> None:
    public = {n for n in vars(core) if not n.startswith("_")}
    modules = {n for n in public if isinstance(getattr(core, n), types.ModuleType)}
    assert modules == set(), f"submodules leak as public names: {sorted(modules)}"
    assert public - set(core.__all__) == set(), "public names missing from __all__"


def test_star_import_gives_exactly_all() -> None:
    ns: dict[str, object] = {}
    exec("from p2pgpu.core import *", ns)  # noqa: S102 - the point of the test
    assert set(ns) - {"__builtins__"} == set(core.__all__)


def test_core_modules_are_private() -> None:
    for info in pkgutil.iter_modules(core.__path__):
        assert info.name.startswith("_"), f"p2pgpu.core.{info.name} should be private (_{info.name})"


def test_exported_objects_come_from_core() -> None:
    for name in core.__all__:
        obj = getattr(core, name)
        module = getattr(obj, "__module__", None)
        if typing.get_origin(obj) is not None:
            continue  # a type alias (e.g. Verifier = Callable[...]): its origin's module, not ours
        if module is not None and not isinstance(obj, (int, str, tuple)):
            assert module.startswith("p2pgpu.core."), f"{name} comes from {module}"


def test_private_modules_import_alone() -> None:
    # Each private module can be imported on its own (no import cycles that
    # only work in the order __init__ happens to use).
    for info in pkgutil.iter_modules(core.__path__):
        importlib.import_module(f"p2pgpu.core.{info.name}")


def test_reason_codes_are_stable() -> None:
    # Reasons are metric labels and documented numbers: the first ones never move.
    assert issubclass(core.Reason, enum.IntEnum)
    expected = ["OVERSIZED", "MALFORMED", "BAD_SCHEMA", "NON_CANONICAL", "BAD_SIGNATURE", "WRONG_KIND",
                "UNSUPPORTED_VERSION", "EXPIRED", "NOT_YET_VALID", "REPLAYED", "SIMULATED_FORBIDDEN",
                "WRONG_NETWORK", "SIGNER_MISMATCH", "LIMIT_EXCEEDED"]
    for number, name in enumerate(expected, start=1):
        assert core.Reason[name] == number
    values = [int(r) for r in core.Reason]
    assert values == list(range(1, len(values) + 1)), "new reasons go at the end, numbered in order"


def test_kind_names_are_stable() -> None:
    assert core.Kind.ADVERT.value == "advert"
    assert core.Kind.ADVERT.domain_tag == b"p2pgpu/advert/v1\x00"


# ------------------------------------------------------- the SDK at the top


def test_the_top_level_exports_the_sdk_lazily() -> None:
    import subprocess
    import sys

    import p2pgpu
    from p2pgpu import sdk

    assert set(p2pgpu.__all__) == set(sdk.__all__) | {"__version__"}
    for name in sdk.__all__:
        assert getattr(p2pgpu, name) is getattr(sdk, name), name
        assert not name.startswith("_")
    for info in pkgutil.iter_modules(sdk.__path__):
        assert info.name.startswith("_"), f"p2pgpu.sdk.{info.name} should be private"
    # `import p2pgpu` loads nothing heavy; the SDK loads no libp2p (the CLI's daemon commands start fast).
    code = ("import sys, p2pgpu; assert 'p2pgpu.sdk' not in sys.modules and 'trio' not in sys.modules;"
            " from p2pgpu import Client; assert 'libp2p' not in sys.modules and 'p2pgpu.node' not in sys.modules;"
            " print(Client)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    with pytest.raises(AttributeError):
        p2pgpu.NotAThing  # noqa: B018 - the lookup is the test


def test_sdk_errors_say_who_is_at_fault() -> None:
    import p2pgpu

    for name in ("DaemonNotRunning", "RequestRefused", "JobFailed", "Timeout", "ResultsMismatch"):
        assert issubclass(getattr(p2pgpu, name), p2pgpu.P2pgpuError)
    for name in ("BadManifest", "UnknownJob", "MethodUnavailable"):
        assert issubclass(getattr(p2pgpu, name), p2pgpu.RequestRefused)
