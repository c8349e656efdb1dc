"""The explorer of a running devnet, in headless Chromium (Debian's, driven by
Selenium and chromium-driver; skipped only where they are missing).

``p2pgpu.devnet.Devnet`` starts ``p2pgpu ledger serve``, three node daemons
that settle on it (wallets funded by airdrop) and ``p2pgpu explorer`` over
node 0.  The page is opened first; then node 0 submits the devnet's sample
jobs (one single-node, one two-node) and the open page must show, without a
reload: the GPUs, both clusters (one of two members), both jobs paid with
their transaction signatures, and every proof's check passing, with its
paying transaction fetched from the JSON-RPC ledger.  Screenshots go to
``test-artifacts/explorer/devnet-desktop.png`` and ``devnet-phone.png``
(390 px wide, where nothing may overflow the screen sideways).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import screenshot, text_of, wait_js
from explorer_helpers import wait_for

from p2pgpu.devnet import Devnet

pytestmark = pytest.mark.processes



def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def devnet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Devnet]:
    root: Path = tmp_path_factory.mktemp("devnet")
    with Devnet(root, nodes=3, explorer=True) as dev:
        wait_for(lambda: _answers(dev.explorer_url), what=f"the devnet's explorer at {dev.explorer_url}")
        yield dev


def test_devnet_explorer_shows_clusters_paid_jobs_and_passing_checks(devnet: Devnet, driver: Any) -> None:
    assert devnet.net is not None
    driver.get(devnet.explorer_url)
    wait_js(driver, "return document.getElementById('c-nodes').innerText === '3'", what="three nodes")
    supply = text_of(driver, "supply-body")
    assert "NVIDIA H100 80GB HBM3" in supply and "NVIDIA A100-SXM4-40GB" in supply

    docs = devnet.run_jobs(2, timeout_s=120)  # hello (one node) and pair (two nodes), both settled and paid
    assert [d["name"] for d in docs] == ["hello", "pair"] and all(d["state"] == "succeeded" for d in docs)
    for d in docs:
        wait_js(driver, f"return document.getElementById('clusters-body').innerText.includes('{d['job_id'][:10]}')",
                what=f"the cluster of {d['name']}")
    wait_js(driver, "return document.querySelectorAll('#clusters-body .members').length === 2", what="2 clusters")
    members = driver.execute_script(
        "return [...document.querySelectorAll('#clusters-body .members')].map(m => m.children.length).sort()")
    assert members == [1, 2]
    signatures = {p["tx_signature"] for d in docs for p in d["payouts"]}
    assert len(signatures) >= 1 and None not in signatures
    wait_js(driver, "const ps = [...document.querySelectorAll('#payouts-body tbody tr')];"
                    " return ps.length === 3 && ps.every(r => r.innerText.includes('paid'))",
            what="three paid payouts (one for hello, two for pair)")
    jobs = text_of(driver, "jobs-body")
    assert "1/1 paid" in jobs and "2/2 paid" in jobs, jobs
    payouts = text_of(driver, "payouts-body")
    assert all(sig[:24] in payouts for sig in signatures)

    # Click every proof's check; each must pass all three steps.
    n = driver.execute_script(
        "const bs = [...document.querySelectorAll('#proofs-body button.check')]; bs.forEach(b => b.click());"
        " return bs.length")
    assert n == 3
    results = wait_js(driver, "const rs = [...document.querySelectorAll('#proofs-body .result[data-valid]')];"
                              " return rs.length === 3 && rs.map(r => [r.dataset.valid, r.innerText])",
                      what="three check results")
    for valid, text in results:
        assert valid == "true", text
        assert "memo: transaction" in text and "carries the root in its memo" in text
    assert "signed adverts" in text_of(driver, "trust") and "ledger transactions" in text_of(driver, "trust")
    assert driver.execute_script("return document.getElementById('live').dataset.state") == "live"

    desktop = screenshot(driver, "devnet-desktop.png", width=1280)
    phone = screenshot(driver, "devnet-phone.png", width=390, mobile=True)
    widest = driver.execute_script(
        "return Math.max(...[...document.querySelectorAll('body *')].map(e => e.getBoundingClientRect().right))")
    assert widest <= 390, f"something on the page reaches {widest} px, wider than a 390 px phone screen"
    assert desktop.stat().st_size > 10_000 and phone.stat().st_size > 10_000
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
