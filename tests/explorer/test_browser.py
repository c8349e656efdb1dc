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

Then, on the same devnet: the network view (plots over time, top earners;
``devnet-network.png``), a public explorer (``--public``: public fields only,
no ``/metrics``, security headers, 429s; ``public-network.png``), and a node
whose advert carries HTML in its GPU model and region, shown as text
(``hostile-strings.png``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser_helpers import screenshot, text_of, wait_js
from explorer_helpers import ARTIFACTS, start_explorer, stop_explorer, wait_for

from p2pgpu.devnet import Devnet
from p2pgpu.explorer._network import PLOTS
from p2pgpu.localnet import _override_config, inventory_doc

pytestmark = pytest.mark.processes



def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "healthz", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


_RUN: dict[int, list[dict[str, Any]]] = {}


def ran_jobs(devnet: Devnet) -> list[dict[str, Any]]:
    """The devnet's two sample jobs, run once per devnet (by the first test that needs them)."""
    if id(devnet) not in _RUN:
        _RUN[id(devnet)] = devnet.run_jobs(2, timeout_s=120)
    return _RUN[id(devnet)]


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

    docs = ran_jobs(devnet)  # hello (one node) and pair (two nodes), both settled and paid
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


# ------------------------------------------------------------- the network view

PLOT_STATE = ("return [...document.querySelectorAll('#network .plots img')]"
              ".map(i => [i.id, i.complete && i.naturalWidth > 0, i.getAttribute('src') || ''])")
SVG = "{http://www.w3.org/2000/svg}"


def svg_texts(url: str) -> str:
    """Every text and title of an SVG plot, after parsing it as XML (it must be well formed)."""
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.headers.get_content_type() == "image/svg+xml"
        root = ET.fromstring(r.read())
    assert root.tag == f"{SVG}svg"
    return "\n".join(el.text or "" for el in root.iter() if el.tag in (f"{SVG}text", f"{SVG}title"))


def plots_loaded(driver: Any, version_after: str = "") -> Any:
    return wait_js(driver, PLOT_STATE + ".filter(p => p[1] && p[2].includes('?v=')).length === 6 && true",
                   what="the six plots loaded") and driver.execute_script(PLOT_STATE)


def test_devnet_network_view_shows_the_network_over_time(devnet: Devnet, driver: Any) -> None:
    docs = ran_jobs(devnet)
    payouts = [p for d in docs for p in d["payouts"]]
    driver.get(devnet.network_view_url)
    wait_js(driver, "return document.getElementById('c-nodes').innerText === '3'", what="three nodes")
    wait_js(driver, "return document.getElementById('network-note').innerText.includes('2 jobs seen and 2 clusters')",
            what="two jobs and two clusters in the network note")
    plots = plots_loaded(driver)
    assert sorted(p[0] for p in plots) == sorted(f"plot-{n}" for n in PLOTS)

    base = devnet.explorer_url
    models = svg_texts(base + "plots/gpus_by_model.svg")
    assert all(m in models for m in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 4090"))
    assert "local" in svg_texts(base + "plots/gpus_by_region.svg")
    assert ": 2" in svg_texts(base + "plots/jobs_per_hour.svg")  # one bar of two jobs this hour
    net = json.loads(urllib.request.urlopen(base + "api/network", timeout=30).read())
    assert net["jobs_seen_24h"] == 2 and net["clusters_24h"] == 2 and net["gpus_online"]["total"] == 14
    assert net["paid_30d"] == sum(p["amount"] for p in payouts)
    assert {e["worker"] for e in net["top_earners"]} == {p["worker"] for p in payouts}
    assert sum(e["amount"] for e in net["top_earners"]) == net["paid_30d"]
    earners = text_of(driver, "earners-body")
    assert all(p["worker"][:12] in earners for p in payouts)
    assert "SOL" in svg_texts(base + "plots/payouts_per_day.svg") or "lamports" in svg_texts(
        base + "plots/payouts_per_day.svg")

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1280, "height": 2400, "deviceScaleFactor": 1, "mobile": False})
    driver.execute_script("document.querySelector('.top').style.position = 'static'")  # not over the section
    section = driver.find_element("id", "network")
    assert section.screenshot(str(ARTIFACTS / "devnet-network.png"))
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 390, "height": 800, "deviceScaleFactor": 1, "mobile": True})
    widest = driver.execute_script(
        "return Math.max(...[...document.querySelectorAll('#network *')].map(e => e.getBoundingClientRect().right))")
    assert widest <= 390, f"the network view reaches {widest} px on a 390 px phone"
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    assert (ARTIFACTS / "devnet-network.png").stat().st_size > 10_000


