"""The network view's pure parts as tables: the bounded time series, the
views built from them, the SVG plots (well-formed, every hostile label
escaped), the public filter, the rate limiter, and ``--bind`` parsing."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pgpu.cli._common import CliError
from p2pgpu.cli._explorer import parse_bind
from p2pgpu.explorer import Raw, build_views
from p2pgpu.explorer._network import PLOTS, network_view, plot_svg, top_earners
from p2pgpu.explorer._plots import bar_chart, hbar_chart, line_chart, nice_max, text
from p2pgpu.explorer._public import PUBLIC_FIELDS, RateLimiter, public_views
from p2pgpu.explorer._series import (
    EventCounter,
    GaugeSeries,
    NetworkSeries,
    day_ms,
    hour_ms,
    minute_ms,
    per_bucket,
)

T0 = 1_700_000_000_000 - 1_700_000_000_000 % day_ms  # midnight UTC
SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = ['<img src=x onerror="window.__pwned=1">', '"><svg onload=alert(1)>', "a&b<c>\"'", "ctl\x01\x08\x1b",
           "surrogate \ud800 here", "\ufffe\uffff", "x" * 500]


# ------------------------------------------------------------------ series


def test_gauge_keeps_the_last_sample_per_bucket_and_a_bounded_history() -> None:
    g = GaugeSeries(bucket_ms=minute_ms, buckets_max=3, labels_max=3)
    g.sample(T0, {"H100": 8})
    g.sample(T0 + 30_000, {"H100": 6, "L4": 1})  # same minute: replaces
    assert list(g.buckets) == [(T0, {"H100": 6.0, "L4": 1.0})]
    for i in range(1, 5):
        g.sample(T0 + i * minute_ms, {"H100": i})
    assert [t for t, _ in g.buckets] == [T0 + 2 * minute_ms, T0 + 3 * minute_ms, T0 + 4 * minute_ms]
    g.sample(T0, {"H100": 99})  # a clock step back: dropped, never rewrites history
    assert g.points("H100")[-1] == (T0 + 4 * minute_ms, 4.0)


def test_gauge_caps_its_labels() -> None:
    g = GaugeSeries(labels_max=3)
    g.sample(T0, {f"model-{i}": i for i in range(1, 11)})
    (_, vals), = g.buckets
    assert vals == {"model-10": 10.0, "model-9": 9.0, "other": sum(range(1, 9))}
    assert g.labels() == ["other", "model-10", "model-9"]


def test_event_counter_counts_each_key_once_within_its_window() -> None:
    c = EventCounter(bucket_ms=hour_ms, buckets_max=24, keys_max=3)
    now = T0 + 10 * hour_ms + 5
    assert c.add("a", now - 60_000, now) and not c.add("a", now - 60_000, now)
    assert c.add("b", now - 3 * hour_ms, now)
    assert not c.add("old", now - 30 * hour_ms, now)  # before the window
    assert not c.add("future", now + 5 * hour_ms, now)  # a lying clock
    pts = c.points(now, 24)
    assert len(pts) == 24 and pts[-1] == (T0 + 10 * hour_ms, 0) and pts[-2] == (T0 + 9 * hour_ms, 1)
    assert pts[-4] == (T0 + 7 * hour_ms, 1)
    for k in "cdef":
        c.add(k, now, now)
    assert len(c.seen) == 3  # bounded memory of keys


def test_network_series_observes_supply_and_jobs() -> None:
    s = NetworkSeries()
    supply = {"by_model": [{"model": "H100", "gpus": 8}], "by_region": [{"region": "eu", "gpus": 8}],
              "gpus_total": 8, "gpus_free": 6, "nodes": 1}
    jobs = [{"job_id": "j1", "seen_at_ms": T0, "members": ["p"], "certificate_hash": "c"},
            {"job_id": "j2", "seen_at_ms": T0 + 1}, {"job_id": 5, "seen_at_ms": "x"}]
    s.observe(T0 + 10, supply, jobs)
    s.observe(T0 + 20, supply, jobs)
    assert s.started_ms == T0 + 10
    assert sum(n for _, n in s.jobs.points(T0 + 20, 24)) == 2
    assert sum(n for _, n in s.clusters.points(T0 + 20, 24)) == 1
    assert s.gpus_by_model.points("H100") == [(T0, 8.0)]


def test_per_bucket() -> None:
    rows = [{"paid_ms": T0 + 5, "amount": 10}, {"paid_ms": T0 + day_ms + 1, "amount": 5},
            {"paid_ms": T0 + day_ms + 2, "amount": 7}, {"paid_ms": None, "amount": 9}, {"paid_ms": T0, "amount": "9"}]
    assert per_bucket(rows, time_key="paid_ms", value_key="amount", now_ms=T0 + day_ms + 10, buckets=3) == \
        [(T0 - day_ms, 0), (T0, 10), (T0 + day_ms, 12)]
    assert per_bucket(rows, time_key="paid_ms", value_key=None, now_ms=T0 + day_ms + 10, buckets=2) == \
        [(T0, 2), (T0 + day_ms, 2)]


# -------------------------------------------------------------- the view


def _views() -> dict[str, Any]:
    raw = Raw(status={"peer_id": "me", "network": "local"},
              market=[{"peer_id": "me", "region": "eu", "gpus": [{"model": "H100", "memory_mb": 81559, "count": 8}],
                       "gpus_free": 8, "price": 1, "currency": "SOL"},
                      {"peer_id": "w2", "region": "us", "gpus": [{"model": "L4", "memory_mb": 23034, "count": 1}],
                       "gpus_free": 1, "price": 1, "currency": "SOL"}],
              jobs=[], proofs=[],
              payouts=[{"proof_hash": "a" * 64, "worker": "w2", "amount": 300, "currency": "SOL", "status": "paid",
                        "tx_signature": "sig1", "job_id": "j", "paid_ms": T0 + 1000, "error": "local detail"},
                       {"proof_hash": "b" * 64, "worker": "w2", "amount": 100, "currency": "SOL", "status": "owed",
                        "tx_signature": None, "job_id": "j"},
                       {"proof_hash": "c" * 64, "worker": "w3", "amount": 999, "currency": "MINT", "status": "paid",
                        "tx_signature": "sig2", "job_id": "j", "paid_ms": T0}],
              earnings=[{"proof_hash": "d" * 64, "amount": 50, "currency": "SOL", "status": "paid",
                         "tx_signature": "sig3", "job_id": "k", "created_ms": T0, "paid_ms": T0 + 5},
                        {"proof_hash": "e" * 64, "amount": 70, "currency": "SOL", "status": "expected",
                         "job_id": "k", "created_ms": T0 + 7}])
    return build_views(raw, now_ms=T0 + 2000, version=3)


def test_top_earners_count_paid_sol_only() -> None:
    v = _views()
    rows = top_earners(v["payouts"]["rows"], v["nodes"]["rows"], "me")
    assert [(r["worker"], r["amount"], r["payouts"], r["region"], r["self"]) for r in rows] == \
        [("w2", 300, 1, "us", False), ("me", 50, 1, "eu", True)]
    assert rows[0]["gpus"] == ["1x L4"]


def test_network_view_and_every_plot() -> None:
    v = _views()
    s = NetworkSeries()
    s.observe(T0 + 2000, v["supply"], [{"job_id": "j", "seen_at_ms": T0 + 100, "members": ["w2"],
                                        "certificate_hash": "c"}])
    net = network_view(s, v, [r for r in [*_raw_earnings()]], now_ms=T0 + 2000, public=False)
    assert net["gpus_online"]["total"] == 9 and net["jobs_seen_24h"] == 1 and net["clusters_24h"] == 1
    assert net["paid_30d"] == 350  # 300 paid to w2 + 50 paid to us; the MINT row and the owed row are not SOL paid
    assert net["earnings"][-1] == {"t_ms": T0, "paid": 50, "expected": 70}
    for name in PLOTS:
        root = ET.fromstring(plot_svg(name, net, s, now_ms=T0 + 2000))
        assert root.tag == f"{SVG}svg"
    with pytest.raises(KeyError):
        plot_svg("nope", net, s, now_ms=T0)


def _raw_earnings() -> list[dict[str, Any]]:
    return [{"amount": 50, "currency": "SOL", "status": "paid", "created_ms": T0, "paid_ms": T0 + 5},
            {"amount": 70, "currency": "SOL", "status": "expected", "created_ms": T0 + 7}]


# ------------------------------------------------------------------ plots


@pytest.mark.parametrize("label", HOSTILE)
def test_plots_escape_every_hostile_label(label: str) -> None:
    for svg in (line_chart(label, [(label, [(T0, 1.0), (T0 + minute_ms, 2.0)])], now_ms=T0 + 2 * minute_ms,
                           window_ms=hour_ms),
                bar_chart(label, [(T0, 3.0)], bucket_ms=hour_ms), hbar_chart(label, [(label, 5.0)])):
        root = ET.fromstring(svg)  # well-formed XML whatever the label holds
        tags = {el.tag.removeprefix(SVG) for el in root.iter()}
        assert tags <= {"svg", "title", "rect", "text", "line", "path"}, tags
        assert not any(k.startswith("on") for el in root.iter() for k in el.attrib)
        texts = "".join(el.text or "" for el in root.iter())
        if label.startswith("<img"):
            assert "<img" in texts and "<img" not in svg  # shown as text, never as markup


@given(st.text(max_size=200))
@settings(max_examples=200, deadline=None)
def test_any_text_gives_well_formed_svg(label: str) -> None:
    ET.fromstring(hbar_chart(label, [(label, 1.0)]))
    assert len(text(label)) <= 6 * 40  # escaped, capped at 40 characters


def test_nice_max() -> None:
    assert [nice_max(v) for v in (0, 0.3, 1, 3, 7, 10, 11, 4500)] == [1, 0.5, 1, 5, 10, 10, 20, 5000]


def test_empty_plots_say_so() -> None:
    assert "nothing yet" in bar_chart("t", [(T0, 0)], bucket_ms=hour_ms)
    assert "no data yet" in line_chart("t", [], now_ms=T0, window_ms=hour_ms)


# ----------------------------------------------------------------- public


def test_public_views_keep_only_public_fields() -> None:
    v = _views()
    v["errors"] = {"status": "/root/.p2pgpu/control.json is unreadable"}
    v["jobs"]["rows"] = [{"job_id": "j", "state": "failed", "reason": "refused: /root/.p2pgpu/jobs/j/work: EACCES",
                          "outputs": [{"path": "secret.txt"}], "member_outputs": {}, "exit_code": 3,
                          "members": [], "name": "x", "new_field_of_a_newer_daemon": "?"}]
    v["network"] = network_view(NetworkSeries(), v, _raw_earnings(), now_ms=T0 + 2000, public=False)
    pub = public_views(v)
    assert pub["public"] is True and pub["errors"] == {}
    assert pub["jobs"]["rows"] == [{"job_id": "j", "state": "failed", "members": [], "name": "x"}]
    assert all(set(r) <= set(PUBLIC_FIELDS["payouts"]) for r in pub["payouts"]["rows"])
    assert "error" not in str(pub["payouts"]["rows"])
    assert all("expected" not in p for p in pub["network"]["earnings"])
    assert "/root" not in str(pub)
    assert v["jobs"]["rows"][0]["reason"]  # the private views are untouched


def test_rate_limiter() -> None:
    rl = RateLimiter(requests_per_s=2, burst=3, clients_max=2, streams_per_client=1)
    assert [rl.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b", 0.0)  # another client has its own bucket
    assert rl.allow("a", 0.5) and not rl.allow("a", 0.5)  # refilled at 2 per second
    rl.allow("c", 1.0)  # a third client: the least recently seen ("b") is forgotten
    assert set(rl._buckets) == {"a", "c"} and rl.refused == 2
    assert rl.may_open_stream("a")
    rl.open_stream("a")
    assert not rl.may_open_stream("a") and rl.may_open_stream("b")
    rl.close_stream("a")
    assert rl.may_open_stream("a") and rl._streams == {}


@pytest.mark.parametrize(("text_", "want"), [
    ("0.0.0.0:8080", ("0.0.0.0", 8080)), ("127.0.0.1", ("127.0.0.1", 9000)), ("[::1]:81", ("::1", 81)),
    ("[::]", ("::", 9000)), ("example.org:0", ("example.org", 0)),
])
def test_parse_bind(text_: str, want: tuple[str, int]) -> None:
    assert parse_bind(text_, 9000) == want


@pytest.mark.parametrize("bad", ["::1:80", "[::1", ":80", "host:http", "[::1]x"])
def test_parse_bind_refuses(bad: str) -> None:
    with pytest.raises(CliError):
        parse_bind(bad, 9000)
