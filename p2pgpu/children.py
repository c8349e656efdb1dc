"""Child processes that never outlive the process that started them.

Every long-lived process the project starts (the node daemons of
``localnet``, the ledger server and explorer of ``devnet``, benchmark peers,
Ray's processes, sandboxes) should be started here, so that it goes when its
parent goes, whatever ended the parent, SIGKILL included:

* **A parent-death signal.**  Between fork and exec the child asks the kernel
  for ``die_signal`` (SIGKILL by default) when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), then checks that the parent did not die in
  between.  The kernel's "parent" is the *thread* that forked, not the
  process: trio starts processes from worker threads that exit after 10 s
  idle, which would kill the child 10 s after its start.  So every child here
  is forked by one thread that lives as long as the process (the spawner),
  whichever thread or event loop asked for it.
* **A graceful stop when there is time.**  :func:`stop` sends SIGTERM to the
  child's process group, waits a bounded grace, then SIGKILLs the group.
  :func:`sigterm_as_interrupt` makes SIGTERM and SIGHUP (what systemd,
  docker and ``timeout`` send) stop a synchronous command the way Ctrl-C
  does, so its cleanup runs and stops the children gracefully.

What the signal cannot reach, and so what a caller must handle itself: a
grandchild that the child did not start through this module (the setting is
not inherited across fork), a daemon that re-parents itself (``ray start``),
and a set-user-ID program (the kernel clears the setting at its exec).  Such
processes need a parent that watches them (a process group or session killed
as a whole, a cgroup, bubblewrap's ``--die-with-parent`` under a
single-threaded parent).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from types import FrameType
from typing import Any, TypeVar

import trio

__all__ = ["Stopped", "open_process", "sigterm_as_interrupt", "spawn", "stop", "stop_all", "stop_grace_s_default"]

#: How long :func:`stop` waits after SIGTERM before it SIGKILLs the group.
stop_grace_s_default = 10.0
#: How long :func:`stop` waits for a SIGKILLed group's leader to be reaped.
kill_wait_s_max = 10.0

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

T = TypeVar("T")


def _die_with_parent(parent_pid: int, die_signal: int) -> Callable[[], None]:
    """The ``preexec_fn`` of every child: runs in the child, after fork, before exec.

    Only async-signal-safe work: a prctl, a getppid and, if the parent is
    already gone, a kill of ourselves.
    """

    def preexec() -> None:
        if _prctl(_PR_SET_PDEATHSIG, die_signal, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before the prctl: nobody will signal us
            os.kill(os.getpid(), die_signal)

    return preexec


class _Spawner:
    """One thread, living as long as the process, that forks every child.

    Any thread (the main one, a trio worker, a test's helper thread) hands it
    a function to run and waits for the result.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _ensure_thread(self) -> None:
        with self._lock:
            # After os.fork() only the forking thread exists in the child: start a new spawner there.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._jobs = queue.SimpleQueue()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._loop, name="p2pgpu-spawner", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        jobs = self._jobs
        while True:
            fn, fut = jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller, who raises it
                fut.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread and self._pid == os.getpid():
            return fn()
        self._ensure_thread()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((fn, fut))
        try:
            return fut.result()
        except BaseException:
            # Interrupted while the spawner forks (Ctrl-C in the main thread):
            # a child started for nobody is killed as soon as it exists.
            fut.add_done_callback(_kill_orphan)
            raise


def _kill_orphan(fut: concurrent.futures.Future[Any]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return
    proc = fut.result()
    if isinstance(proc, subprocess.Popen) and proc.poll() is None:
        proc.kill()


_spawner = _Spawner()


def _check_options(options: dict[str, Any]) -> None:
    if "preexec_fn" in options:
        raise TypeError("p2pgpu.children sets preexec_fn itself (the parent-death signal)")


def spawn(argv: Sequence[str | os.PathLike[str]], *, die_signal: int = signal.SIGKILL,
          start_new_session: bool = True, **options: Any) -> subprocess.Popen[Any]:
    """``subprocess.Popen(argv, **options)`` for a child that dies with this process.

    ``die_signal`` is what the child receives when this process dies (SIGKILL:
    nothing can delay it).  ``start_new_session`` (on by default here) makes
    the child the leader of a new session and process group, so a terminal's
    Ctrl-C reaches only us and :func:`stop` can signal everything the child
    started in its group.  Any other ``Popen`` option is passed on, except
    ``preexec_fn``, which is ours.  Safe to call from any thread.
    """
    _check_options(options)
    preexec = _die_with_parent(os.getpid(), int(die_signal))
    popen: subprocess.Popen[Any] = _spawner.call(
        partial(subprocess.Popen, list(argv), preexec_fn=preexec, start_new_session=start_new_session, **options))
    return popen


async def open_process(argv: Sequence[str | os.PathLike[str]], *, die_signal: int = signal.SIGKILL,
                       start_new_session: bool = True, stdin: Any = None, stdout: Any = None, stderr: Any = None,
                       **options: Any) -> trio.Process:
    """:func:`trio.lowlevel.open_process` for a child that dies with this process.

    A drop-in replacement: the same arguments and the same
    :class:`trio.Process` (``subprocess.PIPE`` gives trio streams;
    ``stderr=subprocess.STDOUT`` shares stdout's), but the child is forked by
    the spawner thread, never by one of trio's worker threads, so its
    parent-death signal fires only when this process dies.
    """
    _check_options(options)
    for key in ("universal_newlines", "text", "encoding", "errors", "bufsize"):
        if options.get(key):
            raise TypeError(f"trio processes talk in bytes: the {key!r} option is not supported")
    streams: dict[str, Any] = {"stdin": None, "stdout": None, "stderr": None}
    with ExitStack() as child_ends, ExitStack() as ours_on_failure:
        if stdin == subprocess.PIPE:
            r, w = os.pipe()
            streams["stdin"] = trio.lowlevel.FdStream(w)
            ours_on_failure.callback(streams["stdin"].close)
            child_ends.callback(os.close, r)
            stdin = r
        if stdout == subprocess.PIPE:
            r, w = os.pipe()
            streams["stdout"] = trio.lowlevel.FdStream(r)
            ours_on_failure.callback(streams["stdout"].close)
            child_ends.callback(os.close, w)
            stdout = w
        if stderr == subprocess.STDOUT:
            if stdout is not None:
                stderr = stdout
        elif stderr == subprocess.PIPE:
            r, w = os.pipe()
            streams["stderr"] = trio.lowlevel.FdStream(r)
            ours_on_failure.callback(streams["stderr"].close)
            child_ends.callback(os.close, w)
            stderr = w
        popen = await trio.to_thread.run_sync(
            partial(spawn, argv, die_signal=die_signal, start_new_session=start_new_session, stdin=stdin,
                    stdout=stdout, stderr=stderr, **options))
        ours_on_failure.pop_all()
    # trio.Process has no public constructor; _create is how trio itself builds one.
    process: trio.Process = trio.Process._create(  # type: ignore[attr-defined]
        popen, streams["stdin"], streams["stdout"], streams["stderr"])
    return process


def stop(proc: subprocess.Popen[Any], *, grace_s: float = stop_grace_s_default, group: bool = True) -> int:
    """Stop a child started by :func:`spawn`: SIGTERM, then SIGKILL after ``grace_s``.

    With ``group`` (children started with ``start_new_session``), the signals go to
    the child's whole process group while its leader is alive, so whatever it
    started in its group goes too.  Returns the exit status.  Bounded: at most
    ``grace_s + kill_wait_s_max`` seconds.
    """
    if proc.poll() is None:
        _signal(proc, signal.SIGTERM, group)
        try:
            return proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal(proc, signal.SIGKILL, group)
    return proc.wait(timeout=kill_wait_s_max)


def stop_all(procs: Sequence[subprocess.Popen[Any]], *, grace_s: float = stop_grace_s_default,
             group: bool = True) -> None:
    """:func:`stop` several children at once: SIGTERM to all, one shared
    grace, then SIGKILL to those still running.  Bounded like :func:`stop`."""
    for proc in procs:
        if proc.poll() is None:
            _signal(proc, signal.SIGTERM, group)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        stop(proc, grace_s=max(0.0, deadline - time.monotonic()), group=group)


def _signal(proc: subprocess.Popen[Any], sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)  # pid == pgid: the leader is not reaped yet, so the group is ours
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        return  # it exited between the poll and the signal


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: stop as for Ctrl-C (a KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextmanager
def sigterm_as_interrupt(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, the first SIGTERM or SIGHUP raises :class:`Stopped`
    in the main thread, where Ctrl-C would raise KeyboardInterrupt.

    Later signals are ignored, so the cleanup the first one started (bounded
    by its own timeouts) is not itself interrupted; SIGKILL still ends
    everything, and the children go with us.  Main thread only, as Python's
    signal handlers are.
    """
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        if fired:
            return
        fired.append(signum)
        raise Stopped(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
