"""Reachability decisions (``core/_reach.py``): address scopes, what a node
advertises and dials, AutoNAT verdicts, the relay's limits, hole-punch
attempts and relay choice.  Pure: events and ``now_ms`` in, decisions out."""

from __future__ import annotations

import random

import pytest

from p2pgpu.core import (
    CircuitCut,
    Identity,
    PunchBook,
    PunchLimits,
    Reachability,
    ReachabilityTracker,
    ReachLimits,
    RelayBook,
    RelayLimits,
    RelayRefusal,
    Scope,
    advertised_addrs,
    check_advert_addr,
    choose_relays,
    dialable,
    ip_scope,
    needs_relay,
    parse_addr,
)

ME = Identity.from_rng(random.Random(1)).peer_id
RELAY = Identity.from_rng(random.Random(2)).peer_id
OTHER = Identity.from_rng(random.Random(3)).peer_id


@pytest.mark.parametrize(("ip", "scope"), [
    ("127.0.0.1", Scope.LOOPBACK), ("::1", Scope.LOOPBACK), ("127.9.9.9", Scope.LOOPBACK),
    ("10.0.1.2", Scope.PRIVATE), ("172.16.5.1", Scope.PRIVATE), ("192.168.1.1", Scope.PRIVATE),
    ("100.64.0.1", Scope.PRIVATE), ("169.254.1.1", Scope.PRIVATE), ("fd00::1", Scope.PRIVATE),
    ("fe80::1", Scope.PRIVATE), ("::ffff:10.0.0.1", Scope.PRIVATE),
    # documentation prefixes stand for the internet in the NAT lab
    ("198.51.100.2", Scope.PUBLIC), ("203.0.113.9", Scope.PUBLIC), ("8.8.8.8", Scope.PUBLIC),
    ("2001:db8::1", Scope.PUBLIC), ("172.32.0.1", Scope.PUBLIC),
    ("0.0.0.0", None), ("::", None), ("224.0.0.1", None), ("ff02::1", None), ("255.255.255.255", None),
    ("240.0.0.1", None), ("not-an-ip", None), ("", None),
])
def test_ip_scope(ip: str, scope: Scope | None) -> None:
    assert ip_scope(ip) == scope


def test_parse_addr_direct_and_relay() -> None:
    a = parse_addr(f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}")
    assert a is not None and a.peer == RELAY and not a.is_relay and a.scope is Scope.PUBLIC
    assert a.transport() == "/ip4/198.51.100.3/tcp/4001"
    r = parse_addr(f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}")
    assert r is not None and r.is_relay and r.peer == ME and r.relay is not None and r.relay.peer == RELAY
    assert str(r) == f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}"
    assert r.scope is Scope.PUBLIC
    six = parse_addr("/ip6/2001:db8::1/tcp/4001")
    assert six is not None and six.scope is Scope.PUBLIC and six.peer is None
    assert parse_addr("/dns4/relay.example.org/tcp/443").scope is Scope.PUBLIC  # type: ignore[union-attr]


@pytest.mark.parametrize("text", [
    "", "ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4", "/ip4/1.2.3.4/udp/1", "/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/tcp/65536",
    "/ip4/1.2.3.4/tcp/x", "/ip4/::1/tcp/1", "/ip6/1.2.3.4/tcp/1", "/ip4/1.2.3.999/tcp/1", "/dns4/a_b/tcp/1",
    "/ip4/1.2.3.4/tcp/1/p2p", "/ip4/1.2.3.4/tcp/1/p2p/short", "/ip4/1.2.3.4/tcp/1/ws",
    "/ip4/1.2.3.4/tcp/1/p2p-circuit",  # a relay address needs its relay's peer id
    f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/{RELAY}",
    f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}/p2p-circuit/p2p-circuit",
    f"/ip4/1.2.3.4/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/{ME}/x",
    "/" + "a" * 600,
])
def test_parse_addr_refuses(text: str) -> None:
    assert parse_addr(text) is None


