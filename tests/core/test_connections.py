"""Connection slots (``core/_connections.py``, #18.6), table-driven.

Admission by IP, by subnet and in total, before any handshake; room kept for
newcomers by closing the least useful peers: never protected ones, unknown
before known, idle before active, never within the grace period.
"""

from __future__ import annotations

import pytest

from p2pgpu.core import ConnectionLimits, ConnectionTable, LocalProtocolError, Refusal

LIM = ConnectionLimits(connections_max=6, newcomer_headroom=2, inbound_per_ip_max=2, inbound_per_subnet_max=3,
                       grace_ms=1_000, close_batch_max=10)

# (name, admissions in order, expected answers)
ADMISSION = [
    ("per IP", ["10.0.0.1", "10.0.0.1", "10.0.0.1"], [None, None, Refusal.PER_IP]),
    ("per /24 subnet", ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.1.1"],
     [None, None, None, Refusal.PER_SUBNET, None]),
    ("in total", ["10.0.1.1", "10.0.2.1", "10.0.3.1", "10.0.4.1", "10.0.5.1", "10.0.6.1", "10.0.7.1"],
     [None] * 6 + [Refusal.FULL]),
    ("loopback addresses are addresses too", ["127.0.0.2", "127.0.0.2", "127.0.0.2", "127.0.1.2"],
     [None, None, Refusal.PER_IP, None]),
    ("IPv6 /48", ["2001:db8:1::1", "2001:db8:1:ffff::1", "2001:db8:1:2::1", "2001:db8:1:3::1", "2001:db8:2::1"],
     [None, None, None, Refusal.PER_SUBNET, None]),
]


@pytest.mark.parametrize(("ips", "answers"), [r[1:] for r in ADMISSION], ids=[r[0] for r in ADMISSION])
def test_admission(ips: list[str], answers: list[str | None]) -> None:
    t = ConnectionTable(LIM)
    assert [t.admit(ip) for ip in ips] == answers
    assert t.inbound_open() == answers.count(None)


def test_release_frees_the_slot_and_an_unpaired_release_is_our_bug() -> None:
    t = ConnectionTable(LIM)
    assert t.admit("10.0.0.1") is None and t.admit("10.0.0.1") is None
    assert t.admit("10.0.0.1") == Refusal.PER_IP
    t.release("10.0.0.1")
    assert t.admit("10.0.0.1") is None
    t.release("10.0.0.1")
    t.release("10.0.0.1")
    assert t.per_ip == {} and t.per_subnet == {}
    with pytest.raises(LocalProtocolError):
        t.release("10.0.0.1")


def test_outbound_connections_count_toward_the_total() -> None:
    t = ConnectionTable(LIM)
    for i in range(5):
        t.connected(f"out{i}", inbound=False, now_ms=0)
    assert t.admit("10.0.0.1") is None
    assert t.admit("10.0.1.1") == Refusal.FULL


# (name, peers as (id, inbound, connected_ms, active_ms), protected, known, now, expected to close)
EVICTION = [
    ("under the trim target: nobody", [("a", True, 0, 0), ("b", True, 0, 0), ("c", True, 0, 0), ("d", True, 0, 0)],
     [], [], 5_000, []),
    ("two over: the unknown go before the known",
     [("a", True, 0, 0), ("b", True, 0, 0), ("c", True, 0, 0), ("d", True, 0, 0), ("e", True, 0, 0),
      ("f", True, 0, 0)], [], ["a", "b", "c", "d"], 5_000, ["e", "f"]),
    ("then the longest idle",
     [("a", True, 0, 3_000), ("b", True, 0, 1_000), ("c", True, 0, 4_000), ("d", True, 0, 2_000),
      ("e", True, 0, 5_000), ("f", True, 0, 4_500)], [], [], 6_000, ["b", "d"]),
    ("equally idle: the youngest connection first",
     [("a", True, 0, 500), ("b", True, 100, 500), ("c", True, 200, 500), ("d", True, 300, 500),
      ("e", True, 400, 500)],
     [], [], 5_000, ["e"]),
    ("protected peers are never closed",
     [("a", True, 0, 0), ("b", True, 0, 0), ("c", True, 0, 0), ("d", True, 0, 0), ("e", True, 0, 0),
      ("f", False, 0, 0)], ["e", "f"], [], 5_000, ["a", "b"]),
    ("connections within their grace period are not closed",
     [("a", True, 0, 3_000), ("b", True, 0, 2_000), ("c", True, 0, 1_000), ("d", True, 4_500, 4_500),
      ("e", True, 4_600, 4_600), ("f", True, 0, 500)], [], [], 5_000, ["f", "c"]),
]


