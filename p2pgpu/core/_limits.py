"""Protocol limits that more than one message or core must agree on, in one place.

A limit that two modules each wrote down (the clock skew an advert, a
manifest, a heartbeat and a challenge tolerate; how many GPUs an advert, an
offer and a proof may name; how many members a cluster, a certificate, a
heartbeat's membership and a receipt may have) drifts the day one of them is
changed alone: a proof the submitter accepts names more GPUs than any offer
could, or a node refuses a heartbeat its own manifest check let in.  Each
such limit lives here, and the modules that check it read it from here
(keeping their old names as aliases); ``tests/core/test_limits.py`` checks
that every alias is this value, so none can drift again.

Limits that belong to one message only (a manifest's argv length, an
advert's address count) stay in that message's module; limits of one driver
(queue sizes, retry intervals) stay in that driver.  Units go last in names.
"""

from __future__ import annotations

#: How far a signed timestamp may lie in the future of the receiver's clock
#: (adverts' ``issued_at_ms``, manifests' ``created_at_ms``, heartbeats'
#: ``sent_at_ms``, challenges' ``issued_at_ms``): the clock skew every node
#: on the network tolerates.
clock_skew_ms_max = 60_000

#: GPUs one node may advertise, offer, hold for one job and name in a proof.
gpus_per_node_max = 16

#: Nodes (ranks) a job may ask for.
nodes_per_job_max = 64
#: Replicas of each rank a job may ask for.
replicas_max = 8
#: Members of one cluster (nodes x replicas): a proposal's and certificate's
#: member list, a membership's heartbeat peers, a receipt's lines.
members_per_cluster_max = 64

#: A libp2p peer id in its text form (Ed25519 ids are 52 characters).
peer_id_len_max = 64

__all__ = [
    "clock_skew_ms_max",
    "gpus_per_node_max",
    "members_per_cluster_max",
    "nodes_per_job_max",
    "peer_id_len_max",
    "replicas_max",
]
