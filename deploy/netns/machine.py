"""The machine side of the hosts: what namespaces, links and iptables rules exist, and running code inside one."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil
from loguru import logger

REPO = Path(__file__).resolve().parents[2]
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
        run_command(["ip", "netns", "add", name])
        try:
            run_command(["ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", INNER_LINK, "netns", name])
            run_command(["ip", "netns", "exec", name, "iptables", "-S"])
        finally:
            subprocess.run(["ip", "link", "del", f"{name}a"], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    except ClusterError as error:
        return f"network namespaces cannot be made here: {error}"
    return None


def run_command(command: Sequence[str], *, check: bool = True, timeout: float = 60, **kwargs: Any) -> str:
    """Runs a command, returns its stdout; a failure is a ClusterError that quotes its stderr."""
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise ClusterError(f"`{shlex.join(command)}` exited {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def namespaces() -> list[str]:
    """Every named network namespace (``ip netns list``)."""
    out = run_command(["ip", "-j", "netns", "list"]).strip()
    return [entry["name"] for entry in json.loads(out)] if out else []


def links() -> list[str]:
    """Every link of the machine's own namespace (``ip link``)."""
    out = run_command(["ip", "-j", "link", "show"]).strip()
    return [entry["ifname"] for entry in json.loads(out)] if out else []


def namespace_pids(namespace: str) -> set[int]:
    """Every process whose network namespace is ``namespace`` (``ip netns pids``)."""
    out = run_command(["ip", "netns", "pids", namespace], check=False)
    return {int(pid) for pid in out.split()}


def namespace_inode(namespace: str) -> int | None:
    with contextlib.suppress(OSError):
        return os.stat(f"/run/netns/{namespace}").st_ino
    return None


def iptables_rules(tag: str) -> list[str]:
    """The machine's own iptables rules (``iptables -S`` lines) that carry the comment ``tag``."""
    pattern = re.compile(rf'--comment "?{re.escape(tag)}"?(\s|$)')  # iptables -S quotes it: "nightcap-netns:nc"
    return [line for line in run_command(["iptables", "-S"]).splitlines() if pattern.search(line)]


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


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def stop_processes(processes: list[psutil.Process], grace: float) -> int:
    """SIGTERM to each, SIGKILL to what is left after ``grace`` s; the number that were running."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=grace)
    if alive:
        logger.info("SIGKILL to what outlived SIGTERM by {} s: {}", grace, ", ".join(map(describe_process, alive)))
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=5)
    return len(processes)


def describe_process(process: psutil.Process) -> str:
    try:
        return f"{process.pid} {process.name()}"
    except psutil.Error:
        return str(process.pid)


def icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