def test_check_advert_addr() -> None:
    assert check_advert_addr(f"/ip4/198.51.100.2/tcp/4001/p2p/{ME}", ME) is None
    assert check_advert_addr("/ip4/198.51.100.2/tcp/4001", ME) is None
    assert check_advert_addr(f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}", ME) is None
    assert "another peer" in (check_advert_addr(f"/ip4/198.51.100.2/tcp/4001/p2p/{OTHER}", ME) or "")
    assert "another peer" in (check_advert_addr(
        f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{OTHER}", ME) or "")
    assert "own relay" in (check_advert_addr(f"/ip4/198.51.100.3/tcp/4001/p2p/{ME}/p2p-circuit", ME) or "")
    assert "cannot be dialled" in (check_advert_addr("/ip4/0.0.0.0/tcp/4001", ME) or "")


def test_dialable_keeps_only_our_world_and_relays() -> None:
    addrs = ["/ip4/10.0.1.2/tcp/4011", "/ip4/127.0.0.1/tcp/1", "/ip4/198.51.100.11/tcp/4011",
             f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}", "garbage",
             f"/ip4/10.9.9.9/tcp/1/p2p/{RELAY}/p2p-circuit/p2p/{ME}"]
    assert dialable(addrs, Scope.PUBLIC) == [
        "/ip4/198.51.100.11/tcp/4011", f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}"]
    # a hostile advert cannot make a node on the internet dial its own LAN
    assert dialable(["/ip4/10.0.0.1/tcp/22"], Scope.PUBLIC) == []
    assert dialable(addrs, Scope.LOOPBACK) == ["/ip4/127.0.0.1/tcp/1"]
    # before we know our world: everything dialable, narrowest first, relays last
    assert dialable(addrs, None)[:3] == ["/ip4/127.0.0.1/tcp/1", "/ip4/10.0.1.2/tcp/4011",
                                         "/ip4/198.51.100.11/tcp/4011"]


def _tracker(k: int = 2) -> ReachabilityTracker:
    return ReachabilityTracker(ReachLimits(confirmations=k))


def test_reachability_public_needs_k_distinct_ips() -> None:
    t = _tracker(2)
    t.record(server="s1", server_ip="198.51.100.2", ok=True, addr="/ip4/198.51.100.3/tcp/4001", now_ms=0)
    assert t.status(0)[0] is Reachability.UNKNOWN
    # a second identity at the same IP confirms nothing more (Sybils are cheap)
    t.record(server="s1b", server_ip="198.51.100.2", ok=True, addr="/ip4/198.51.100.3/tcp/4001", now_ms=1)
    assert t.status(1)[0] is Reachability.UNKNOWN
    t.record(server="s2", server_ip="198.51.100.11", ok=True, addr="/ip4/198.51.100.3/tcp/4001", now_ms=2)
    state, why = t.status(2)
    assert state is Reachability.PUBLIC and "198.51.100.3" in why
    assert t.confirmed_addrs(2, Scope.PUBLIC) == ["/ip4/198.51.100.3/tcp/4001"]


def test_reachability_private_and_why() -> None:
    t = _tracker(2)
    for i, ip in enumerate(["198.51.100.2", "198.51.100.3"]):
        t.record(server=f"s{i}", server_ip=ip, ok=False, detail="dial timed out", now_ms=i)
    state, why = t.status(5)
    assert state is Reachability.PRIVATE and "dial timed out" in why and "relays" in why
    assert t.confirmed_addrs(5, Scope.PUBLIC) == []
    # one success among failures: not sure any more
    t.record(server="s9", server_ip="198.51.100.9", ok=True, addr="/ip4/198.51.100.11/tcp/4011", now_ms=6)
    assert t.status(6)[0] is Reachability.UNKNOWN


def test_reachability_verdicts_expire_and_latest_counts() -> None:
    t = ReachabilityTracker(ReachLimits(confirmations=1, verdict_ttl_ms=1000))
    t.record(server="s", server_ip="198.51.100.2", ok=False, now_ms=0)
    assert t.status(0)[0] is Reachability.PRIVATE
    t.record(server="s", server_ip="198.51.100.2", ok=True, addr="/ip4/198.51.100.9/tcp/1", now_ms=10)
    assert t.status(10)[0] is Reachability.PUBLIC  # the latest verdict of a server replaces its earlier one
    assert t.status(2000) == (Reachability.UNKNOWN, "no peer has tried to dial us back yet")


def test_reachability_world_is_the_widest_server_scope() -> None:
    t = _tracker(1)
    # a LAN sibling dialled our private address; the internet could not dial us
    t.record(server="lan", server_ip="10.0.1.3", ok=True, addr="/ip4/10.0.1.2/tcp/4011", now_ms=0)
    t.record(server="pub", server_ip="198.51.100.2", ok=False, now_ms=1)
    assert t.status(1)[0] is Reachability.PRIVATE
    assert t.confirmed_addrs(1, Scope.PUBLIC) == []
    assert t.status(1, Scope.PRIVATE)[0] is Reachability.PUBLIC


def test_reachability_table_is_bounded_and_ignores_junk() -> None:
    t = ReachabilityTracker(ReachLimits(confirmations=1, servers_max=4))
    for i in range(10):
        t.record(server=f"s{i}", server_ip=f"198.51.100.{i + 2}", ok=False, now_ms=i)
    assert len(t.verdicts) == 4 and "s9" in t.verdicts and "s0" not in t.verdicts
    assert t.record(server="x", server_ip="0.0.0.0", ok=True, addr="/ip4/1.2.3.4/tcp/1", now_ms=0) is None
    assert t.record(server="x", server_ip="198.51.100.2", ok=True, addr="junk", now_ms=0) is None
    relay = f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}"
    assert t.record(server="x", server_ip="198.51.100.2", ok=True, addr=relay, now_ms=0) is None


