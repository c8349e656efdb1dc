"""Round-trip times between cloud regions: the simulator's shipped latency data.

Source: approximate median RTTs between AWS regions as published by public
inter-region latency tables (cloudping.co's "AWS Latency Monitoring", 2023-24
medians, rounded to 5 ms), which agree within about 10 % with Azure's and
Google Cloud's published inter-region tables for the same metros.  They are
indicative figures for a study, not measurements of any particular path:
a scenario may replace them with its own ``[network.rtt_ms]`` table.

The region names are the ones adverts carry (``Advert.region``).  One-way
delay is half the RTT; within one region the RTT is ``intra_region_rtt_ms``
(nodes in different data centres of one metro).
"""

from __future__ import annotations

#: metro each region stands for (the AWS region it was read from).
REGIONS: dict[str, str] = {
    "us-east": "N. Virginia (us-east-1)",
    "us-west": "Oregon (us-west-2)",
    "eu-west": "Ireland (eu-west-1)",
    "eu-central": "Frankfurt (eu-central-1)",
    "ap-northeast": "Tokyo (ap-northeast-1)",
    "ap-southeast": "Singapore (ap-southeast-1)",
    "sa-east": "Sao Paulo (sa-east-1)",
    "ap-south": "Mumbai (ap-south-1)",
}

intra_region_rtt_ms = 2

#: RTT in ms for each unordered pair of distinct regions.
_RTT_MS: dict[tuple[str, str], int] = {
    ("us-east", "us-west"): 65,
    ("us-east", "eu-west"): 70,
    ("us-east", "eu-central"): 90,
    ("us-east", "ap-northeast"): 145,
    ("us-east", "ap-southeast"): 215,
    ("us-east", "sa-east"): 115,
    ("us-east", "ap-south"): 185,
    ("us-west", "eu-west"): 125,
    ("us-west", "eu-central"): 140,
    ("us-west", "ap-northeast"): 100,
    ("us-west", "ap-southeast"): 165,
    ("us-west", "sa-east"): 175,
    ("us-west", "ap-south"): 215,
    ("eu-west", "eu-central"): 25,
    ("eu-west", "ap-northeast"): 200,
    ("eu-west", "ap-southeast"): 175,
    ("eu-west", "sa-east"): 180,
    ("eu-west", "ap-south"): 120,
    ("eu-central", "ap-northeast"): 225,
    ("eu-central", "ap-southeast"): 160,
    ("eu-central", "sa-east"): 200,
    ("eu-central", "ap-south"): 110,
    ("ap-northeast", "ap-southeast"): 70,
    ("ap-northeast", "sa-east"): 255,
    ("ap-northeast", "ap-south"): 125,
    ("ap-southeast", "sa-east"): 325,
    ("ap-southeast", "ap-south"): 60,
    ("sa-east", "ap-south"): 300,
}

#: Share of nodes per region when a scenario does not say (rough shape of
#: where rentable GPUs sit: mostly North America and Europe).
DEFAULT_WEIGHTS: dict[str, int] = {
    "us-east": 25, "us-west": 20, "eu-west": 15, "eu-central": 15,
    "ap-northeast": 8, "ap-southeast": 7, "sa-east": 4, "ap-south": 6,
}


def rtt_ms(a: str, b: str, table: dict[tuple[str, str], int] | None = None) -> int:
    """RTT between two regions, from ``table`` (pairs in either order) or the shipped one."""
    if a == b:
        return intra_region_rtt_ms
    t = _RTT_MS if table is None else table
    v = t.get((a, b))
    if v is None:
        v = t.get((b, a))
    if v is None:
        raise KeyError(f"no RTT between {a!r} and {b!r}")
    return v


def matrix(names: list[str], table: dict[tuple[str, str], int] | None = None,
           intra_ms: int = intra_region_rtt_ms) -> list[list[int]]:
    """The RTT matrix (ms) for ``names``, in that order."""
    return [[intra_ms if a == b else rtt_ms(a, b, table) for b in names] for a in names]
