"""Cancel a running job, and read why it ended from the typed error.

    python examples/sdk/cancel.py --home DIR
"""

import argparse
import time

from p2pgpu import Client, JobFailed

parser = argparse.ArgumentParser()
parser.add_argument("--home")
args = parser.parse_args()

job = Client(args.home).submit({
    "name": "long",
    "requirements": {"nodes": 1},
    "runtime": {"command": ["sh", "-c", "echo working; sleep 60"], "duration_s_max": 120},
    "payment": {"price_per_gpu_hour_max": 10_000_000},
})
while job.status().state not in ("confirmed", "running"):
    time.sleep(0.2)
print("running; cancelling", job.id[:12])
job.cancel()
try:
    job.wait(timeout_s=60)
except JobFailed as exc:  # raised for any end but "succeeded"
    print(f"ended {exc.state}: {exc.reason}")
