"""What every test shares: how the parallel run (pytest-xdist, ``scripts/test``) hands tests to
workers, and the lock a test takes on a resource it cannot have to itself.

``scripts/test`` runs the suite with ``-n <workers> --dist loadfile``: each test file goes whole to
one worker, so a module-scoped fixture (a devnet, a browser, an ``npm install``) is built once, not
once per worker.  The longest files go first (longest-processing-time-first), so that the run
does not end with one worker alone on a minute-long end-to-end file: the order comes from
``tests/data/file_durations.json`` (seconds per file, from a full run; a file not in it counts as
the median).  Every run records what it measured in pytest's cache
(``.pytest_cache/v/p2pgpu/file_durations``): copy that file over the JSON to refresh it.  Without
``-n`` (a serial run) the order is pytest's own.

``@pytest.mark.exclusive("name")``: the test holds an exclusive file lock named ``name`` (under
``$TMPDIR/p2pgpu-test-locks/``) while it and its function-scoped fixtures run, so no two tests
marked with the same name overlap, in one run's workers or in two runs on one machine.  For a
resource that cannot be made per-test (a fixed system-wide name, a global setting); anything that
can be made unique (a port, a directory, a namespace name) is made unique instead.  xdist's own
``xdist_group`` mark is not used: with pytest 9.2 it silently groups nothing
(pytest-dev/pytest-xdist#1386).
"""

from __future__ import annotations

import fcntl
import json
import statistics
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # xdist is in the test extra; without it the suite runs serially
    LoadScopeScheduling = None

DURATIONS_JSON = Path(__file__).parent / "data" / "file_durations.json"
DURATIONS_CACHE_KEY = "p2pgpu/file_durations"
LOCK_DIR = Path(tempfile.gettempdir()) / "p2pgpu-test-locks"


def file_of(nodeid: str) -> str:
    """The file part of a node id: what comes before its first ``::``."""
    return nodeid.split("::", 1)[0]


def file_estimates(path: Path = DURATIONS_JSON) -> dict[str, float]:
    """Seconds per test file from the last recorded full run; {} when there is none to read."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {str(k): float(v) for k, v in doc.items() if isinstance(v, (int, float))}


def longest_files_first(items: list[Any], estimates: dict[str, float]) -> list[Any]:
    """``items`` with whole files ordered by their estimated time, longest first; the order of
    the tests inside a file, and of files with equal estimates, is kept."""
    default = statistics.median(estimates.values()) if estimates else 0.0
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(file_of(item.nodeid), i)

    def key(pair: tuple[int, Any]) -> tuple[float, int, int]:
        i, item = pair
        f = file_of(item.nodeid)
        return (-estimates.get(f, default), first_seen[f], i)

    return [item for _, item in sorted(enumerate(items), key=key)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[Any]) -> None:
    # Only in xdist's workers (they all sort the same way, so their collections stay identical).
    if hasattr(config, "workerinput"):
        items[:] = longest_files_first(items, file_estimates())


class _FileTimer:
    """Adds up, in the controlling process, the time each test file took (setup, call and
    teardown of each of its tests) and stores it in the cache at the end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        f = file_of(report.nodeid)
        self.seconds[f] = self.seconds.get(f, 0.0) + float(report.duration)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        cache = getattr(session.config, "cache", None)  # None with -p no:cacheprovider
        if cache is None or not self.seconds:
            return
        merged = dict(cache.get(DURATIONS_CACHE_KEY, {}))
        merged.update({f: round(s, 2) for f, s in self.seconds.items()})
        cache.set(DURATIONS_CACHE_KEY, dict(sorted(merged.items())))


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # the controller (or a serial run), not a worker
        config.pluginmanager.register(_FileTimer(), "p2pgpu-file-timer")


@contextmanager
def resource_lock(name: str, lock_dir: Path = LOCK_DIR) -> Iterator[None]:
    """Hold the exclusive lock of resource ``name`` (blocking until it is free)."""
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"exclusive resource name {name!r}: use a plain word")
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    with open(lock_dir / f"{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture(autouse=True)
def _exclusive_resources(request: pytest.FixtureRequest) -> Iterator[None]:
    names = sorted({str(m.args[0]) for m in request.node.iter_markers("exclusive")})
    with ExitStack() as stack:
        for name in names:  # always in the same order: two tests never wait on each other's
            stack.enter_context(resource_lock(name))
        yield


if LoadScopeScheduling is not None:

    class LongestFileFirstScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """xdist's loadfile (a file is one unit, run whole on one worker), with the units handed
        out in collection order, where the workers put the longest files first."""

        def __init__(self, config: pytest.Config, log: Any = None) -> None:
            super().__init__(config, log)
            config.option.loadscopereorder = False  # xdist's reorder: most tests first, not longest

        def _split_scope(self, nodeid: str) -> str:
            return file_of(nodeid)

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        if config.getoption("dist") == "loadfile":
            return LongestFileFirstScheduling(config, log)
        return None  # xdist's own scheduler for the other modes
