"""The explorer page in headless Chromium (Debian's, driven by Selenium and chromium-driver).

Opens the page of a ``p2pgpu explorer`` over a real LocalNet, waits until it
lists the nodes' GPUs (rendered from the live event stream, no reload), sees
a third node appear live, a submitted job's cluster form and its payout
land with a transaction signature, clicks the proof's check and sees all
three steps pass (signature, Merkle inclusion, memo on the ledger), and
saves screenshots at desktop and phone width under ``test-artifacts/explorer/``.  At phone width nothing may overflow the
screen sideways.  Skipped only when Chromium or chromium-driver is missing.
"""

from __future__ import annotations

from typing import Any

import pytest
from browser_helpers import screenshot, text_of, wait_js
from explorer_helpers import Explorer, ensure_job, ensure_third

from p2pgpu.localnet import LocalNet

pytestmark = pytest.mark.processes


def test_page_shows_the_gpus_live_at_desktop_and_phone_width(net: LocalNet, explorer: Explorer, driver: Any) -> None:
    driver.get(explorer.url + "/")
    wait_js(driver, "return document.getElementById('live').dataset.state === 'live'", what="the live stream")
    wait_js(driver, "return document.getElementById('supply-body').innerText.includes('NVIDIA H100 80GB HBM3')",
            what="the H100s in the supply panel")
    assert "NVIDIA GeForce RTX 4090" in text_of(driver, "supply-body")
    assert "signed adverts" in text_of(driver, "trust") and "ledger transactions" in text_of(driver, "trust")
    version_before = int(driver.execute_script("return Number(document.body.dataset.version)"))

    ensure_third(net)  # appears on the open page without a reload
    wait_js(driver, "return document.getElementById('c-nodes').innerText === '3'", what="three nodes, live")
    wait_js(driver, "return document.getElementById('c-gpus').innerText === '14'", what="14 GPUs, live")
    assert int(driver.execute_script("return Number(document.body.dataset.version)")) > version_before
    nodes = text_of(driver, "nodes-body")
    assert all(n.peer_id[:12] in nodes for n in net.nodes)
    assert "eu-west" in text_of(driver, "regions-body") and "us-east" in text_of(driver, "regions-body")

    job_id = ensure_job(net)  # a cluster forms and shows up live
    wait_js(driver, f"return document.getElementById('clusters-body').innerText.includes('{job_id[:10]}')",
            what="the job's cluster on the page")
    assert "hello" in text_of(driver, "clusters-body") and job_id[:10] in text_of(driver, "jobs-body")

    # The job is paid (a transaction signature on the page), and its proof's check passes.
    wait_js(driver, "return [...document.querySelectorAll('#payouts-body .pill')].some(p => p.innerText === 'paid')",
            what="a paid payout on the page")
    # The panel is re-rendered at every update, so elements are found and used within one script.
    wait_js(driver, "const b = document.querySelector('#proofs-body button.check'); if (b) b.click(); return !!b",
            what="a check button to click")
    valid, text = wait_js(driver, "const r = document.querySelector('#proofs-body .result[data-valid]');"
                                  " return r && [r.dataset.valid, r.innerText]", what="the check's result")
    assert valid == "true", text
    for step in ("signature", "inclusion", "memo"):
        assert f"✓{step}" in text.replace(" ", "").replace("\n", ""), text

    desktop = screenshot(driver, "explorer-desktop.png", width=1280)
    phone = screenshot(driver, "explorer-phone.png", width=390, mobile=True)
    widest = driver.execute_script(
        "return Math.max(...[...document.querySelectorAll('body *')].map(e => e.getBoundingClientRect().right))")
    assert widest <= 390, f"something on the page reaches {widest} px, wider than a 390 px phone screen"
    assert desktop.stat().st_size > 10_000 and phone.stat().st_size > 10_000
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})

