"""Faults between hosts without netem: a partition (link down or iptables DROP), loss (iptables' statistic
match on arrival) and latency (a delaying relay process placed in the path, relay.py: one that clients are
pointed at, or a transparent one that a nat REDIRECT rule sends a host's connections to)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from loguru import logger

from deploy.netns.machine import (
    INNER_LINK,
    LOSS_CHAIN,
    PARTITION_CHAIN,
    STOP_GRACE_S,
    ClusterError,
    run_command,
    stop_processes,
)
from deploy.netns.relay import RELAY_MARK

if TYPE_CHECKING:
    import subprocess

    from deploy.netns.cluster import Cluster, Host

LATENCY_CHAIN = "NIGHTCAP-LATENCY"  # inside a host, nat table: its REDIRECT rules to its latency relay
LATENCY_RELAY_PORT = 7399  # the transparent relay's port on a host's loopback (where REDIRECT sends a connection)
RELAY_COMMAND = [sys.executable, "-m", "deploy.netns", "relay"]
LATENCY_RELAY = [*RELAY_COMMAND, "--listen", f"127.0.0.1:{LATENCY_RELAY_PORT}"]  # no --target: transparent


class Faults:
    """The faults a ``Cluster`` can put on its hosts (mixed into it; ``heal``, ``loss(h, 0)`` and
    ``clear_latency`` undo them)."""

    def partition(
        self: Cluster, host: str | int | Host, *, peers: Sequence[str | int | Host] = (), method: str = "link"
    ) -> None:
        """Cuts ``host`` off: from everyone by taking its link down (``method="link"``) or dropping its traffic
        (``"iptables"``); from only ``peers`` (iptables, both directions). ``heal`` undoes either."""
        target = self.host(host)
        if peers or method == "iptables":
            self._chain(target, PARTITION_CHAIN)
            sources = [self.host(peer).address for peer in peers] or [None]
            for address in sources:
                for flag in ("-s", "-d"):
                    match = [flag, address] if address else []
                    self.exec(target, ["iptables", "-A", PARTITION_CHAIN, *match, "-j", "DROP"])
            logger.info("{}: partitioned from {} (iptables DROP)", target.name, ", ".join(map(str, peers)) or "all")
        elif method == "link":
            run_command(["ip", "link", "set", target.veth, "down"])
            logger.info("{}: partitioned (link {} down)", target.name, target.veth)
        else:
            raise ClusterError(f"partition method {method!r}: link or iptables")

    def heal(self: Cluster, host: str | int | Host) -> None:
        """Undoes ``partition``: the link up, the DROP rules gone."""
        target = self.host(host)
        run_command(["ip", "link", "set", target.veth, "up"])
        self.exec(target, ["iptables", "-F", PARTITION_CHAIN], check=False)
        logger.info("{}: healed", target.name)

    def loss(self: Cluster, host: str | int | Host, percent: float) -> None:
        """Drops ``percent`` % of the packets arriving at ``host`` over the bridge, at random (iptables'
        ``statistic`` match); 0 removes the rule. Round trips to it lose about that much each way in."""
        if not 0 <= percent <= 100:
            raise ClusterError(f"loss {percent} %: 0 to 100")
        target = self.host(host)
        self._chain(target, LOSS_CHAIN, output=False)
        self.exec(target, ["iptables", "-F", LOSS_CHAIN])
        if percent > 0:
            rule = ["-m", "statistic", "--mode", "random", "--probability", f"{percent / 100:.6f}", "-j", "DROP"]
            self.exec(target, ["iptables", "-A", LOSS_CHAIN, *rule])
        logger.info("{}: {} % loss on arrival", target.name, percent)

    def _chain(self: Cluster, host: Host, chain: str, output: bool = True) -> None:
        """Makes ``chain`` in ``host`` (once) and sends the bridge's traffic through it."""
        if self.exec(host, ["iptables", "-n", "-L", chain], check=False).returncode != 0:
            self.exec(host, ["iptables", "-N", chain])
        hooks = [("INPUT", "-i")] + ([("OUTPUT", "-o")] if output else [])
        for hook, direction in hooks:
            rule = [hook, direction, INNER_LINK, "-j", chain]
            if self.exec(host, ["iptables", "-C", *rule], check=False).returncode != 0:
                self.exec(host, ["iptables", "-A", *rule])

    def relay(
        self: Cluster,
        host: str | int | Host,
        listen_port: int,
        target: str,
        delay: float,
        delay_back: float | None = None,
        timeout: float = 30.0,
    ) -> subprocess.Popen:
        """A delaying TCP relay (``run_relay``) in ``host`` on its address:``listen_port``, forwarding to
        ``target`` (host:port, names allowed) ``delay`` s later, and the answers ``delay_back`` s later."""
        where = self.host(host)
        command = [*RELAY_COMMAND, "--listen", f"{where.address}:{listen_port}", "--target", target,
                   "--delay", str(delay)]  # fmt: skip
        if delay_back is not None:
            command += ["--delay-back", str(delay_back)]
        process = self.spawn(where, command, log=self.logs / f"{where.name}-relay-{listen_port}.log")
        self.wait_port(where, where.address, listen_port, timeout)
        return process

    def latency(
        self: Cluster,
        host: str | int | Host,
        delay: float,
        *,
        peers: Sequence[str | int | Host],
        delay_back: float | None = None,
        timeout: float = 30.0,
    ) -> subprocess.Popen:
        """``delay`` s added to each byte of the TCP connections ``host`` opens to ``peers`` from now on, and
        ``delay_back`` s (default: ``delay``) to each byte they answer: a nat OUTPUT rule in ``host`` REDIRECTs
        those connections to a transparent relay there, which connects on to where each was going. For peers
        that connect to each other (gloo's ranks), give each host the other as a peer: every connection then
        passes one relay, the one of the host that opened it. Replaces ``host``'s earlier latency;
        ``clear_latency`` undoes it. Connections open before stay as they were."""
        where = self.host(host)
        self.clear_latency(where)
        command = [*LATENCY_RELAY, "--delay", str(delay)]
        if delay_back is not None:
            command += ["--delay-back", str(delay_back)]
        process = self.spawn(where, command, log=self.logs / f"{where.name}-latency-relay.log")
        self.wait_port(where, "127.0.0.1", LATENCY_RELAY_PORT, timeout)
        if self.exec(where, ["iptables", "-t", "nat", "-n", "-L", LATENCY_CHAIN], check=False).returncode != 0:
            self.exec(where, ["iptables", "-t", "nat", "-N", LATENCY_CHAIN])
            self.exec(where, ["iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", *self._tagged, "-j", LATENCY_CHAIN])
        for peer in peers:
            # the relay's own connection carries RELAY_MARK and passes by
            rule = ["-p", "tcp", "-d", self.host(peer).address, "-m", "mark", "!", "--mark", str(RELAY_MARK),
                    *self._tagged, "-j", "REDIRECT", "--to-ports", str(LATENCY_RELAY_PORT)]  # fmt: skip
            self.exec(where, ["iptables", "-t", "nat", "-A", LATENCY_CHAIN, *rule])
        back = delay if delay_back is None else delay_back
        logger.info(
            "{}: TCP to {} through a relay: {} s there, {} s back",
            where.name, ", ".join(self.host(peer).name for peer in peers), delay, back,
        )  # fmt: skip
        return process

    def clear_latency(self: Cluster, host: str | int | Host, grace: float = STOP_GRACE_S) -> None:
        """Undoes ``latency``: no REDIRECT rule in ``host``, its relay stopped (connections through it end)."""
        where = self.host(host)
        self.exec(where, ["iptables", "-t", "nat", "-F", LATENCY_CHAIN], check=False)
        relay = shlex.join(LATENCY_RELAY)
        running = [t.alive() for t in self.tracked() if t.host == where.name and t.command.startswith(relay)]
        stop_processes([process for process in running if process is not None], grace)

    @property
    def _tagged(self: Cluster) -> list[str]:
        """The comment that marks a rule as this cluster's (``down`` finds the machine's own by it)."""
        return ["-m", "comment", "--comment", self.rule_tag]
