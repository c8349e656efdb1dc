"""What a process left behind, read from /proc: its process tree, the TCP
ports it listens on, and the processes that name a directory on their command
line.  Used by the tests that kill a parent and check that nothing of it
survives (``test_procs_*.py``).  A zombie counts as gone: it runs nothing and
holds no socket (this machine's init does not always reap orphans).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()  # state ppid pgrp session ...


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def process_tree(root: int) -> list[int]:
    """``root`` and every live descendant of it."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None and fields[0] != "Z":
                kids.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if alive(pid):
            out.append(pid)
        todo.extend(kids.get(pid, []))
    return sorted(out)


def _listen_inodes() -> dict[int, int]:
    """Socket inode -> port of every TCP socket in LISTEN state (IPv4 and IPv6)."""
    out: dict[int, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A":  # TCP_LISTEN
                out[int(f[9])] = int(f[1].rsplit(":", 1)[1], 16)
    return out


def _socket_inodes(pid: int) -> set[int]:
    found: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def listening_ports(pids: list[int]) -> dict[int, int]:
    """Port -> pid for every TCP port on which one of ``pids`` listens."""
    listen = _listen_inodes()
    out: dict[int, int] = {}
    for pid in pids:
        for inode in _socket_inodes(pid):
            if inode in listen:
                out[listen[inode]] = pid
    return out


def listeners_on(ports: set[int]) -> dict[int, list[int]]:
    """Port -> live pids still listening on it (any process on the machine)."""
    listen = {inode: port for inode, port in _listen_inodes().items() if port in ports}
    out: dict[int, list[int]] = {}
    if not listen:
        return out
    for entry in os.listdir("/proc"):
        if entry.isdigit() and alive(int(entry)):
            for inode in _socket_inodes(int(entry)) & set(listen):
                out.setdefault(listen[inode], []).append(int(entry))
    return out


def naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (e.g. a test's directory)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and alive(int(entry)):
            out.append(int(entry))
    return sorted(out)


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` is alive; return those still alive at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def kill_all(pids: list[int], marker: str) -> None:
    """Clean up after a failing test: SIGKILL each pid that is still alive and
    still names ``marker`` (the test's directory) on its command line, so that
    a recycled pid is never hit."""
    for pid in sorted(set(pids) | set(naming(marker))):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if alive(pid) and marker in cmdline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
