"""Run Sybil hosts in a child process: ``python sybil_process.py TARGET SEED SOURCE_IP:COUNT...``.

Prints one JSON line ``{"connected": [...per source...]}`` once every host has
tried, then holds its connections until killed or its stdin closes (a killed
process is how attackers "leave": the kernel closes every socket at once).
"""

from __future__ import annotations

import json
import logging
import sys

import trio
from flood_peer import sybil_hosts


async def main(target: str, seed: int, plan: list[tuple[str, int]]) -> None:
    async with trio.open_nursery() as nursery:
        counts: list[int] = []

        async def hold(ip: str, n: int, k: int, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async with sybil_hosts(n, source_ip=ip, target=target, seed=seed + k) as got:
                counts.append(len(got))
                task_status.started()
                await trio.sleep_forever()

        for k, (ip, n) in enumerate(plan):
            await nursery.start(hold, ip, n, k)
        print(json.dumps({"connected": counts}), flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes our stdin (or kills us)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # refused dials are the point, not news
    plan = [(p.split(":")[0], int(p.split(":")[1])) for p in sys.argv[3:]]
    trio.run(main, sys.argv[1], int(sys.argv[2]), plan)
