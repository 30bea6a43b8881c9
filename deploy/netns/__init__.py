"""Hosts on one machine: Linux network namespaces on a bridge, behind `make cluster-up` and `make cluster-down`.

    python -m deploy.netns up --hosts 3 --ray   # namespaces h1..h3 on a bridge; a Ray head in h1, workers in h2, h3
    python -m deploy.netns exec h2 -- ip addr   # any command inside a host
    python -m deploy.netns ping h1 h2           # one ICMP echo from h1 to h2, by name
    python -m deploy.netns partition h2         # h2's link down (heal h2 brings it back)
    python -m deploy.netns loss h2 1            # 1 % of the packets arriving at h2 dropped (0: none)
    python -m deploy.netns submit -- python training/finetune.py --num-workers 2 ...   # ray job submit from h1
    python -m deploy.netns down                 # processes, namespaces, links, iptables rules: nothing is left

Each host is a network namespace ``<prefix>-h<i>`` with its own loopback, address (host i: the subnet's i-th
address), routes and firewall, joined by a veth pair (``<prefix>-v<i>`` on the machine's side, ``eth0`` inside)
to the bridge ``<prefix>-br``. The bridge has no address and the hosts have no default route: nothing leaves
the subnet. Names: ``h<i>`` and ``<prefix>-h<i>``, written to ``<state dir>/hosts`` (``Cluster.lookup`` reads
it) and to ``/etc/netns/<namespace>/hosts``, which ``ip netns exec`` mounts over ``/etc/hosts``, so a process
started in a host resolves the others by name (and the machine's hostname to its own address, as gloo wants).

This kernel has no netem (``CONFIG_NET_SCH_NETEM`` is not set), so faults are made from what it has: a
partition takes a host's link down, or drops its packets with iptables (only to and from some peers, if
asked); loss is iptables' ``statistic`` match on the packets arriving at a host; latency is a delaying TCP
relay (``relay``) placed in the path: pointed at by clients, or transparent (``Cluster.latency``: a nat REDIRECT
in the host sends its connections to some peers through a local relay that finds their destination with
``SO_ORIGINAL_DST``), which is how connections nobody can re-point, such as gloo's between ranks, are delayed.
Every process started in a host is recorded and killed by ``down``, together with anything else still running
in the namespaces (``ip netns pids``); ``down`` also removes what an earlier run of the same prefix left
behind. Needs root, ``ip`` (Debian: iproute2) and ``iptables``.

The package: ``machine`` (what exists on the machine, code run inside a namespace), ``cluster`` (the hosts and
their processes), ``faults`` (partition, loss, the relay placed), ``relay`` (the delaying TCP relay), ``ray``
(a Ray node per host), ``chatload`` (chats driven from inside a host), ``tensor`` (tensor-parallel ranks on two
hosts), ``training`` (Ray training through a lost host), ``bench`` (``make cluster-check``'s scenarios) and
``cli``.
"""

from deploy.netns import machine
from deploy.netns.cluster import Cluster, Host, Teardown, Tracked
from deploy.netns.machine import (
    INNER_LINK,
    LOSS_CHAIN,
    PARTITION_CHAIN,
    ClusterError,
    in_namespace,
    iptables_rules,
    links,
    namespace_inode,
    namespace_pids,
    namespaces,
    probe,
    unavailable_reason,
)
from deploy.netns.relay import run_relay

__all__ = [
    "INNER_LINK",
    "LOSS_CHAIN",
    "PARTITION_CHAIN",
    "Cluster",
    "ClusterError",
    "Host",
    "Teardown",
    "Tracked",
    "in_namespace",
    "iptables_rules",
    "links",
    "machine",
    "namespace_inode",
    "namespace_pids",
    "namespaces",
    "probe",
    "run_relay",
    "unavailable_reason",
]
