"""The ledger server driven by the official JavaScript clients: ``@solana/web3.js`` 1.x and ``@solana/kit``.

The tests install the packages with npm into a directory they own (under the
system temp dir, reused between runs) and run ``js/*.mjs`` there against a
``p2pgpu ledger serve`` process: airdrop, a transfer with a memo,
confirmation (web3.js ``sendAndConfirmTransaction`` and kit's
``sendAndConfirmTransactionFactory``: websocket ``signatureSubscribe`` on
port + 1 with ``getSignatureStatuses``/``getBlockHeight`` or
``slotNotification``), then ``getTransaction`` (json, jsonParsed, base64).
Skipped, saying so, only when node or npm is absent.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from ledger_helpers import start_server, stop_server

JS_DIR = Path(tempfile.gettempdir()) / "p2pgpu-test-web3js"
JS_SRC = Path(__file__).with_name("js")
PACKAGES = {
    "@solana/web3.js": "@solana/web3.js@1",
    "@solana/kit": "@solana/kit@8",
    "@solana-program/system": "@solana-program/system@0.14",
    "@solana-program/memo": "@solana-program/memo@0.15",
}


@pytest.fixture(scope="module")
def js_dir() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to install @solana/web3.js and @solana/kit (apt-get install nodejs npm)")
    JS_DIR.mkdir(exist_ok=True)
    # One install at a time: a parallel worker or another run on this machine may be filling the
    # same directory (two npm installs into one node_modules break each other).
    with open(JS_DIR.with_name(JS_DIR.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [spec for name, spec in PACKAGES.items() if not (JS_DIR / "node_modules" / name).exists()]
        if missing:
            (JS_DIR / "package.json").write_text('{"name": "p2pgpu-web3js-test", "private": true}\n')
            r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", *missing], cwd=JS_DIR,
                               capture_output=True, text=True, timeout=600, check=False)
            assert r.returncode == 0, f"npm install {' '.join(missing)} failed: {r.stderr[-2000:]}"
        for script in JS_SRC.glob("*.mjs"):  # ES modules resolve packages next to the script
            dest = JS_DIR / script.name
            if not dest.exists() or dest.read_bytes() != script.read_bytes():
                # Aside, then renamed: a worker may be running the script that is there now.
                shutil.copy(script, dest.with_name(dest.name + ".new"))
                dest.with_name(dest.name + ".new").replace(dest)
    return JS_DIR


def run_js(js_dir: Path, script: str, with_ws: bool) -> dict:  # type: ignore[type-arg]
    server = start_server(None, slot_ms=100)
    try:
        argv = ["node", str(js_dir / script), server.url] + ([server.ws_url] if with_ws else [])
        r = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    finally:
        stop_server(server)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_web3js_airdrop_memo_transfer_confirm_lookup(js_dir: Path) -> None:
    out = run_js(js_dir, "web3_flow.mjs", with_ws=False)
    assert out["balance"] == 2_000_000_000
    assert out["toBalance"] == 1_000_000
    assert out["fee"] == 5_000
    assert out["memo"] == "p2pgpu web3.js test"
    assert out["parsedOk"] is True
    assert out["epochBlockHeight"] >= out["slot"]


def test_kit_airdrop_memo_transfer_confirm_lookup(js_dir: Path) -> None:
    out = run_js(js_dir, "kit_flow.mjs", with_ws=True)
    assert out["balance"] == 2_000_000_000
    assert out["toBalance"] == 1_000_000
    assert out["fee"] == 5_000
    assert out["version"] == 0 and out["base64"] == "base64"
    assert out["epochBlockHeight"] > 0
