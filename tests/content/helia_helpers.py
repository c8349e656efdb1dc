"""Helia (IPFS in JavaScript) for tests: its npm packages installed once into
a directory under the system temp dir (reused between runs, installed
without install scripts: helia's own entry point loads WebRTC, whose native
module cannot be built here, so the scripts in ``js/`` use its Bitswap and
UnixFS directly), and a script of ``js/`` run as a child process that prints
one JSON line when it listens and stops at the end of its input.

Debian's Node 20 lacks ``Promise.withResolvers``, which newer js-libp2p
dependencies call: ``js/polyfill.mjs`` adds it.  Tests that need Helia skip,
saying so, only when node or npm is absent.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

JS_DIR = Path(tempfile.gettempdir()) / "p2pgpu-test-helia-bitswap"
JS_SRC = Path(__file__).with_name("js")
#: helia 5's versions (helia 7 needs Node 22).
PACKAGES = {
    "@helia/bitswap": "@helia/bitswap@2.2.0",
    "@helia/unixfs": "@helia/unixfs@4.0.3",
    "libp2p": "libp2p@2.10.0",
    "@libp2p/tcp": "@libp2p/tcp@10",
    "@chainsafe/libp2p-noise": "@chainsafe/libp2p-noise@16",
    "@chainsafe/libp2p-yamux": "@chainsafe/libp2p-yamux@7",
    "@libp2p/identify": "@libp2p/identify@3",
    "@libp2p/logger": "@libp2p/logger@5",
    "blockstore-core": "blockstore-core@5",
    "multiformats": "multiformats@13",
}


def helia_dir() -> Path:
    """The directory with Helia's packages and the ``js/`` scripts (installs them if missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to run Helia (apt-get install nodejs npm)")
    JS_DIR.mkdir(exist_ok=True)
    # One install at a time: test files on other parallel workers, or another run on this machine,
    # may be filling the same directory (two npm installs into one node_modules break each other).
    with open(JS_DIR.with_name(JS_DIR.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [spec for name, spec in PACKAGES.items() if not (JS_DIR / "node_modules" / name).exists()]
        if missing:
            if not (JS_DIR / "package.json").exists():
                (JS_DIR / "package.json").write_text('{"name": "p2pgpu-helia-test", "private": true, "type": "module"}\n')
            r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--ignore-scripts", *missing], cwd=JS_DIR,
                               capture_output=True, text=True, timeout=900, check=False)
            assert r.returncode == 0, f"npm install {' '.join(missing)} failed: {r.stderr[-2000:]}"
        for script in JS_SRC.glob("*.mjs"):  # ES modules resolve packages next to the script
            dest = JS_DIR / script.name
            if not dest.exists() or dest.read_bytes() != script.read_bytes():
                # Aside, then renamed: a worker may be running the script that is there now.
                shutil.copy(script, dest.with_name(dest.name + ".new"))
                dest.with_name(dest.name + ".new").replace(dest)
    return JS_DIR


@asynccontextmanager
async def helia_process(js_dir: Path, script: str, *args: str) -> AsyncIterator[dict[str, Any]]:
    """Run ``js/<script>`` with ``args``; yield the JSON line it prints once
    it listens; stop it (end of input, then kill) on leaving."""
    proc = await trio.lowlevel.open_process(["node", str(js_dir / script), *args],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=js_dir)
    try:
        assert proc.stdout is not None
        line = b""
        with trio.fail_after(60):
            while not line.endswith(b"\n"):
                got = await proc.stdout.receive_some(4096)
                assert got, "the Helia peer exited before it listened"
                line += got
        yield json.loads(line)
    finally:
        if proc.stdin is not None:
            await proc.stdin.aclose()  # the script stops on end of input
        with trio.move_on_after(10):
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