@pytest.mark.parametrize(("peers", "protected", "known", "now", "closed"), [r[1:] for r in EVICTION],
                         ids=[r[0] for r in EVICTION])
def test_room_for_newcomers(peers: list[tuple[str, bool, int, int]], protected: list[str], known: list[str],
                            now: int, closed: list[str]) -> None:
    t = ConnectionTable(LIM)
    for pid, inbound, connected_ms, active_ms in peers:
        t.connected(pid, inbound=inbound, now_ms=connected_ms)
        t.touch(pid, active_ms)
    t.set_valued(protected=protected, known=known)
    assert t.to_close(now) == closed


def test_closing_is_batched_and_disconnects_are_forgotten() -> None:
    lim = ConnectionLimits(connections_max=50, newcomer_headroom=10, grace_ms=0, close_batch_max=5)
    t = ConnectionTable(lim)
    for i in range(50):
        t.connected(f"p{i:02}", inbound=True, now_ms=i)
    first = t.to_close(100)
    assert len(first) == 5
    for pid in first:
        t.disconnected(pid)
    assert len(t.to_close(100)) == 5 and len(t.peers) == 45


@pytest.mark.parametrize("kw", [{"connections_max": 4, "newcomer_headroom": 4}, {"inbound_per_ip_max": 0},
                                {"subnet_prefix_v4": 33}])
def test_limits_are_checked(kw: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ConnectionLimits(**kw)


# --- #14: connections through relays are counted by peer, not by the relay's IP ------------

def test_relayed_connections_are_counted_by_peer_not_by_the_relays_ip() -> None:
    lim = ConnectionLimits(connections_max=40, newcomer_headroom=2, inbound_per_ip_max=2, inbound_relayed_max=30,
                           inbound_relayed_per_peer_max=1)
    t = ConnectionTable(lim)
    # 20 peers behind one relay: all arrive from the relay's IP, yet each is
    # its own peer (a per-IP limit of 2 would have refused 18 of them)
    assert [t.admit_relayed(f"peer{i}") for i in range(20)] == [None] * 20
    assert t.admit_relayed("peer0") == Refusal.RELAYED_PER_PEER
    # ... and the relay's own direct connection is still one IP among others
    assert t.admit("198.51.100.3") is None
    assert t.inbound_open() == 21 and t.total() == 21
    t.release_relayed("peer0")
    assert t.admit_relayed("peer0") is None
    with pytest.raises(LocalProtocolError):
        t.release_relayed("nobody")


def test_relayed_connections_are_bounded_in_all_and_within_the_total() -> None:
    t = ConnectionTable(ConnectionLimits(connections_max=8, newcomer_headroom=2, inbound_relayed_max=5))
    assert [t.admit_relayed(f"p{i}") for i in range(6)] == [None] * 5 + [Refusal.RELAYED_FULL]
    assert [t.admit(f"10.0.{i}.1") for i in range(4)] == [None, None, None, Refusal.FULL]
    t2 = ConnectionTable(ConnectionLimits(connections_max=8, newcomer_headroom=2, inbound_relayed_max=20))
    for i in range(8):
        assert t2.admit(f"10.0.{i}.1") is None
    assert t2.admit_relayed("late") == Refusal.FULL
