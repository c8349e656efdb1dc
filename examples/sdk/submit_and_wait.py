"""Submit a job, follow its progress, print its logs.

    p2pgpu devnet up            # or any running node: p2pgpu node run --home ~/.p2pgpu
    python examples/sdk/submit_and_wait.py --home /tmp/p2pgpu-devnet-XXXX/node0

The manifest is a file here (examples/jobs/hello.toml); a dict or TOML text works too.
"""

import argparse
from pathlib import Path

from p2pgpu import Client

parser = argparse.ArgumentParser()
parser.add_argument("--home", help="node home (default: $P2PGPU_HOME, else ~/.p2pgpu)")
args = parser.parse_args()

client = Client(args.home)
job = client.submit(Path(__file__).parents[1] / "jobs" / "hello.toml")
print("submitted", job.id)

status = job.wait(progress=lambda p: print("  ", p.line), timeout_s=120)
print(f"{status.state}: cluster of {len(status.members)}, formed in {status.formation_ms} ms")
for line in job.logs():
    print(f"[{line.member[:8]}] {line.line}")
