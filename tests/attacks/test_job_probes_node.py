"""#12 (held): job code run by a real worker process probes for the node's secrets and ports.

A stranger's ``process`` job, run by a real ``node run`` worker, tries what
the first round of attacks tried and what held: reading the worker's keys,
token, wallet and database by their host paths (handed to it in its
environment, the strongest case) and through ``/proc/<pid>/root``; reading
``/proc`` for other processes, the node's environment and command line, and
``/proc/self/mountinfo`` for the home's path; connecting to the worker's
libp2p and control ports on 127.0.0.1 and calling the control API with the
token it hoped to have read; reaching a TCP listener and a UDP "DNS server"
that the test itself starts on 127.0.0.1 (no outside address is ever a
target).  Every probe reports in the job's log; the test then checks the
log, the listeners and the worker's own state.

What it guards: the sandbox's mount, pid and network namespaces
(``runtime/_sandbox.py``).  If the home were mounted, the pid namespace
shared or the network namespace the host's, a probe would succeed and a
secret or a connection would show.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from test_job_results_race import ended, logs, status

from p2pgpu.localnet import LocalNet
from p2pgpu.runtime import check_sandbox
from p2pgpu.solana._keys import PAYER_FILE

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(check_sandbox() is not None, reason=f"no sandbox here: {check_sandbox()}")]

ONE_GPU = [("NVIDIA L4", 23034, "8.9", 1)]
#: The submitter (node 0) asks more than the job's ceiling: it never runs its own job.
DEAR = {0: "price_per_gpu_hour = 360000000"}

PROBE = r"""
import json, os, socket
env = os.environ
home = env["NODE_HOME"]

def say(*a):
    print(*a, flush=True)

for name in ("identity.key", "control.token", "payer.json", "state.db", "config.toml", "control.json"):
    for path in (f"{home}/{name}", f"/proc/1/root{home}/{name}", f"/proc/self/root{home}/{name}"):
        try:
            data = open(path, "rb").read()
            say("READ", path, data.hex())
        except OSError as e:
            say("denied", name, type(e).__name__)
try:
    say("LISTED", home, os.listdir(home))
except OSError as e:
    say("denied listing", type(e).__name__)

pids = [p for p in os.listdir("/proc") if p.isdigit()]
say("pids", len(pids))
for p in pids:
    for what in ("cmdline", "environ"):
        try:
            data = open(f"/proc/{p}/{what}", "rb").read().replace(b"\0", b" ")
            say("proc", p, what, data.decode(errors="replace")[:2000])
        except OSError as e:
            say("proc", p, what, "denied", type(e).__name__)
    try:
        data = open(f"/proc/{p}/root{home}/identity.key", "rb").read()
        say("READ via pid", p, data.hex())
    except OSError:
        pass
mounts = open("/proc/self/mountinfo").read()
say("HOME-IN-MOUNTINFO" if home in mounts else "home not in mountinfo")

def connect(port, payload=b""):
    try:
        s = socket.create_connection(("127.0.0.1", int(port)), timeout=2)
        if payload:
            s.sendall(payload)
            say("REPLY", port, s.recv(4096)[:200])
        s.close()
        return "CONNECTED"
    except OSError as e:
        return "refused " + type(e).__name__

