"""The SDK's typed errors: what is wrong, who is at fault, what to do.

    python examples/sdk/errors.py --home DIR
"""

import argparse

from p2pgpu import BadManifest, Client, DaemonNotRunning, JobFailed, UnknownJob

parser = argparse.ArgumentParser()
parser.add_argument("--home")
args = parser.parse_args()
client = Client(args.home)

try:
    client.submit({"requirements": {"nodes": 0}, "runtime": {"command": ["true"]}})
except BadManifest as exc:
    print("bad manifest, field", exc.field, "->", exc.problem)

try:
    client.job("0" * 64).status()
except UnknownJob as exc:
    print("unknown job:", exc)

job = client.submit({"name": "fails", "runtime": {"command": ["sh", "-c", "exit 3"]},
                     "payment": {"price_per_gpu_hour_max": 10_000_000}})
try:
    job.wait(timeout_s=120)
except JobFailed as exc:
    print("job failed:", exc.reason)

try:
    Client("/nonexistent/home").status()
except DaemonNotRunning as exc:
    print("no daemon:", exc)
