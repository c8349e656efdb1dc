"""The explorer: a web page, a JSON API and Prometheus metrics over a node's view.

It runs as its own process (``p2pgpu explorer``) beside a node daemon and
reads everything through the daemon's control API, so it needs no access to
the node's keys and a crash of one never takes the other down.  It shows only
what signed data and ledger transactions establish, and lets anyone check a
proof (signature, Merkle inclusion, memo on the ledger).  ``docs/explorer.md``
describes the API and the metrics.

Public: :func:`serve_explorer`, :func:`build_app`, :class:`Collector`,
:class:`DaemonSource`, :class:`ProofChecker`, :func:`build_views`.
"""

from ._app import build_app, serve_explorer
from ._check import ProofChecker
from ._collect import Collector
from ._source import DaemonSource, MethodMissing, SourceError
from ._views import Raw, build_views

__all__ = [
    "Collector",
    "DaemonSource",
    "MethodMissing",
    "ProofChecker",
    "Raw",
    "SourceError",
    "build_app",
    "build_views",
    "serve_explorer",
]
