"""What the market offers, filtered by a manifest's requirements; and a dry run.

    python examples/sdk/market.py --home DIR
"""

import argparse

from p2pgpu import Client

parser = argparse.ArgumentParser()
parser.add_argument("--home")
args = parser.parse_args()
client = Client(args.home)

for row in client.market({"vram_gb_min": 20, "gpus_per_node": 1}):
    gpus = ", ".join(f"{g['count']}x {g['model']}" for g in row["gpus"])
    print(f"{row['peer_id'][:16]}  {gpus:<32} {row['gpus_free']} free  {row['price']} {row['currency']}/GPU-h  "
          f"{row['region']}")

plan = client.dry_run({"requirements": {"nodes": 2, "gpus_per_node": 8}, "runtime": {"command": ["true"]},
                       "payment": {"price_per_gpu_hour_max": 10_000_000}})
for step in plan["requirements"]:
    print(f"  {step['what']:<40} {step['peers_passing']} peers pass")
print("enough peers for 2 nodes of 8 GPUs:", plan["enough"])
