"""The job keeper: the sandbox's parent, which kills it when the node dies or the hard limit passes.

Run as ``python -I _keeper.py NODE_PID LIMIT_S [--scratch DIR] [--mount DIR]
[--cgroup DIR]... [--netns NAME --nft TABLE --claim FILE] -- COMMAND...`` (by path, so no package is imported: it
starts in tens of milliseconds).  It starts COMMAND (the cgroup wrapper that
``exec``\\ s bubblewrap) as its child, in a process group of its own, and
waits for the first of three things:

- the child exits: the keeper exits with the same status (128+N for a
  signal N), so the node sees what it would have seen;
- the node dies (``NODE_PID`` is watched through a pidfd, which fires when
  the whole process is gone, however it ended, ``kill -9`` included): the
  keeper SIGKILLs the child's group, waits for it, then takes away what
  the sandbox left on the host (``--mount`` unmounted, ``--scratch``
  deleted, ``--cgroup`` emptied and removed, the member's network namespace,
  firewall table and subnet claim removed), and exits;
- ``LIMIT_S`` seconds pass (the job's time limit plus a grace): it SIGKILLs
  the child's group and exits (the node, alive, cleans up).

Why a process of our own and not ``--die-with-parent`` on the node: trio
starts processes from a worker thread, and the parent-death signal follows
the *thread* that forked (trio's idle worker threads exit after 10 s, which
killed every job 10 s in).  So the node starts the keeper, the keeper's only
thread starts bubblewrap with ``--die-with-parent`` (so killing the keeper
kills the sandbox too), and bubblewrap's death takes the job's pid namespace
with it.  The node records the keeper's pid and start time, so that a
restarted node can finish the job if even the keeper was killed
(``_leftovers``).

Standard library only (and ``_walk`` and ``_netns`` beside it); it prints nothing (its
stdout and stderr are the job's), and exits 125 when it cannot start.
"""

from __future__ import annotations

import importlib
import os
import select
import signal
import subprocess
import sys
import time

#: How often the keeper rechecks the node where no pidfd exists.
poll_s = 0.5
#: How long the keeper waits for the killed sandbox, and for its cgroups to empty.
drain_s = 10.0
EXIT_CANNOT_START = 125
EXIT_KILLED = 128 + signal.SIGKILL
_HOST_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_PATH_OPTIONS = ("--scratch", "--mount", "--cgroup", "--claim")


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _parse(argv: list[str]) -> tuple[int, float, dict[str, list[str]], list[str]] | None:
    if "--" not in argv or len(argv) < 3:
        return None
    cut = argv.index("--")
    head, command = argv[:cut], argv[cut + 1:]
    try:
        node_pid, limit_s = int(head[0]), float(head[1])
    except (ValueError, IndexError):
        return None
    opts: dict[str, list[str]] = {"--scratch": [], "--mount": [], "--cgroup": [], "--netns": [], "--nft": [],
                                  "--claim": []}
    rest = head[2:]
    if len(rest) % 2 or not command:
        return None
    for name, value in zip(rest[::2], rest[1::2], strict=True):
        if name not in opts or (name in _PATH_OPTIONS and not os.path.isabs(value)):
            return None
        opts[name].append(value)
    return node_pid, limit_s, opts, command


def _kill(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        child.kill()


def _cleanup(opts: dict[str, list[str]]) -> None:
    """The node is gone: take away what its sandbox left (best effort; a
    restarted node's ``reap_leftovers`` finishes whatever is left)."""
    for cg in opts["--cgroup"]:
        deadline = time.monotonic() + drain_s
        while os.path.isdir(cg) and time.monotonic() < deadline:
            try:
                with open(os.path.join(cg, "cgroup.procs")) as f:
                    for pid in f.read().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except (OSError, ValueError):
                            continue
                os.rmdir(cg)
            except OSError:
                time.sleep(0.05)
    for mount in opts["--mount"]:
        if os.path.ismount(mount):
            for flags in ([], ["-l"]):
                subprocess.run(["umount", *flags, mount], env={"PATH": _HOST_PATH}, capture_output=True,
                               check=False, timeout=60)
                if not os.path.ismount(mount):
                    break
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # -I left it out; stdlib-only modules
    for scratch in opts["--scratch"]:
        if not any(os.path.ismount(m) for m in opts["--mount"]):
            importlib.import_module("_walk").remove_tree(scratch)
    for netns, table, claim in zip(opts["--netns"], opts["--nft"], opts["--claim"], strict=False):
        importlib.import_module("_netns").remove_member_net(netns=netns, table=table, claim=claim)


def main(argv: list[str]) -> int:
    parsed = _parse(argv)
    if parsed is None:
        return EXIT_CANNOT_START
    node_pid, limit_s, opts, command = parsed
    node_fd = _pidfd(node_pid)
    if os.getppid() != node_pid:  # the node died before we could watch it
        _cleanup(opts)
        return EXIT_KILLED
    keep = tuple(int(fd) for fd in os.environ.pop("P2PGPU_KEEPER_PASS_FDS", "").split(",") if fd)
    try:
        # Its own group, so that killing it never kills us mid-cleanup;
        # bwrap's --die-with-parent follows this, our only thread.
        child = subprocess.Popen(command, pass_fds=keep, close_fds=True, process_group=0)
    except OSError:
        return EXIT_CANNOT_START
    for fd in keep:
        os.close(fd)  # only the child holds them now (bubblewrap's status pipe, its environment)
    deadline = time.monotonic() + limit_s
    child_fd = _pidfd(child.pid)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            _kill(child)
            child.wait()
            return EXIT_KILLED
        wait_s = min(left, poll_s) if node_fd is None or child_fd is None else left
        fds = [fd for fd in (node_fd, child_fd) if fd is not None]
        try:
            ready, _, _ = select.select(fds, [], [], wait_s)
        except InterruptedError:
            continue
        if child_fd in ready or child.poll() is not None:
            return _status(child.wait())
        if node_fd in ready or os.getppid() != node_pid:
            _kill(child)
            try:
                child.wait(timeout=drain_s)
            except subprocess.TimeoutExpired:
                pass  # the cgroup kill below, and the restarted node, finish it
            _cleanup(opts)
            return EXIT_KILLED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