say("libp2p port", connect(env["LIBP2P_PORT"]))
guess = json.dumps({"token": "0" * 64, "method": "status", "params": {}}).encode() + b"\n"
say("control port", connect(env["CONTROL_PORT"], guess))
say("listener", connect(env["LISTENER_PORT"], b"hello from the job"))
try:
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    query = bytes.fromhex("abcd01000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
    u.sendto(query, ("127.0.0.1", int(env["DNS_PORT"])))
    u.settimeout(2)
    say("DNS ANSWERED", u.recv(512)[:50])
except OSError as e:
    say("dns", "failed", type(e).__name__)
try:
    socket.getaddrinfo("p2pgpu-probe.invalid", 80)
    say("RESOLVED a name")
except OSError as e:
    say("resolve", "failed", type(e).__name__)
say("probe done")
"""


def probe_manifest(env: dict[str, Any]) -> str:
    env_lines = "\n".join(f'{k} = {json.dumps(str(v))}' for k, v in env.items())
    return f"""
name = "probe-the-node"
[requirements]
nodes = 1
gpus_per_node = 1
[runtime]
command = ["python3", "-c", {json.dumps(PROBE)}]
duration_s_max = 60
[runtime.env]
{env_lines}
[payment]
price_per_gpu_hour_max = 36000000
"""


@pytest.mark.slow  # about 25 s; tests/runtime/test_sandbox.py keeps the keys and the network out in the default run
def test_job_code_finds_no_key_no_process_and_no_port_of_its_node(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the nodes' working directory: no job may learn it
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", 0))
    dns.setblocking(False)
    try:
        with LocalNet(tmp_path, 2, gpu_mix=ONE_GPU, node_config=DEAR) as net:
            net.wait_until(lambda: net.nodes[0].call("status")["peers"] >= 1, timeout_s=30, what="a connection")
            submitter, worker = net.nodes
            home = worker.home.path
            libp2p_port = int(worker.addrs[0].split("/")[4])
            job = submitter.call("job.submit", {"manifest": probe_manifest({
                "NODE_HOME": home, "LIBP2P_PORT": libp2p_port, "CONTROL_PORT": worker.control_port,
                "LISTENER_PORT": listener.getsockname()[1], "DNS_PORT": dns.getsockname()[1]})})["job_id"]
            done = net.wait_until(lambda: ended(status(worker, job), "member_state"), timeout_s=120,
                                  what="the probe job to end")
            assert done["member_state"] == "succeeded", done
            lines = [ln["line"] for ln in logs(worker, job)]
            text = "\n".join(lines)
            assert "probe done" in lines, lines[-5:]  # every probe ran to its end

            # Nothing of the home was read or listed, by path or through /proc.
            assert not [ln for ln in lines if ln.startswith(("READ", "LISTED"))], text[:3000]
            secrets = [worker.home.identity_path.read_bytes().hex(), worker.home.token(),
                       (home / PAYER_FILE).read_bytes().hex() if (home / PAYER_FILE).exists() else None]
            for secret in filter(None, secrets):
                assert secret not in text
            assert worker.home.token() not in text
            # /proc holds the job's own few processes: never the node's, its
            # command line, its environment or its home's path.
            assert int(next(ln for ln in lines if ln.startswith("pids ")).split()[1]) < 10, text[:3000]
            # (The job's own environment names the home: the test handed it over.)
            theirs = "\n".join(ln for ln in lines if ln.startswith("proc ") and "P2PGPU_JOB_ID=" not in ln)
            assert theirs, text[:3000]
            # Not the home, nor the node's working directory (its PWD reached
            # bubblewrap's environment, the job's /proc/1/environ).
            assert str(home) not in theirs and str(tmp_path) not in theirs, theirs
            assert "home not in mountinfo" in lines and "HOME-IN-MOUNTINFO" not in lines
            # No port of the node, nor the test's listeners, was reached.
            for probe in ("libp2p port", "control port", "listener"):
                got = next(ln for ln in lines if ln.startswith(probe))
                assert got.startswith(f"{probe} refused"), got
            assert not [ln for ln in lines if ln.startswith("REPLY")], text[-1000:]
            assert not [ln for ln in lines if ln.startswith(("DNS ANSWERED", "RESOLVED"))], text[-1000:]
            with pytest.raises(BlockingIOError):
                listener.accept()
            with pytest.raises(BlockingIOError):
                dns.recvfrom(512)
            assert worker.call("status")["peer_id"] == worker.peer_id  # the worker is unharmed
    finally:
        listener.close()
        dns.close()
