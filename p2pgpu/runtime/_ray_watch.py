"""The Ray node watcher: a small child process that tells the head which members' nodes are alive.

It runs on the head member as ``python -m p2pgpu.runtime._ray_watch ADDRESS``
and asks the job's GCS for its nodes every ``--interval-ms``; each time the
picture changes it prints one JSON line ``{"alive": [ranks], "dead": [ranks]}``
(a member's rank is read from the ``p2pgpu_member_<rank>`` resource its node
declares).  The runtime reads these lines to know when every member has
joined (then the entrypoint may start) and when one was declared dead by Ray
(its health check failed): that is Ray's own member-loss signal, next to the
heartbeats of ``core/_membership.py``.

It is a separate process, not a thread of the node, so that importing Ray
(and its gRPC threads, its warnings, its memory) never happens inside the
node's trio process, and so that a stuck GCS call can be killed.  It uses
``ray._raylet.GcsClient``: no driver is registered, no resources are taken.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

MEMBER_RESOURCE = "p2pgpu_member_"


def node_ranks(nodes: dict[object, object], alive_state: int) -> tuple[list[int], list[int]]:
    """(alive ranks, dead ranks) from ``GcsClient.get_all_node_info()``."""
    alive: set[int] = set()
    dead: set[int] = set()
    for info in nodes.values():
        ranks = [int(k[len(MEMBER_RESOURCE):]) for k in getattr(info, "resources_total", {})
                 if k.startswith(MEMBER_RESOURCE) and k[len(MEMBER_RESOURCE):].isdigit()]
        for r in ranks:
            (alive if getattr(info, "state", None) == alive_state else dead).add(r)
    # A rank that restarted has a dead node and an alive one: it is alive.
    return sorted(alive), sorted(dead - alive)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="p2pgpu.runtime._ray_watch")
    ap.add_argument("address")
    ap.add_argument("--interval-ms", type=int, default=500)
    args = ap.parse_args(argv)
    from ray._raylet import GcsClient  # type: ignore[attr-defined]  # the heavy import, only here
    from ray.core.generated import gcs_pb2

    client = GcsClient(address=args.address)
    last: tuple[list[int], list[int]] | None = None
    failures = 0
    while True:
        try:
            nodes = client.get_all_node_info(timeout=5)
            failures = 0
        except Exception as exc:  # noqa: BLE001 - any GCS error: report and retry, then give up
            failures += 1
            print(json.dumps({"error": str(exc)[:300]}), flush=True)
            if failures >= 10:
                return 1
            time.sleep(args.interval_ms / 1000)
            continue
        now = node_ranks(nodes, gcs_pb2.GcsNodeInfo.ALIVE)  # type: ignore[attr-defined]
        if now != last:
            print(json.dumps({"alive": now[0], "dead": now[1]}), flush=True)
            last = now
        time.sleep(args.interval_ms / 1000)


if __name__ == "__main__":
    sys.exit(main())
