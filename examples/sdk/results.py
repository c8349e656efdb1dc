"""Submit a job given as a dict that writes files, and fetch them, checked against their hashes.

    python examples/sdk/results.py --home DIR --out results/
"""

import argparse

from p2pgpu import Client

parser = argparse.ArgumentParser()
parser.add_argument("--home")
parser.add_argument("--out", default="results")
args = parser.parse_args()

manifest = {
    "name": "squares",
    "requirements": {"nodes": 2, "gpus_per_node": 1},
    "runtime": {
        "command": ["python3", "-c", ("import os; r = int(os.environ['P2PGPU_RANK']); "
                    "open(f'squares-{r}.txt', 'w').write(' '.join(str(i * i) for i in range(r * 5, r * 5 + 5)))")],
        "duration_s_max": 30,
    },
    "payment": {"price_per_gpu_hour_max": 10_000_000},
}

job = Client(args.home).submit(manifest)
job.wait(timeout_s=120)
for f in job.results(args.out):  # each file's size and sha256 checked (ResultsMismatch otherwise)
    print(f"{f.saved_as}  {f.size_bytes} bytes  sha256 {f.sha256[:16]}  from {f.member[:12]}")
    print("   ", f.saved_as.read_text())
