"""A Ray member's supervisor, run *inside* the job's sandbox: starts Ray, watches it, runs the driver.

Every process of a ``ray`` job runs in the member's bubblewrap sandbox, on
the member's own network (``_netns``): this script is the sandbox's command
(``python -I -c <this file> CONFIG``, so no package of the node is needed
inside, only Ray).  It reports to the node through the event pipe
(``events_fd``), one JSON object per line, and exits with the driver's
status (rank 0) or when its Ray stops (the others).  The node never trusts
these events beyond the job itself: they only say when the job's own
cluster is up, who it lost, and that its driver started.

Rank 0: ``ray start --head`` on the member's sandbox address, then
``{"event": "ray_started", "host", "gcs_port"}``; it watches the job's GCS
(``ray._raylet.GcsClient``) and reports ``{"event": "nodes", "alive",
"dead"}`` when that changes (a member's rank is read from the
``p2pgpu_member_<rank>`` resource its node declares); once every rank is
alive, ``nodes_ready``, then it starts the driver (the manifest's command,
with ``RAY_ADDRESS``), whose stdout and stderr are the sandbox's, reports
``entrypoint_started``, and exits with the driver's status.

Other ranks: wait until the head's GCS answers, ``ray start --address``,
``ray_started``, then wait; the node stops the sandbox when the job ends.
If Ray stops by itself (the head is gone), ``{"event": "ray_stopped"}`` and
exit 1.  A ``ray start`` that fails is retried until ``start_timeout_s``,
then ``{"event": "error", "detail"}`` and exit 1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

MEMBER_RESOURCE = "p2pgpu_member_"
READY_MARK = b"Ray runtime started"
EXIT_RAY_FAILED = 1


def node_ranks(nodes: Mapping[Any, object], alive_state: int) -> tuple[list[int], list[int]]:
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


class Supervisor:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.events = os.fdopen(int(cfg["events_fd"]), "w", buffering=1)
        os.set_inheritable(self.events.fileno(), False)  # no child of ours gets it
        self.log_path = os.path.join(cfg["temp_dir"], "ray-start.log")

    def emit(self, event: str, **info: Any) -> None:
        try:
            self.events.write(json.dumps({"event": event, **info}) + "\n")
        except OSError:
            pass  # the node stopped listening: it is tearing the sandbox down

    def start_argv(self) -> list[str]:
        c = self.cfg
        a = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", f"--node-ip-address={c['node_ip']}",
             f"--temp-dir={c['temp_dir']}", f"--num-cpus={c['num_cpus']}", f"--num-gpus={c['num_gpus']}",
             "--resources=" + json.dumps({f"{MEMBER_RESOURCE}{c['rank']}": 1}),
             f"--memory={c['memory']}", f"--object-store-memory={c['object_store']}", "--disable-usage-stats",
             "--log-style=record", "--log-color=false"]
        if c["rank"] == 0:
            a += ["--head", f"--port={c['gcs_port']}", "--include-dashboard=false", "--no-monitor"]
        else:
            a.append(f"--address={c['head_ip']}:{c['gcs_port']}")
        return a

    def wait_gcs(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            try:
                socket.create_connection((self.cfg["head_ip"], self.cfg["gcs_port"]), timeout=2).close()
                return True
            except OSError:
                time.sleep(0.2)
        return False

    def start_ray(self) -> subprocess.Popen[bytes] | None:
        """``ray start --block`` until it says it is up; retried until the deadline."""
        deadline = time.monotonic() + float(self.cfg["start_timeout_s"])
        if self.cfg["rank"] != 0 and not self.wait_gcs(deadline):
            self.emit("error", detail=f"the head's GCS at {self.cfg['head_ip']}:{self.cfg['gcs_port']} never answered")
            return None
        tail = b""
        while time.monotonic() < deadline:
            with open(self.log_path, "wb") as log:
                proc = subprocess.Popen(self.start_argv(), stdin=subprocess.DEVNULL, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            while time.monotonic() < deadline and proc.poll() is None:
                with open(self.log_path, "rb") as log:
                    if READY_MARK in log.read():
                        return proc
                time.sleep(0.1)
            with open(self.log_path, "rb") as log:
                tail = log.read()[-600:]
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            self.emit("ray_start_retry", tail=tail.decode(errors="replace")[-300:])
            time.sleep(1.0)
        self.emit("error", detail="ray did not start: " + tail.decode(errors="replace")[-300:])
        return None

    def watch_until_ready(self, ray_proc: subprocess.Popen[bytes]) -> Any:
        from ray._raylet import GcsClient  # type: ignore[attr-defined]  # the heavy import, only here
        from ray.core.generated import gcs_pb2

        client = GcsClient(address=f"{self.cfg['node_ip']}:{self.cfg['gcs_port']}")
        self.alive_state = gcs_pb2.GcsNodeInfo.ALIVE  # type: ignore[attr-defined]
        everyone = list(range(int(self.cfg["world_size"])))
        while ray_proc.poll() is None:
            if self.poll_nodes(client) == everyone:
                return client
            time.sleep(float(self.cfg["watch_interval_s"]))
        return None

    last: tuple[list[int], list[int]] | None = None
    alive_state = 0

    def poll_nodes(self, client: Any) -> list[int]:
        try:
            now = node_ranks(client.get_all_node_info(timeout=5), self.alive_state)
        except Exception as exc:  # noqa: BLE001 - any GCS error: reported, retried by the caller
            self.emit("gcs_error", detail=str(exc)[:300])
            return []
        if now != self.last:
            self.last = now
            self.emit("nodes", alive=now[0], dead=now[1])
        return now[0]

    def run_head(self, ray_proc: subprocess.Popen[bytes]) -> int:
        client = self.watch_until_ready(ray_proc)
        if client is None:
            self.emit("error", detail="the head's Ray stopped before every member joined")
            return EXIT_RAY_FAILED
        self.emit("nodes_ready")
        env = dict(os.environ, RAY_ADDRESS=f"{self.cfg['node_ip']}:{self.cfg['gcs_port']}")
        try:
            driver = subprocess.Popen(self.cfg["command"], env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            self.emit("error", detail=f"cannot run the entrypoint: {exc}")
            return EXIT_RAY_FAILED
        self.emit("entrypoint_started")
        while driver.poll() is None:
            self.poll_nodes(client)
            time.sleep(float(self.cfg["watch_interval_s"]))
        code = driver.returncode
        status = 128 - code if code < 0 else code
        self.emit("driver_exited", code=status)
        return status

    def main(self) -> int:
        os.makedirs(self.cfg["temp_dir"], exist_ok=True)
        ray_proc = self.start_ray()
        if ray_proc is None:
            return EXIT_RAY_FAILED
        self.emit("ray_started", host=self.cfg["node_ip"], gcs_port=int(self.cfg["gcs_port"]))
        if self.cfg["rank"] == 0:
            return self.run_head(ray_proc)
        ray_proc.wait()
        with open(self.log_path, "rb") as log:
            tail = log.read()[-300:].decode(errors="replace")
        self.emit("ray_stopped", detail=tail)
        return EXIT_RAY_FAILED


if __name__ == "__main__":
    sys.exit(Supervisor(json.loads(sys.argv[1])).main())
