"""The ledger server driven by the official JavaScript client, ``@solana/web3.js`` 1.x.

The test installs the package with npm into a directory it owns (under the
system temp dir, reused between runs) and runs ``js/web3_flow.mjs`` there
against a ``p2pgpu ledger serve`` process: airdrop, a transfer with a memo,
confirmation (``sendAndConfirmTransaction``: websocket ``signatureSubscribe``
on port + 1 with ``getSignatureStatuses`` and ``getBlockHeight``), then
``getTransaction`` and ``getParsedTransaction``.  Skipped, saying so, only
when node or npm is absent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from ledger_helpers import start_server, stop_server

JS_DIR = Path(tempfile.gettempdir()) / "p2pgpu-test-web3js"
SCRIPT = Path(__file__).with_name("js") / "web3_flow.mjs"


@pytest.fixture(scope="module")
def web3js() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are needed to install @solana/web3.js (apt-get install nodejs npm)")
    JS_DIR.mkdir(exist_ok=True)
    if not (JS_DIR / "node_modules" / "@solana" / "web3.js").exists():
        (JS_DIR / "package.json").write_text('{"name": "p2pgpu-web3js-test", "private": true}\n')
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "@solana/web3.js@1"], cwd=JS_DIR,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"npm install @solana/web3.js@1 failed: {r.stderr[-2000:]}"
    shutil.copy(SCRIPT, JS_DIR / SCRIPT.name)
    return JS_DIR / SCRIPT.name


def test_web3js_airdrop_memo_transfer_confirm_lookup(web3js: Path) -> None:
    server = start_server(None, slot_ms=100)
    try:
        r = subprocess.run(["node", str(web3js), server.url], capture_output=True, text=True, timeout=120)
    finally:
        stop_server(server)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["balance"] == 2_000_000_000
    assert out["toBalance"] == 1_000_000
    assert out["fee"] == 5_000
    assert out["memo"] == "p2pgpu web3.js test"
    assert out["parsedOk"] is True
    assert out["epochBlockHeight"] >= out["slot"]
