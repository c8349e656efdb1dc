"""What every test shares: how the parallel run (pytest-xdist, ``scripts/test``) hands tests to workers.

``scripts/test`` runs the suite with ``-n <workers> --dist loadgroup``, and here loadgroup is
made file-wise: each test file goes whole to one worker, so a module-scoped fixture (a devnet, a
browser, an ``npm install``) is built once, not once per worker; and tests marked
``@pytest.mark.xdist_group("name")``, in any files, form one unit that runs on one worker, one
test after the other (for a resource that cannot be made per-test: see docs/testing.md).  Other
``--dist`` modes are xdist's own.
"""

from __future__ import annotations

from typing import Any

import pytest

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # xdist is in the test extra; without it the suite runs serially
    LoadScopeScheduling = None


if LoadScopeScheduling is not None:

    class LoadFileGroupScheduling(LoadScopeScheduling):  # type: ignore[misc, valid-type]
        """xdist's loadgroup (tests marked ``xdist_group("g")`` form one unit "g": its workers add
        ``@g`` to their node ids), with every other test grouped by its file, not on its own."""

        def _split_scope(self, nodeid: str) -> str:
            if nodeid.rfind("@") > nodeid.rfind("]"):  # a "]" after the "@": a parameter holding "@"
                return "group:" + nodeid.rsplit("@", 1)[-1]
            return nodeid.split("::", 1)[0]

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        if config.getoption("dist") == "loadgroup":
            return LoadFileGroupScheduling(config, log)
        return None  # xdist's own scheduler for the other modes
