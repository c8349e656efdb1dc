"""The trio flavour: submit two jobs and follow both at once.

    python examples/sdk/async_trio.py --home DIR
"""

import argparse
from pathlib import Path

import trio

from p2pgpu import AsyncClient, AsyncJob

parser = argparse.ArgumentParser()
parser.add_argument("--home")
args = parser.parse_args()
JOBS = Path(__file__).parents[1] / "jobs"


async def follow(job: AsyncJob) -> None:
    async for line in job.logs(follow=True):
        print(f"{job.name:>6} | {line.line}")
    status = await job.wait()
    print(f"{job.name:>6} | {status.state}")


async def main() -> None:
    client = AsyncClient(args.home)
    jobs = [await client.submit(JOBS / "hello.toml"), await client.submit(JOBS / "pair.toml")]
    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(follow, job)


trio.run(main)
