"""The cluster: hosts as network namespaces on a bridge, and the processes started in them (faults: faults.py)."""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from loguru import logger

from deploy.netns.faults import Faults
from deploy.netns.machine import (
    DEFAULT_HOSTS,
    DEFAULT_PREFIX,
    DEFAULT_STATE_DIR,
    DEFAULT_SUBNET,
    INNER_LINK,
    MAX_HOSTS,
    NETNS_ETC,
    PREFIX_PATTERN,
    REPO,
    RULE_TAG,
    STOP_GRACE_S,
    ClusterError,
    icmp_checksum,
    in_namespace,
    iptables_rules,
    links,
    namespace_pids,
    namespaces,
    read_json,
    run_command,
    stop_processes,
    unavailable_reason,
)

# --------------------------------------------------------------------------------------------- the cluster


@dataclass(frozen=True)
class Host:
    index: int  # 1-based
    name: str  # h<i>
    namespace: str  # <prefix>-h<i>
    address: str
    veth: str  # <prefix>-v<i>, the machine's end of its link


@dataclass(frozen=True)
class Tracked:
    """A process this cluster started in a host, recorded in state.json so a later ``down`` finds it."""

    pid: int
    create_time: float
    host: str
    command: str

    def alive(self) -> psutil.Process | None:
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.create_time) < 0.05 and process.status() != psutil.STATUS_ZOMBIE:
                return process
        except psutil.Error:
            pass
        return None


@dataclass
class Teardown:
    """What ``down`` removed."""

    processes: int = 0
    namespaces: int = 0
    links: int = 0
    rules: int = 0

    def __str__(self) -> str:
        return (
            f"{self.processes} process(es), {self.namespaces} namespace(s), {self.links} link(s), "
            f"{self.rules} iptables rule(s)"
        )