def test_reachability_due_asks_each_server_once_per_recheck() -> None:
    t = ReachabilityTracker(ReachLimits(recheck_ms=100, queries_per_round_max=2))
    assert t.due(["a", "b", "c"], 0) == ["a", "b"]
    assert t.due(["a", "b", "c"], 1) == ["c"]
    assert t.due(["a", "b", "c"], 50) == []
    assert t.due(["a", "b", "c"], 100) == ["a", "b"]


LISTEN_NAT = ["/ip4/10.0.1.2/tcp/4011", "/ip4/127.0.0.1/tcp/4011"]
LISTEN_PUBLIC = ["/ip4/198.51.100.2/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]
CIRCUIT = f"/ip4/198.51.100.3/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{ME}"


def test_a_node_behind_nat_advertises_only_its_relay() -> None:
    got = advertised_addrs(announce=[], confirmed=[], listen=LISTEN_NAT, relay=[CIRCUIT], world=Scope.PUBLIC,
                           reachability=Reachability.UNKNOWN)
    assert got == [CIRCUIT]
    assert needs_relay(advertised_direct=0, reachability=Reachability.UNKNOWN)


def test_a_public_node_advertises_its_public_address_only() -> None:
    got = advertised_addrs(announce=[], confirmed=[], listen=LISTEN_PUBLIC, relay=[], world=Scope.PUBLIC,
                           reachability=Reachability.UNKNOWN)
    assert got == ["/ip4/198.51.100.2/tcp/4001"]
    assert not needs_relay(advertised_direct=1, reachability=Reachability.PUBLIC)


def test_a_firewalled_public_address_is_dropped_when_found_private() -> None:
    got = advertised_addrs(announce=[], confirmed=[], listen=LISTEN_PUBLIC, relay=[CIRCUIT], world=Scope.PUBLIC,
                           reachability=Reachability.PRIVATE)
    assert got == [CIRCUIT]
    assert needs_relay(advertised_direct=1, reachability=Reachability.PRIVATE)


def test_a_forwarded_port_is_advertised_once_confirmed_or_announced() -> None:
    fwd = "/ip4/198.51.100.11/tcp/4011"
    assert advertised_addrs(announce=[], confirmed=[fwd], listen=LISTEN_NAT, relay=[], world=Scope.PUBLIC,
                            reachability=Reachability.PUBLIC) == [fwd]
    assert advertised_addrs(announce=[fwd], confirmed=[], listen=LISTEN_NAT, relay=[], world=Scope.PUBLIC,
                            reachability=Reachability.PRIVATE) == [fwd]


def test_a_loopback_network_keeps_loopback_addresses() -> None:
    assert advertised_addrs(announce=[], confirmed=[], listen=["/ip4/127.0.0.1/tcp/5"], relay=[],
                            world=Scope.LOOPBACK, reachability=Reachability.UNKNOWN) == ["/ip4/127.0.0.1/tcp/5"]
    # with no peer and no bootstrap yet, nothing is claimed
    assert advertised_addrs(announce=[], confirmed=[], listen=["/ip4/127.0.0.1/tcp/5"], relay=[], world=None,
                            reachability=Reachability.UNKNOWN) == []


def test_advertised_addrs_are_bounded_and_valid() -> None:
    many = [f"/ip4/198.51.100.{i}/tcp/1" for i in range(2, 30)]
    got = advertised_addrs(announce=["junk", *many[:3]], confirmed=many, listen=[], relay=["junk"],
                           world=Scope.PUBLIC, reachability=Reachability.PUBLIC)
    assert len(got) == 8 and "junk" not in got and got[:3] == many[:3]


# ----------------------------------------------------------------- relay limits


def _book(**kw: int) -> RelayBook:
    return RelayBook(RelayLimits(**kw))


def test_relay_reservations_limits() -> None:
    b = _book(reservations_max=3, reservations_per_ip_max=2, reservation_ttl_ms=1000)
    assert b.reserve("a", "198.51.100.11", 0) == 1000
    assert b.reserve("b", "198.51.100.11", 0) == 1000
    assert b.reserve("c", "198.51.100.11", 0) is RelayRefusal.RESERVATIONS_PER_IP
    assert b.reserve("a", "198.51.100.11", 500) == 1500  # renewing one's own always works
    assert b.reserve("c", "198.51.100.12", 0) == 1000
    assert b.reserve("d", "198.51.100.13", 0) is RelayRefusal.RESERVATIONS_FULL
    b.drop_reservation("c")
    assert b.reserve("d", "198.51.100.13", 0) == 1000
    assert b.reserve("e", "198.51.100.14", 1500) == 2500  # a and b, d expired at 1000


def test_relay_circuits_need_a_reservation_and_are_bounded() -> None:
    b = _book(circuits_max=3, circuits_per_peer_max=2, circuits_per_destination_max=2)
    assert b.open_circuit("x", "dst", 0) is RelayRefusal.NO_RESERVATION
    b.reserve("dst", "198.51.100.11", 0)
    b.reserve("dst2", "198.51.100.12", 0)
    c1, c2 = b.open_circuit("x", "dst", 0), b.open_circuit("x", "dst", 0)
    assert not isinstance(c1, RelayRefusal) and not isinstance(c2, RelayRefusal)
    assert b.open_circuit("x", "dst2", 0) is RelayRefusal.CIRCUITS_PER_PEER  # source's share
    assert b.open_circuit("y", "dst", 0) is RelayRefusal.CIRCUITS_PER_DESTINATION  # destination's share
    assert not isinstance(b.open_circuit("y", "dst2", 0), RelayRefusal)
    assert b.open_circuit("z", "dst2", 0) is RelayRefusal.CIRCUITS_FULL
    b.close_circuit(c1.id)
    assert not isinstance(b.open_circuit("z", "dst2", 0), RelayRefusal)
    assert b.open_circuit("dst", "dst", 0) is RelayRefusal.SELF


def test_relay_cuts_a_circuit_over_its_bytes_or_duration() -> None:
    b = _book(circuit_bytes_max=100, circuit_duration_ms_max=1000)
    b.reserve("dst", "198.51.100.11", 0)
    c = b.open_circuit("src", "dst", 0)
    assert not isinstance(c, RelayRefusal)
    assert b.allow_bytes(c.id, 60, 10) is None
    assert b.allow_bytes(c.id, 40, 20) is None
    assert b.allow_bytes(c.id, 1, 30) is CircuitCut.BYTES
    assert c.id not in b.circuits and b.cut == {"bytes": 1}
    c2 = b.open_circuit("src", "dst", 40)
    assert not isinstance(c2, RelayRefusal)
    assert b.overdue(1040) == [] and b.overdue(1041) == [c2.id]
    assert b.allow_bytes(c2.id, 1, 1042) is CircuitCut.DURATION


def test_relay_bans_a_peer_that_keeps_hitting_limits_and_serves_the_others() -> None:
    b = _book(strikes_max=3, strike_window_ms=1000, ban_ms=5000, circuit_bytes_max=10)
    b.reserve("dst", "198.51.100.11", 0)
    for t in range(3):
        c = b.open_circuit("hog", "dst", t)
        assert not isinstance(c, RelayRefusal)
        assert b.allow_bytes(c.id, 11, t) is CircuitCut.BYTES
    assert b.open_circuit("hog", "dst", 10) is RelayRefusal.BANNED
    assert b.reserve("hog", "198.51.100.12", 10) is RelayRefusal.BANNED
    ok = b.open_circuit("honest", "dst", 10)
    assert not isinstance(ok, RelayRefusal) and b.allow_bytes(ok.id, 10, 10) is None
    assert not isinstance(b.open_circuit("hog", "dst", 5010), RelayRefusal)  # the ban ends
    assert b.status(10)["cut"] == {"bytes": 3}


def test_relay_limits_validate() -> None:
    with pytest.raises(ValueError):
        RelayLimits(circuits_max=0)
    with pytest.raises(ValueError):
        ReachLimits(confirmations=0)


# ------------------------------------------------------------- hole punching


def test_punch_book_bounds_attempts() -> None:
    p = PunchBook(PunchLimits(attempts_max=2, retry_ms=1000, spacing_ms=10))
    assert p.should_try("b", 0)
    p.started("b", 0)
    assert not p.should_try("b", 5)
    p.finished("b", False)
    assert p.should_try("b", 10)
    p.started("b", 10)
    p.finished("b", False)
    assert not p.should_try("b", 500) and p.should_try("b", 1010)
    p.started("b", 1010)
    p.finished("b", True)
    assert (p.succeeded, p.failed) == (1, 2)
    p.forget("b")
    assert p.should_try("b", 1011)


def test_choose_relays_prefers_bootstrap_spreads_and_skips_refusers() -> None:
    cands = [f"r{i}" for i in range(6)]
    got = choose_relays(candidates=cands, bootstrap=["r4"], holding=["r1"], failed_until={"r2": 100}, me="me",
                        want=3, now_ms=0)
    assert got[0] == "r4" and len(got) == 2 and "r1" not in got and "r2" not in got
    assert choose_relays(candidates=cands, bootstrap=[], holding=["r1", "r2"], failed_until={}, me="me", want=2,
                         now_ms=0) == []
    other = choose_relays(candidates=cands, bootstrap=[], holding=[], failed_until={}, me="you", want=6, now_ms=0)
    mine = choose_relays(candidates=cands, bootstrap=[], holding=[], failed_until={}, me="me", want=6, now_ms=0)
    assert sorted(other) == sorted(mine) == cands and other != mine
