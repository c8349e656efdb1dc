"""Follow a job's output while it runs (like `p2pgpu job logs --follow`).

    python examples/sdk/follow_logs.py --home DIR
"""

import argparse
import time

from p2pgpu import Client

parser = argparse.ArgumentParser()
parser.add_argument("--home")
args = parser.parse_args()

job = Client(args.home).submit("""
name = "countdown"
[requirements]
nodes = 1
[runtime]
command = ["sh", "-c", "for i in 3 2 1; do echo $i; sleep 0.5; done; echo liftoff"]
duration_s_max = 30
[payment]
price_per_gpu_hour_max = 10000000
""")
started = time.monotonic()
for line in job.logs(follow=True):  # returns when the job has ended
    print(f"{time.monotonic() - started:5.1f} s  {line.line}")
print("final state:", job.status().state)
