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
relay (``relay``) placed in the path. Every process started in a host is recorded and killed by ``down``,
together with anything else still running in the namespaces (``ip netns pids``); ``down`` also removes what
an earlier run of the same prefix left behind. Needs root, ``ip`` (Debian: iproute2) and ``iptables``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import psutil
import typer
from loguru import logger

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEFAULT_PREFIX = "nc"
DEFAULT_HOSTS = 3
# RFC 1918, away from the usual 10.0/16, 172.17/16 (docker) and 192.168/16 home networks.
DEFAULT_SUBNET = "10.213.0.0/24"
DEFAULT_STATE_DIR = Path("var/cluster")
# Interface names are at most 15 bytes: "<prefix>-v<i>" with i <= 99 leaves 10 for the prefix.
PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,9}$")
MAX_HOSTS = 99
INNER_LINK = "eth0"  # the veth end inside each host
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` bind-mounts /etc/netns/NS/* over /etc/*
RULE_TAG = "nightcap-netns"  # iptables comment on the machine's rules: "<tag>:<prefix>"
PARTITION_CHAIN = "NIGHTCAP-PARTITION"  # inside a host: its partition rules (gone with its namespace)
LOSS_CHAIN = "NIGHTCAP-LOSS"
RAY_PORT = 6379
RAY_DASHBOARD_PORT = 8265
# Per Ray node: bounded, and checked against /dev/shm (24 GiB on this machine) for all nodes together.
RAY_OBJECT_STORE_MEMORY = 1 << 30
STOP_GRACE_S = 10.0
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class ClusterError(RuntimeError):
    """Something the cluster cannot do here (not root, tools missing) or a command that failed."""


# --------------------------------------------------------------------------------------------- the machine


def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here (for a refusal or a test's skip), or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux's; this is {sys.platform}"
    if os.geteuid() != 0:
        return "making network namespaces, veth links and iptables rules needs root (run as root, or with sudo)"
    missing = [f"`{tool}` (Debian: {package})" for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        return f"missing {' and '.join(missing)}: `make netns-tools` installs them"
    return None


TOOLS = {"ip": "iproute2", "iptables": "iptables"}


def probe() -> str | None:
    """``unavailable_reason``, and then whether this kernel really makes a namespace and a veth pair (a
    container without CAP_NET_ADMIN does not): the reason it cannot, or None."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    name = f"ncprobe{os.getpid() % 100000}"
    try:
        _run(["ip", "netns", "add", name])
        try:
            _run(["ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", INNER_LINK, "netns", name])
            _run(["ip", "netns", "exec", name, "iptables", "-S"])
        finally:
            subprocess.run(["ip", "link", "del", f"{name}a"], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    except ClusterError as error:
        return f"network namespaces cannot be made here: {error}"
    return None


def _run(command: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs: Any) -> str:
    """Runs a command, returns its stdout; a failure is a ClusterError that quotes its stderr."""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise ClusterError(f"`{shlex.join(command)}` exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def namespaces() -> list[str]:
    """Every named network namespace (``ip netns list``)."""
    out = _run(["ip", "-j", "netns", "list"]).strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def links() -> list[str]:
    """Every link of the machine's own namespace (``ip link``)."""
    out = _run(["ip", "-j", "link", "show"]).strip()
    return [entry["ifname"] for entry in json.loads(out)] if out else []


def namespace_pids(namespace: str) -> set[int]:
    """Every process whose network namespace is ``namespace`` (``ip netns pids``)."""
    out = _run(["ip", "netns", "pids", namespace], check=False)
    return {int(pid) for pid in out.split()}


def namespace_inode(namespace: str) -> int | None:
    with contextlib.suppress(OSError):
        return os.stat(f"/run/netns/{namespace}").st_ino
    return None


def iptables_rules(tag: str) -> list[str]:
    """The machine's own iptables rules (``iptables -S`` lines) that carry the comment ``tag``."""
    pattern = re.compile(rf'--comment "?{re.escape(tag)}"?(\s|$)')  # iptables -S quotes it: "nightcap-netns:nc"
    return [line for line in _run(["iptables", "-S"]).splitlines() if pattern.search(line)]


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python 3.12+
        os.setns(fd, CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def in_namespace(namespace: str, function: Callable[[], T]) -> T:
    """``function()`` run on a new thread that has joined ``namespace``; the calling thread stays where it
    is. A socket made there belongs to that namespace for its whole life, whichever thread then uses it."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            with open(f"/run/netns/{namespace}") as handle:
                _setns(handle.fileno())
            outcome["value"] = function()
        except BaseException as error:  # handed to the caller
            outcome["error"] = error

    thread = threading.Thread(target=body, name=f"netns-{namespace}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


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


class Cluster:
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
        state = _read_json(Path(state_dir) / "state.json")
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

    def ray_dir(self, host: str | int | Host) -> Path:
        return self.state_dir / "ray" / self.host(host).name

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
    def _locked(self) -> Iterator[dict]:
        """The state file, read and written back under an exclusive lock."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = _read_json(self.state_file) or {}
            yield state
            if state:
                self.state_file.write_text(json.dumps(state, indent=2) + "\n")
            else:
                self.state_file.unlink(missing_ok=True)

    def tracked(self) -> list[Tracked]:
        state = _read_json(self.state_file) or {}
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
        with self._locked() as state:
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
                _run(["ip", "link", "add", self.bridge, "type", "bridge", "stp_state", "0", "forward_delay", "0"])
            _run(["ip", "link", "set", self.bridge, "up"])
            existing = set(namespaces())
            for host in self.hosts:
                if host.namespace not in existing:
                    _run(["ip", "netns", "add", host.namespace])
                inner = _run(["ip", "-n", host.namespace, "-j", "link", "show"])
                if host.veth not in present or INNER_LINK not in {e["ifname"] for e in json.loads(inner or "[]")}:
                    subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
                    _run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", INNER_LINK,
                          "netns", host.namespace])  # fmt: skip
                _run(["ip", "link", "set", host.veth, "master", self.bridge, "up"])
                _run(["ip", "-n", host.namespace, "link", "set", "lo", "up"])
                _run(["ip", "-n", host.namespace, "link", "set", INNER_LINK, "up"])
                _run(["ip", "-n", host.namespace, "addr", "replace",
                      f"{host.address}/{self.network.prefixlen}", "dev", INNER_LINK])  # fmt: skip
                self._write_etc_hosts(host)
            # With br_netfilter loaded, bridged packets cross the machine's FORWARD chain: a DROP policy there
            # (docker sets one) would cut the hosts off from each other.
            rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment", self.rule_tag,
                    "-j", "ACCEPT"]  # fmt: skip
            if subprocess.run(["iptables", "-C", *rule], capture_output=True).returncode != 0:
                _run(["iptables", "-I", *rule])
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
        with self._locked() as state:
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
            done.processes = _stop(list(processes.values()), grace)
            for line in iptables_rules(self.rule_tag):
                _run(["iptables", *shlex.split(re.sub(r"^-A ", "-D ", line))])
                done.rules += 1
            # each veth first (both ends go), then the bridge
            for name in sorted(links(), key=lambda n: n == self.bridge):
                if self._ours(name, r"br|v\d+"):
                    subprocess.run(["ip", "link", "del", name], capture_output=True)
                    done.links += 1
            for namespace in ours:
                _run(["ip", "netns", "del", namespace])
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
        self._track(process.pid, target, command)
        logger.debug("{}: started pid {}: {} (log {})", target.name, process.pid, shlex.join(command), log)
        return process

    def _track(self, pid: int, host: Host, command: Sequence[str]) -> None:
        try:
            create_time = psutil.Process(pid).create_time()
        except psutil.Error:
            return  # already gone
        with self._locked() as state:
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
        packet = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, sequence) + payload
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

    # --- faults

    def partition(
        self, host: str | int | Host, *, peers: Sequence[str | int | Host] = (), method: str = "link"
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
            _run(["ip", "link", "set", target.veth, "down"])
            logger.info("{}: partitioned (link {} down)", target.name, target.veth)
        else:
            raise ClusterError(f"partition method {method!r}: link or iptables")

    def heal(self, host: str | int | Host) -> None:
        """Undoes ``partition``: the link up, the DROP rules gone."""
        target = self.host(host)
        _run(["ip", "link", "set", target.veth, "up"])
        self.exec(target, ["iptables", "-F", PARTITION_CHAIN], check=False)
        logger.info("{}: healed", target.name)

    def loss(self, host: str | int | Host, percent: float) -> None:
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

    def _chain(self, host: Host, chain: str, output: bool = True) -> None:
        """Makes ``chain`` in ``host`` (once) and sends the bridge's traffic through it."""
        if self.exec(host, ["iptables", "-n", "-L", chain], check=False).returncode != 0:
            self.exec(host, ["iptables", "-N", chain])
        hooks = [("INPUT", "-i")] + ([("OUTPUT", "-o")] if output else [])
        for hook, direction in hooks:
            rule = [hook, direction, INNER_LINK, "-j", chain]
            if self.exec(host, ["iptables", "-C", *rule], check=False).returncode != 0:
                self.exec(host, ["iptables", "-A", *rule])

    def relay(
        self,
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
        command = [sys.executable, "-m", "deploy.netns", "relay", "--listen", f"{where.address}:{listen_port}",
                   "--target", target, "--delay", str(delay)]  # fmt: skip
        if delay_back is not None:
            command += ["--delay-back", str(delay_back)]
        process = self.spawn(where, command, log=self.logs / f"{where.name}-relay-{listen_port}.log")
        self.wait_port(where, where.address, listen_port, timeout)
        return process

    # --- Ray

    def ray_env(self) -> dict[str, str]:
        """What every Ray node (and so every job and worker) runs with: the venv first on PATH (jobs run
        `python`), this var dir, token auth as `make ray-up`, and gloo bound to the host's bridge link."""
        var = self.state_dir.parent
        return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "NIGHTCAP_VAR": str(var),
                "RAY_AUTH_MODE": "token", "GLOO_SOCKET_IFNAME": INNER_LINK}  # fmt: skip

    def ray_up(
        self,
        object_store_memory: int = RAY_OBJECT_STORE_MEMORY,
        worker_cpus: int = 1,
        head_cpus: int = 0,
        port: int = RAY_PORT,
        dashboard_port: int = RAY_DASHBOARD_PORT,
        timeout: float = 180.0,
    ) -> str:
        """A Ray head in host 1 and a worker node in each other host (``ray start``, token auth), each with its
        own --temp-dir under ray/<host> and a bounded object store. Returns the jobs address. Idempotent."""
        shm = shutil.disk_usage("/dev/shm").total if Path("/dev/shm").exists() else 0
        total = object_store_memory * len(self.hosts)
        if shm and total > 0.8 * shm:
            raise ClusterError(
                f"{len(self.hosts)} object stores of {object_store_memory / 2**30:.1f} GiB need "
                f"{total / 2**30:.1f} GiB: more than 80 % of /dev/shm ({shm / 2**30:.1f} GiB)"
            )
        env = self.ray_env()
        ray = str(VENV_BIN / "ray")
        # token mode needs a token: made once in ~/.ray/auth_token (kept if there), then every node checks it
        _run([ray, "get-auth-token", "--generate"], env=env)
        head = self.hosts[0]
        gcs = f"{head.address}:{port}"
        for host in self.hosts:
            if any("raylet" in _cmdline(pid) for pid in namespace_pids(host.namespace)):
                logger.info("{}: Ray already runs there", host.name)
                continue
            common = [f"--node-ip-address={host.address}", f"--temp-dir={self.ray_dir(host)}",
                      f"--object-store-memory={object_store_memory}", "--disable-usage-stats"]  # fmt: skip
            if host is head:
                role = ["--head", f"--port={port}", f"--num-cpus={head_cpus}", "--include-dashboard=true",
                        f"--dashboard-host={head.address}", f"--dashboard-port={dashboard_port}"]  # fmt: skip
            else:
                role = [f"--address={gcs}", f"--num-cpus={worker_cpus}"]
            self.ray_dir(host).mkdir(parents=True, exist_ok=True)
            log = self.logs / f"{host.name}-ray-start.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [ray, "start", *role, *common]
            result = self.exec(host, command, check=False, env=env, timeout=timeout, cwd=REPO)
            log.write_text(result.stdout + result.stderr)
            if result.returncode != 0:
                raise ClusterError(f"{host.name}: `ray start` exited {result.returncode}, see {log}")
            with self._locked() as state:
                state["ray"] = {"gcs": gcs, "jobs": f"http://{head.address}:{dashboard_port}"}
            for pid in namespace_pids(host.namespace):
                self._track(pid, host, [_cmdline(pid) or "?"])
            logger.info("{}: Ray {} node on {} (temp dir {})", host.name,
                        "head" if host is head else "worker", host.address, self.ray_dir(host))  # fmt: skip
        self._wait_ray_nodes(gcs, env, timeout)
        jobs = f"http://{head.address}:{dashboard_port}"
        logger.info("Ray cluster of {} nodes up; jobs API {} (from inside a host)", len(self.hosts), jobs)
        return jobs

    def _wait_ray_nodes(self, gcs: str, env: dict[str, str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        alive = 0
        while time.monotonic() < deadline:
            status = self.exec(1, [str(VENV_BIN / "ray"), "status", f"--address={gcs}"], check=False, env=env)
            active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in status.stdout else ""
            alive = len(re.findall(r"^\s*\d+ node_[0-9a-f]+", active, re.MULTILINE))
            if alive >= len(self.hosts):
                return
            time.sleep(2)
        raise ClusterError(f"only {alive} of {len(self.hosts)} Ray nodes alive after {timeout:.0f} s")

    def ray_jobs_address(self) -> str:
        state = _read_json(self.state_file) or {}
        if "ray" not in state:
            raise ClusterError(f"no Ray cluster recorded in {self.state_file}: make cluster-up starts one")
        return state["ray"]["jobs"]


def _cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def _stop(processes: list[psutil.Process], grace: float) -> int:
    """SIGTERM to each, SIGKILL to what is left after ``grace`` s; the number that were running."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=grace)
    if alive:
        logger.info("SIGKILL to what outlived SIGTERM by {} s: {}", grace, ", ".join(map(_describe, alive)))
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(processes)


def _describe(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.name()}"
    except psutil.Error:
        return str(process.pid)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------- the relay

# Latency without netem: no packaged tool on this Debian delays a TCP stream (socat, haproxy and nginx forward at
# once; tc's netem qdisc is the usual answer and this kernel lacks it), so this relay is hand-written. Each
# direction is a queue of (due time, chunk): a chunk read at t is written at t + delay, in order, so a round
# trip through the relay takes delay + delay_back more, whatever the rate. The connection to the target is made
# at once; a bounded queue holds back a reader that runs ahead of its writer.
RELAY_CHUNK = 64 * 1024
RELAY_QUEUE = 256  # chunks per direction: at most 16 MiB held


async def _delayed_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(RELAY_QUEUE)

    async def read() -> None:
        try:
            while data := await reader.read(RELAY_CHUNK):
                await queue.put((loop.time() + delay, data))
        except (ConnectionError, OSError):
            pass  # a reset ends the stream like a close
        finally:
            await queue.put((loop.time() + delay, b""))  # end of stream, delayed like the data

    async def write() -> None:
        while True:
            due, data = await queue.get()
            await asyncio.sleep(max(0.0, due - loop.time()))
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    reading = asyncio.ensure_future(read())
    try:
        await write()
    finally:
        reading.cancel()


async def _relay_connection(
    client_reader: asyncio.StreamReader,
    client_writer: asyncio.StreamWriter,
    target: tuple[str, int],
    delay: float,
    delay_back: float,
) -> None:
    try:
        target_reader, target_writer = await asyncio.open_connection(*target)
    except OSError as error:
        logger.warning("relay: cannot reach {}:{}: {}", *target, error)
        client_writer.close()
        return
    try:
        await asyncio.gather(
            _delayed_pipe(client_reader, target_writer, delay), _delayed_pipe(target_reader, client_writer, delay_back)
        )
    except (ConnectionError, OSError):
        pass
    finally:
        for writer in (client_writer, target_writer):
            writer.close()


async def run_relay(
    listen: tuple[str, int],
    target: tuple[str, int],
    delay: float,
    delay_back: float | None = None,
    ready: Callable[[int], None] | None = None,
) -> None:
    """Serves ``listen`` until cancelled: each connection relayed to ``target``, with ``delay`` s added to each
    byte sent to it and ``delay_back`` (default: ``delay``) to each byte it sends back. ``ready(port)`` once
    listening."""
    back = delay if delay_back is None else delay_back
    server = await asyncio.start_server(
        lambda r, w: _relay_connection(r, w, target, delay, back), listen[0], listen[1], reuse_address=True
    )
    port = server.sockets[0].getsockname()[1]
    logger.info("relay {}:{} -> {}:{}, delay {} s there, {} s back", listen[0], port, *target, delay, back)
    if ready is not None:
        ready(port)
    async with server:
        await server.serve_forever()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"{text!r}: expected host:port")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------------------------- the CLI

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])

Prefix = Annotated[
    str,
    typer.Option(
        envvar="NIGHTCAP_CLUSTER_PREFIX",
        help="Names every namespace (<prefix>-h<i>), link (<prefix>-v<i>, <prefix>-br) and iptables comment of "
        "the cluster; `down` removes all of them. A lower-case letter and at most 9 letters or digits.",
    ),
]
StateDir = Annotated[
    Path,
    typer.Option(
        envvar="NIGHTCAP_CLUSTER_DIR",
        help="Where the cluster keeps its names file (hosts), state.json (settings, started processes), logs/ "
        "and each Ray node's temp dir (ray/<host>).",
    ),
]
Grace = Annotated[float, typer.Option(help="Seconds processes in the hosts get after SIGTERM before SIGKILL.", min=0)]
HostArgument = Annotated[str, typer.Argument(help="A host: its name (h2), namespace (nc-h2), index (2) or address.")]


def _cluster(state_dir: Path, prefix: str | None) -> Cluster:
    try:
        return Cluster.from_state(state_dir, prefix)
    except ClusterError as error:
        _fail(str(error))


def _fail(message: str) -> NoReturn:
    logger.error(message)
    raise typer.Exit(1)


@app.callback()
def _logging(
    log_level: Annotated[str, typer.Option(envvar="NIGHTCAP_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.")] = (
        "INFO"
    ),
) -> None:
    from services.common.logs import setup_logging

    setup_logging("cluster", log_level)


@app.command()
def up(
    hosts: Annotated[
        int, typer.Option(envvar="NIGHTCAP_CLUSTER_HOSTS", min=1, max=MAX_HOSTS, help="How many hosts (h1 .. hN).")
    ] = DEFAULT_HOSTS,
    prefix: Prefix = DEFAULT_PREFIX,
    subnet: Annotated[
        str,
        typer.Option(
            envvar="NIGHTCAP_CLUSTER_SUBNET",
            help="The hosts' private IPv4 network; host i gets its i-th address. Nothing routes out of it.",
        ),
    ] = DEFAULT_SUBNET,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    ray: Annotated[
        bool,
        typer.Option(
            help="Also start Ray: the head in h1 (no CPUs of its own, so training workers land on the others), "
            "a worker node in each other host (`ray start --address`), token auth as `make ray-up`."
        ),
    ] = False,
    object_store_memory: Annotated[
        int,
        typer.Option(
            envvar="RAY_OBJECT_STORE_MEMORY",
            min=78643200,
            help="Bytes of object store per Ray node (all of them together must fit in 80 % of /dev/shm).",
        ),
    ] = RAY_OBJECT_STORE_MEMORY,
    worker_cpus: Annotated[int, typer.Option(min=1, help="CPUs each Ray worker node offers.")] = 1,
    head_cpus: Annotated[int, typer.Option(min=0, help="CPUs the Ray head offers (0: it runs no training).")] = 0,
    ray_port: Annotated[int, typer.Option(help="The head's GCS port (on h1's address).")] = RAY_PORT,
    dashboard_port: Annotated[
        int, typer.Option(help="The head's dashboard and jobs API port (on h1's address).")
    ] = RAY_DASHBOARD_PORT,
    timeout: Annotated[float, typer.Option(help="Seconds Ray may take until every node is alive.")] = 180.0,
) -> None:
    """Make the hosts (what is missing; running it again changes nothing), optionally with a Ray cluster."""
    try:
        cluster = Cluster(prefix, hosts, subnet, state_dir).up()
        if ray:
            jobs = cluster.ray_up(object_store_memory, worker_cpus, head_cpus, ray_port, dashboard_port, timeout)
            typer.echo(f"Ray jobs API: {jobs} (reachable from inside the hosts). Submit from h1 with")
            typer.echo("  python -m deploy.netns submit -- python training/finetune.py --num-workers 2 ...")
    except ClusterError as error:
        _fail(f"cluster-up: {error} (what was made is left for a look: `make cluster-down` removes it)")
    typer.echo(f"hosts ({cluster.hosts_file}):")
    for host in cluster.hosts:
        typer.echo(f"  {host.name:<4} {host.address:<15} namespace {host.namespace}")


@app.command()
def down(
    prefix: Annotated[
        str | None,
        typer.Option(
            envvar="NIGHTCAP_CLUSTER_PREFIX",
            help="The cluster to remove (default: the one recorded in the state dir, else nc); everything of "
            "this prefix goes, also what an earlier run left.",
        ),
    ] = None,
    state_dir: StateDir = DEFAULT_STATE_DIR,
    grace: Grace = STOP_GRACE_S,
) -> None:
    """Stop every process in the hosts, then remove the namespaces, links and iptables rules: nothing is left."""
    try:
        done = _cluster(state_dir, prefix).down(grace)
    except ClusterError as error:
        _fail(f"cluster-down: {error}")
    typer.echo(f"removed {done}")


@app.command()
def status(state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Each host: address, link state and the processes running in it."""
    cluster = _cluster(state_dir, None)
    existing = set(namespaces())
    up_links = {e["ifname"]: e.get("operstate") for e in json.loads(_run(["ip", "-j", "link", "show"]) or "[]")}
    for host in cluster.hosts:
        if host.namespace not in existing:
            typer.echo(f"{host.name:<4} {host.address:<15} (no namespace)")
            continue
        pids = sorted(namespace_pids(host.namespace))
        typer.echo(
            f"{host.name:<4} {host.address:<15} link {up_links.get(host.veth, 'missing')}, {len(pids)} process(es)"
        )
        for pid in pids:
            typer.echo(f"       {pid:>7} {_cmdline(pid)[:100]}")


@app.command(name="exec", context_settings={"ignore_unknown_options": True})
def exec_(
    host: HostArgument,
    command: Annotated[list[str], typer.Argument(help="The command and its arguments (after --).")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Run a command inside a host (`ip netns exec`), in the foreground; exits with its status."""
    cluster = _cluster(state_dir, None)
    try:
        target = cluster.host(host)
    except ClusterError as error:
        _fail(str(error))
    raise typer.Exit(subprocess.run(cluster.command(target, command)).returncode)


@app.command()
def partition(
    host: HostArgument,
    peer: Annotated[
        list[str] | None,
        typer.Option("--from", help="Cut the host off from only this peer (repeatable; iptables DROP both ways)."),
    ] = None,
    method: Annotated[
        str, typer.Option(help="link: the host's link down; iptables: DROP everything on its bridge link.")
    ] = "link",
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Cut a host off the bridge (`heal` undoes it)."""
    try:
        _cluster(state_dir, None).partition(host, peers=peer or (), method=method)
    except ClusterError as error:
        _fail(str(error))


@app.command()
def heal(host: HostArgument, state_dir: StateDir = DEFAULT_STATE_DIR) -> None:
    """Undo `partition`: the host's link up and its DROP rules gone."""
    try:
        _cluster(state_dir, None).heal(host)
    except ClusterError as error:
        _fail(str(error))


@app.command()
def loss(
    host: HostArgument,
    percent: Annotated[float, typer.Argument(help="Percent of the packets arriving at the host to drop; 0: none.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """Drop a share of the packets arriving at a host, at random (iptables statistic match)."""
    try:
        _cluster(state_dir, None).loss(host, percent)
    except ClusterError as error:
        _fail(str(error))


@app.command()
def ping(
    source: HostArgument,
    target: Annotated[str, typer.Argument(help="The host to ping: a name (h2, nc-h2) or an address.")],
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """One ICMP echo from a host to another (Debian's ping is not installed here): the round trip, or exit 1."""
    try:
        rtt = _cluster(state_dir, None).ping(source, target)
    except (ClusterError, OSError) as error:
        _fail(f"{source} -> {target}: {error}")
    typer.echo(f"{source} -> {target}: {rtt * 1000:.3f} ms")


@app.command()
def relay(
    listen: Annotated[str, typer.Option(help="host:port to listen on (port 0: any free one).")],
    target: Annotated[str, typer.Option(help="host:port to forward each connection to (names allowed).")],
    delay: Annotated[float, typer.Option(min=0, help="Seconds added to every byte sent towards the target.")],
    delay_back: Annotated[
        float | None, typer.Option(min=0, help="Seconds added to every byte coming back (default: --delay).")
    ] = None,
) -> None:
    """A delaying TCP relay, run where it is started (`exec HOST -- python -m deploy.netns relay ...` puts it
    in a host): latency without netem."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_relay(_host_port(listen), _host_port(target), delay, delay_back))


@app.command(context_settings={"ignore_unknown_options": True})
def submit(
    entrypoint: Annotated[list[str], typer.Argument(help="The job's command (after --), run from the repository.")],
    host: Annotated[str, typer.Option(help="The host `ray job submit` runs in.")] = "h1",
    state_dir: StateDir = DEFAULT_STATE_DIR,
) -> None:
    """`ray job submit` from a host to the cluster's Ray head, with this repository as the working dir; the
    job's log follows. Exits with the CLI's status."""
    cluster = _cluster(state_dir, None)
    try:
        jobs = cluster.ray_jobs_address()
        command = [str(VENV_BIN / "ray"), "job", "submit", "--address", jobs, "--working-dir", str(REPO), "--",
                   *entrypoint]  # fmt: skip
        run = cluster.command(host, command)
    except ClusterError as error:
        _fail(str(error))
    raise typer.Exit(subprocess.run(run, env=cluster.ray_env(), cwd=REPO).returncode)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