class Cluster(Faults):
    """``hosts`` network namespaces on a bridge, all named after ``prefix`` so that ``down`` finds every one
    of them, also those a crashed run left; ``state_dir`` holds the names file, state.json and logs."""

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        hosts: int = DEFAULT_HOSTS,
        subnet: str = DEFAULT_SUBNET,
        state_dir: Path | str = DEFAULT_STATE_DIR,
    ) -> None:
        if not PREFIX_PATTERN.match(prefix):
            raise ClusterError(f"prefix {prefix!r}: a lower-case letter, then at most 9 letters or digits")
        network = ipaddress.ip_network(subnet)
        if network.version != 4 or not network.is_private:
            raise ClusterError(f"subnet {subnet}: must be a private IPv4 network (RFC 1918)")
        if not 1 <= hosts <= min(MAX_HOSTS, network.num_addresses - 2):
            raise ClusterError(f"{hosts} hosts do not fit: 1 to {min(MAX_HOSTS, network.num_addresses - 2)}")
        self.prefix, self.subnet, self.network = prefix, str(network), network
        self.state_dir = Path(state_dir).resolve()
        self.hosts = [
            Host(i, f"h{i}", f"{prefix}-h{i}", str(network.network_address + i), f"{prefix}-v{i}")
            for i in range(1, hosts + 1)
        ]
        self.bridge = f"{prefix}-br"
        self.rule_tag = f"{RULE_TAG}:{prefix}"

    @classmethod
    def from_state(cls, state_dir: Path | str = DEFAULT_STATE_DIR, prefix: str | None = None) -> Cluster:
        """The cluster ``up`` recorded in ``state_dir``; with no record, one of ``prefix`` (for ``down``)."""
        state = read_json(Path(state_dir) / "state.json")
        if state is None:
            return cls(prefix or DEFAULT_PREFIX, state_dir=state_dir)
        if prefix is not None and prefix != state["prefix"]:
            raise ClusterError(f"{state_dir} holds cluster {state['prefix']!r}, not {prefix!r}")
        return cls(state["prefix"], state["hosts"], state["subnet"], state_dir)

    # --- files

    @property
    def hosts_file(self) -> Path:
        return self.state_dir / "hosts"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    def host(self, which: str | int | Host) -> Host:
        """A host by index (1-based), name (h2), namespace (nc-h2) or address."""
        if isinstance(which, Host):
            return which
        for host in self.hosts:
            if which in (host.index, host.name, host.namespace, host.address) or str(which) == str(host.index):
                return host
        raise ClusterError(f"no host {which!r} in cluster {self.prefix} ({', '.join(h.name for h in self.hosts)})")

    def lookup(self, name: str) -> str:
        """The address of a host name (h2, nc-h2) from the names file, as /etc/hosts would give it."""
        for line in self.hosts_file.read_text().splitlines() if self.hosts_file.exists() else []:
            fields = line.split("#")[0].split()
            if name in fields[1:]:
                return fields[0]
        raise ClusterError(f"{name!r} is not in {self.hosts_file} (is the cluster up?)")

    def _hosts_lines(self) -> list[str]:
        return [f"{host.address}\t{host.name} {host.namespace}" for host in self.hosts]

    @contextlib.contextmanager
    def locked(self) -> Iterator[dict]:
        """The state file, read and written back under an exclusive lock."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = read_json(self.state_file) or {}
            yield state
            if state:
                self.state_file.write_text(json.dumps(state, indent=2) + "\n")
            else:
                self.state_file.unlink(missing_ok=True)

    def tracked(self) -> list[Tracked]:
        state = read_json(self.state_file) or {}
        return [Tracked(**entry) for entry in state.get("processes", [])]

    # --- up and down

    def exists(self) -> bool:
        """Whether any namespace of this prefix exists."""
        return any(self._ours(name, r"h\d+") for name in namespaces())

    def _ours(self, name: str, kind: str) -> bool:
        """Whether ``name`` is this prefix's: ``<prefix>-<kind>`` (a regular expression)."""
        return re.fullmatch(rf"{re.escape(self.prefix)}-(?:{kind})", name) is not None

    def up(self) -> Cluster:
        """Makes what is missing (idempotent): bridge, namespaces with loopback up, veth pairs, addresses,
        names, and the machine's FORWARD rule for the bridge."""
        reason = unavailable_reason()
        if reason is not None:
            raise ClusterError(reason)
        with self.locked() as state:
            if state and (state["hosts"], state["subnet"]) != (len(self.hosts), self.subnet) and self.exists():
                raise ClusterError(
                    f"cluster {self.prefix} is up with {state['hosts']} hosts on {state['subnet']}: "
                    "take it down first (make cluster-down)"
                )
            state.update(prefix=self.prefix, hosts=len(self.hosts), subnet=self.subnet)
            state.setdefault("processes", [])
            present = set(links())
            if self.bridge not in present:
                # no STP: a port forwards as soon as its link is up (a healed partition is whole at once)
                run_command(
                    ["ip", "link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"]
                )
            run_command(["ip", "link", "set", self.bridge, "up"])
            existing = set(namespaces())
            for host in self.hosts:
                if host.namespace not in existing:
                    run_command(["ip", "netns", "add", host.namespace])
                inner = run_command(["ip", "-n", host.namespace, "-j", "link", "show"])
                if host.veth not in present or INNER_LINK not in {e["ifname"] for e in json.loads(inner or "[]")}:
                    subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
                    run_command(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", INNER_LINK,
                          "netns", host.namespace])  # fmt: skip
                run_command(["ip", "link", "set", host.veth, "master", self.bridge, "up"])
                run_command(["ip", "-n", host.namespace, "link", "set", "lo", "up"])
                run_command(["ip", "-n", host.namespace, "link", "set", INNER_LINK, "up"])
                run_command(["ip", "-n", host.namespace, "addr", "replace",
                      f"{host.address}/{self.network.prefixlen}", "dev", INNER_LINK])  # fmt: skip
                self._write_etc_hosts(host)
            # With br_netfilter loaded, bridged packets cross the machine's FORWARD chain: a DROP policy there
            # (docker sets one) would cut the hosts off from each other.
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment", self.rule_tag,
                    "-j", "ACCEPT"]  # fmt: skip
            if subprocess.run(["iptables", "-C", *rule], capture_output=True).returncode != 0:
                run_command(["iptables", "-I", *rule])
            self.hosts_file.write_text(
                f"# cluster {self.prefix} ({self.subnet}, bridge {self.bridge}): python -m deploy.netns\n"
                + "\n".join(self._hosts_lines())
                + "\n"
            )
        logger.info(
            "cluster {}: {} on bridge {} ({}), names in {}",
            self.prefix,
            ", ".join(f"{h.name} {h.address}" for h in self.hosts),
            self.bridge,
            self.subnet,
            self.hosts_file,
        )
        return self

    def _write_etc_hosts(self, host: Host) -> None:
        folder = NETNS_ETC / host.namespace
        folder.mkdir(parents=True, exist_ok=True)
        # the machine's hostname names this host's own address, as on a real machine (gloo binds to it)
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback", *self._hosts_lines(),
                 f"{host.address}\t{socket.gethostname()}"]  # fmt: skip
        (folder / "hosts").write_text("\n".join(lines) + "\n")

    def down(self, grace: float = STOP_GRACE_S) -> Teardown:
        """Stops every process in the hosts (SIGTERM, then SIGKILL after ``grace`` s), removes the machine's
        iptables rules, the links and the namespaces of this prefix, whatever made them; safe to repeat."""
        reason = unavailable_reason()
        if reason is not None:
            raise ClusterError(reason)
        done = Teardown()
        with self.locked() as state:
            ours = sorted(name for name in namespaces() if self._ours(name, r"h\d+"))
            processes: dict[int, psutil.Process] = {}
            recorded = state.get("processes", []) if state.get("prefix", self.prefix) == self.prefix else []
            for entry in recorded:
                process = Tracked(**entry).alive()
                if process is not None:
                    processes[process.pid] = process
            for namespace in ours:
                for pid in namespace_pids(namespace):
                    with contextlib.suppress(psutil.Error):
                        processes.setdefault(pid, psutil.Process(pid))
            done.processes = stop_processes(list(processes.values()), grace)
            for line in iptables_rules(self.rule_tag):
                run_command(["iptables", *shlex.split(re.sub(r"^-A ", "-D ", line))])
                done.rules += 1
            # each veth first (both ends go), then the bridge
            for name in sorted(links(), key=lambda n: n == self.bridge):
                if self._ours(name, r"br|v\d+"):
                    subprocess.run(["ip", "link", "del", name], capture_output=True)
                    done.links += 1
            for namespace in ours:
                run_command(["ip", "netns", "del", namespace])
                done.namespaces += 1
            for folder in NETNS_ETC.glob(f"{self.prefix}-h*") if NETNS_ETC.exists() else []:
                if self._ours(folder.name, r"h\d+"):
                    shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                NETNS_ETC.rmdir()  # only if empty
            # the settings stay (a second `down`, `status` find the prefix), the processes and Ray go
            for key in [key for key in state if key not in ("prefix", "hosts", "subnet")]:
                del state[key]
        self.hosts_file.unlink(missing_ok=True)
        logger.info("cluster {} down: stopped {}", self.prefix, done)
        return done

    # --- processes in hosts

    def command(self, host: str | int | Host, command: Sequence[str]) -> list[str]:
        """``command`` as run inside ``host``."""
        return ["ip", "netns", "exec", self.host(host).namespace, *command]

    def exec(
        self, host: str | int | Host, command: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs
    ) -> subprocess.CompletedProcess:
        """Runs ``command`` in ``host`` to its end (captured text output; ``check``: raise if it fails)."""
        result = subprocess.run(self.command(host, command), capture_output=True, text=True, timeout=timeout, **kwargs)
        if check and result.returncode != 0:
            raise ClusterError(
                f"in {self.host(host).name}: `{shlex.join(command)}` exited {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )
        return result

    def spawn(
        self,
        host: str | int | Host,
        command: Sequence[str],
        *,
        log: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | str = REPO,
    ) -> subprocess.Popen:
        """Starts ``command`` in ``host`` in the background (output to ``log``, default logs/<host>-<name>.log),
        recorded so that ``down`` stops it."""
        target = self.host(host)
        log = log or self.logs / f"{target.name}-{Path(command[0]).name}-{int(time.time() * 1000)}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as output:
            process = subprocess.Popen(
                self.command(target, command), stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, cwd=cwd, start_new_session=True,
            )  # fmt: skip
        self.track(process.pid, target, command)
        logger.debug("{}: started pid {}: {} (log {})", target.name, process.pid, shlex.join(command), log)
        return process

    def track(self, pid: int, host: Host, command: Sequence[str]) -> None:
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone
        with self.locked() as state:
            entries = state.setdefault("processes", [])
            entries[:] = [e for e in entries if Tracked(**e).alive() is not None]
            entries.append({"pid": pid, "create_time": create_time, "host": host.name, "command": shlex.join(command)})

    def pids(self, host: str | int | Host | None = None) -> set[int]:
        """The processes running in ``host`` (every host: None)."""
        hosts = [self.host(host)] if host is not None else self.hosts
        return set().union(*(namespace_pids(h.namespace) for h in hosts))

    def socket(self, host: str | int | Host, *args: Any) -> socket.socket:
        """``socket.socket(*args)`` made inside ``host``: this process talks from there without a subprocess."""
        return in_namespace(self.host(host).namespace, lambda: socket.socket(*args))

    def connect(self, host: str | int | Host, target: str, port: int, timeout: float = 2.0) -> socket.socket:
        """A TCP connection from ``host`` to ``target`` (a name or an address) or an OSError / TimeoutError."""
        sock = self.socket(host, socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((self._address(target), port))
        except BaseException:
            sock.close()
            raise
        return sock

    def wait_port(self, host: str | int | Host, target: str, port: int, timeout: float = 30.0) -> None:
        """Waits until ``target:port`` accepts a connection from ``host``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect(host, target, port, timeout=1.0).close()
                return
            except OSError as error:
                if time.monotonic() > deadline:
                    message = f"{target}:{port} not reachable from {host} in {timeout:.0f} s: {error}"
                    raise ClusterError(message) from None
                time.sleep(0.2)

    def ping(self, source: str | int | Host, target: str, timeout: float = 2.0) -> float:
        """An ICMP echo from ``source`` to ``target`` (name or address): the round trip in seconds, or a
        TimeoutError. (Debian's ping is not installed here; a raw socket is root's anyway.)"""
        address = self._address(target)
        sock = self.socket(source, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        ident, sequence = os.getpid() & 0xFFFF, int(time.monotonic() * 1000) & 0xFFFF
        payload = b"nightcap-netns"
        header = struct.pack("!BBHHH", 8, 0, 0, ident, sequence)
        packet = struct.pack("!BBHHH", 8, 0, icmp_checksum(header + payload), ident, sequence) + payload
        with sock:
            began = time.monotonic()
            sock.sendto(packet, (address, 0))
            while (left := timeout - (time.monotonic() - began)) > 0:
                sock.settimeout(left)
                try:
                    data, (sender, _) = sock.recvfrom(2048)
                except TimeoutError:
                    break
                reply = data[(data[0] & 0x0F) * 4 :]
                if sender == address and reply[0] == 0 and struct.unpack("!HH", reply[4:8]) == (ident, sequence):
                    return time.monotonic() - began
        raise TimeoutError(f"no echo reply from {target} ({address}) to {self.host(source).name} in {timeout} s")

    def _address(self, target: str) -> str:
        try:
            ipaddress.ip_address(target)
            return target
        except ValueError:
            return self.lookup(target)
