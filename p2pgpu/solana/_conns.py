"""Which connections the ledger server keeps when a flood fills its table.

The server (``_server.py``) holds at most ``capacity`` connections, HTTP and
websocket together, below the process's file-descriptor limit.  A stranger
who opens connections and holds them open must not be able to lock everyone
else out (issue #18.7: 21,000 idle connections made every request time out),
so a full table never refuses a newcomer: it closes the connection that is
least likely to be in use to make room, and admits the new one.

Least likely to be in use: a connection that is *idle* (no HTTP request under
way, or a websocket without subscriptions) before one that is busy; among
those, the one whose last activity is oldest.  A newcomer pushes out the
oldest idle holder first, so an honest client's fresh connection survives
until a full table's worth of newer connections arrived after it, and its
request (milliseconds) is long done by then.

Pure: no sockets and no clock; the driver passes ``now`` and carries out the
eviction (it cancels what :meth:`ConnectionTable.admit` returns).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(eq=False, kw_only=True)
class Conn:
    """One connection the server holds."""

    kind: str  # "http" or "ws"
    close: Callable[[], None]  # how the driver makes it go (cancels its task)
    opened_at: float
    last_active: float
    busy: bool = False  # an HTTP request partly read or being answered; a websocket holding subscriptions


class ConnectionTable:
    """The connections one server holds, at most ``capacity``; every
    operation is O(1) (two queues, least recently active first)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._idle: OrderedDict[int, Conn] = OrderedDict()
        self._busy: OrderedDict[int, Conn] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._idle) + len(self._busy)

    def admit(self, *, kind: str, close: Callable[[], None], now: float) -> tuple[Conn, Conn | None]:
        """Register a new (idle) connection; when the table is full, also
        return the connection to close to make room for it (already removed)."""
        victim = None
        if len(self) >= self.capacity:
            victim = self.victim()
            if victim is not None:
                self.release(victim)
                self.evicted += 1
        conn = Conn(kind=kind, close=close, opened_at=now, last_active=now)
        self._idle[id(conn)] = conn
        return conn, victim

    def touch(self, conn: Conn, *, busy: bool, now: float) -> None:
        """``conn`` was active at ``now`` and is now busy or idle."""
        key = id(conn)
        if key not in self._idle and key not in self._busy:
            return  # already evicted: its task is on its way out
        (self._busy if conn.busy else self._idle).pop(key)
        conn.busy, conn.last_active = busy, now
        (self._busy if busy else self._idle)[key] = conn

    def release(self, conn: Conn) -> None:
        self._idle.pop(id(conn), None)
        self._busy.pop(id(conn), None)

    def victim(self) -> Conn | None:
        """The idle connection inactive the longest, else the least recently active busy one."""
        for queue in (self._idle, self._busy):
            for conn in queue.values():
                return conn
        return None