def test_public_explorer_serves_only_public_data_with_limits(devnet: Devnet, driver: Any) -> None:
    docs = ran_jobs(devnet)
    assert devnet.net is not None
    home = devnet.net.nodes[0].home
    ex = start_explorer(home, args=("--public", "--bind", "127.0.0.1:0"))
    try:
        wait_for(lambda: ex.get("/api/summary")["nodes"] == 3 and ex.get("/api/network")["jobs_seen_24h"] == 2,
                 what="the public explorer's first polls")
        doc = ex.get("/api/all")
        assert doc["public"] is True and doc["errors"] == {}
        assert all("reason" not in j and "outputs" not in j for j in doc["jobs"]["rows"])
        assert all("error" not in p for p in doc["payouts"]["rows"])
        assert str(home.path) not in json.dumps(doc)  # nothing local: no paths, no logs, no keys
        assert home.token() not in json.dumps(doc)
        with pytest.raises(urllib.error.HTTPError, match="404"):
            ex.get("/metrics")
        with urllib.request.urlopen(ex.url, timeout=30) as r:
            csp = r.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert r.headers["X-Content-Type-Options"] == "nosniff" and r.headers["X-Frame-Options"] == "DENY"
        # The proof check still works, from the payer's store and the ledger, without asking the daemon.
        h = next(p["proof_hash"] for d in docs for p in d["payouts"])
        check = ex.get("/api/check/" + h, method="POST")
        assert check["valid"] is True, check

        driver.get(ex.url + "#network")
        wait_js(driver, "return document.getElementById('mode').innerText === 'public'", what="the public tag")
        wait_js(driver, "return document.getElementById('c-nodes').innerText === '3'", what="three nodes")
        assert driver.execute_script("return document.getElementById('metrics-link').hidden") is True
        plots_loaded(driver)
        screenshot(driver, "public-network.png", width=1280)
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        driver.get("about:blank")  # close the page's event stream before hammering

        codes = []
        for _ in range(120):
            try:
                with urllib.request.urlopen(ex.url.rstrip("/") + "/api/summary", timeout=10) as r:
                    codes.append(r.status)
            except urllib.error.HTTPError as exc:
                codes.append(exc.code)
                assert exc.headers["Retry-After"] == "1"
        assert 200 in codes and 429 in codes, codes
    finally:
        assert stop_explorer(ex) == 0


HOSTILE_MODEL = '<img src=x onerror="window.__pwned=1">'
HOSTILE_REGION = '"><svg onload=window.__pwned=2>'


def test_hostile_strings_in_adverts_are_shown_as_text(devnet: Devnet, driver: Any) -> None:
    """A node whose advert names a GPU model and a region made of HTML: the page,
    the plots and the API show them as text; nothing of them runs."""
    net = devnet.net
    assert net is not None
    i = len(net.nodes)
    (net.root / f"gpus{i}.json").write_text(json.dumps(inventory_doc(HOSTILE_MODEL, 24564, "8.9", 1)))
    home = net.home(i)
    home.init(network="local")
    _override_config(home.config_path, f"region = {json.dumps(HOSTILE_REGION)}\n{net.config_extra}")
    net.nodes.append(net.start_node(i, bootstrap=net.nodes[0].addrs))

    driver.get(devnet.explorer_url)
    wait_js(driver, f"return document.getElementById('c-nodes').innerText === '{i + 1}'", what="the hostile node")
    assert driver.execute_script("return window.__pwned === undefined")
    assert driver.execute_script("return document.querySelectorAll('img:not(#network img), svg').length") == 0
    assert HOSTILE_MODEL in text_of(driver, "supply-body") and HOSTILE_REGION in text_of(driver, "regions-body")
    assert HOSTILE_MODEL in text_of(driver, "nodes-body") and HOSTILE_REGION in text_of(driver, "nodes-body")
    # The plots are still well-formed images, with the hostile label as text.
    wait_for(lambda: HOSTILE_MODEL[:30] in svg_texts(devnet.explorer_url + "plots/gpus_by_model.svg"),
             what="the hostile model in the plot")
    assert HOSTILE_REGION in svg_texts(devnet.explorer_url + "plots/gpus_by_region.svg")
    driver.get(devnet.explorer_url + "#network")
    plots_loaded(driver)
    assert driver.execute_script("return window.__pwned === undefined")
    screenshot(driver, "hostile-strings.png", width=1280)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
