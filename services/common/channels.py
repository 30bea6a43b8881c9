"""Client channels to nightcap services: one address, a list of replicas or a DNS name; fast reconnects, keepalive."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

# Keepalive: without it a connection whose peer vanished (a partition, a host powered off: no FIN, no RST) stays
# READY and its calls end in DEADLINE_EXCEEDED after their whole timeout, or never when they have none. Measured
# over network namespaces (docs/operations.md, "Across hosts"), a ping every 2 s with 2 s to answer turns a
# partition into UNAVAILABLE in about 2.5 s (at most 4 s, plus scheduling) and takes the replica out of
# round_robin. Pings go without calls too (an idle replica's dead connection is noticed before a call is sent on
# it) and without limit between data frames (a long prefill sends none). Servers accept pings this often
# (services/common/server.py: SERVER_KEEPALIVE_OPTIONS), or they would GOAWAY.
KEEPALIVE_TIME_MS = 2000
KEEPALIVE_TIMEOUT_MS = 2000
KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
# gRPC's default reconnect backoff grows to 120 s: a backend restarted after a minute down stayed
# unreachable long after it reported SERVING. Capped at 1 s, a restarted backend is used within a second,
# and calls made while it reconnects wait for it (wait_for_ready) up to their timeout.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
    *KEEPALIVE_OPTIONS,
]
# Replicas: gRPC's own round_robin over every address the target resolves to, each subchannel watched
# through grpc.health.v1 so a replica that is NOT_SERVING (draining, loading) or gone stops getting calls.
REPLICA_SERVICE_CONFIG = json.dumps(
    {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": ""}}
)


def channel_target(address: str) -> str:
    """The gRPC target for one address, a comma-separated list of IP:port (replicas), or a DNS name that
    resolves to several (``dns:///generation.default.svc:50051``, a headless Service)."""
    addresses = [a.strip() for a in address.split(",") if a.strip()]
    if not addresses:
        raise ValueError("no address given")
    if len(addresses) == 1:
        return addresses[0]
    hosts = [a.rpartition(":")[0].strip("[]") for a in addresses]
    try:
        families = {ipaddress.ip_address(host).version for host in hosts}
    except ValueError:
        raise ValueError(
            f"a list of addresses must be IP:port each, got {address!r}: for names, give one DNS name that"
            " resolves to every replica (e.g. a Kubernetes headless Service)"
        ) from None
    if len(families) > 1:
        raise ValueError(f"a list of addresses must be all IPv4 or all IPv6, got {address!r}")
    return f"ipv{families.pop()}:" + ",".join(addresses)


def channel_options(address: str) -> list[tuple[str, Any]]:
    """Reconnect and keepalive options, plus round_robin with health checks when ``address`` names several replicas."""
    options: list[tuple[str, Any]] = [*RECONNECT_OPTIONS]
    if "," in address or address.startswith("dns:"):
        options.append(("grpc.service_config", REPLICA_SERVICE_CONFIG))
    return options
