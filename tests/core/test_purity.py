"""The protocol cores stay pure: no I/O, no clock, no global randomness, no await.

Every module of ``p2pgpu/core`` is parsed with ``ast`` (never imported for
this check) and refused if it imports a module that does I/O, concurrency,
networking, storage, hardware, the clock or randomness; if it calls the clock
or the global ``random`` some other way (``__import__``, ``open``); or if it
awaits.  ``from random import Random`` is allowed for type annotations only:
the class must never be called, an RNG comes in as an argument.  The checker
itself is tested on small bad snippets so that a broken checker cannot pass
silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import p2pgpu.core

CORE_DIR = Path(p2pgpu.core.__file__).parent

#: Top-level modules a core may not import (submodules included).
FORBIDDEN_MODULES = frozenset({
    # concurrency and drivers
    "trio", "asyncio", "threading", "multiprocessing", "concurrent", "anyio",
    "libp2p", "multiaddr",
    # payments and storage
    "solana", "solders", "sqlite3",
    # network, processes, hardware
    "socket", "ssl", "select", "selectors", "subprocess", "signal", "httpx", "requests", "urllib", "http",
    "pynvml", "ray",
    # the file system
    "os", "pathlib", "shutil", "tempfile",
    # the clock
    "time", "datetime",
    # randomness that is not injected
    "random", "secrets", "uuid",
})
#: Builtins that do I/O or import behind the checker's back.
FORBIDDEN_CALLS = frozenset({"open", "print", "input", "__import__", "exec", "eval", "breakpoint", "compile"})
#: Names whose attribute calls read the clock or global state (``time.time()``,
#: ``datetime.now()``, ``random.random()``), whatever way they were bound.
FORBIDDEN_CALL_ROOTS = frozenset({"time", "datetime", "os", "random", "secrets", "uuid", "trio", "asyncio"})


def _root(name: str) -> str:
    return name.split(".")[0]


def violations(source: str, filename: str = "<snippet>") -> list[str]:
    tree = ast.parse(source, filename)
    found: list[str] = []
    random_typing_names: list[str] = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _root(alias.name) in FORBIDDEN_MODULES:
                    found.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and mod == "random" and all(a.name == "Random" for a in node.names):
                random_typing_names.extend(a.asname or a.name for a in node.names)
            elif node.level == 0 and _root(mod) in FORBIDDEN_MODULES:
                found.append(f"{where}: from {mod} import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, (ast.Await, ast.AsyncFunctionDef, ast.AsyncFor, ast.AsyncWith)):
            found.append(f"{where}: async code ({type(node).__name__})")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in FORBIDDEN_CALLS:
                found.append(f"{where}: call {func.id}()")
            elif isinstance(func, ast.Attribute):
                base = func.value
                while isinstance(base, ast.Attribute):
                    base = base.value
                if isinstance(base, ast.Name) and base.id in FORBIDDEN_CALL_ROOTS:
                    found.append(f"{where}: call {ast.unparse(func)}()")
    if random_typing_names:
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func,
                                                         ast.Name) and node.func.id in random_typing_names:
                found.append(f"{filename}:{node.lineno}: {node.func.id}() built in a core: inject the RNG")
    return found


CORE_MODULES = sorted(CORE_DIR.rglob("*.py"))


def test_there_are_core_modules() -> None:
    names = {p.name for p in CORE_MODULES}
    assert {"__init__.py", "_codec.py", "_envelope.py", "_advert.py", "_matching.py"} <= names


@pytest.mark.parametrize("path", CORE_MODULES, ids=lambda p: str(p.relative_to(CORE_DIR)))
def test_core_module_is_pure(path: Path) -> None:
    assert violations(path.read_text(), str(path.relative_to(CORE_DIR.parent.parent))) == []


BAD_SNIPPETS = [
    "import trio",
    "import time",
    "import os.path",
    "import libp2p.crypto as c",
    "from libp2p.peer.id import ID",
    "from solders.pubkey import Pubkey",
    "import sqlite3",
    "import socket",
    "from subprocess import run",
    "import httpx",
    "import pynvml",
    "from datetime import datetime",
    "import asyncio",
    "import threading",
    "import random",
    "from random import randint",
    "from random import Random, random",
    "from random import Random\nrng = Random(1)",
    "from random import Random as R\nrng = R()",
    "import secrets",
    "def f(time):\n    return time.time()",
    "def f(datetime):\n    return datetime.datetime.now()",
    "def f():\n    return __import__('time').time()",
    "def f():\n    return open('/etc/passwd').read()",
    "def f():\n    print('x')",
    "async def f():\n    pass",
    "async def f(x):\n    await x",
]


@pytest.mark.parametrize("source", BAD_SNIPPETS)
def test_checker_catches(source: str) -> None:
    assert violations(source) != []


GOOD_SNIPPETS = [
    "from random import Random\ndef f(rng: Random) -> int:\n    return rng.randrange(3)",
    "from __future__ import annotations\nimport hashlib\nimport msgpack",
    "from ._codec import encode\nfrom . import _schema as s",
    "def f(now_ms: int) -> int:\n    return now_ms + 1",
    "import dataclasses, enum, re, typing, functools, hashlib, base58",
]


@pytest.mark.parametrize("source", GOOD_SNIPPETS)
def test_checker_allows(source: str) -> None:
    assert violations(source) == []
