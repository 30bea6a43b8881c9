"""A Ray cluster on the hosts: the head in h1, a worker node in each other host, token auth as `make ray-up`."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import time
from collections.abc import Sequence
from pathlib import Path

from loguru import logger

from deploy.netns.cluster import Cluster, Host
from deploy.netns.machine import (
    INNER_LINK,
    REPO,
    VENV_BIN,
    ClusterError,
    cmdline,
    namespace_pids,
    read_json,
    run_command,
)

RAY_PORT = 6379
RAY_DASHBOARD_PORT = 8265
# Per Ray node: bounded, and checked against /dev/shm (24 GiB on this machine) for all nodes together.
RAY_OBJECT_STORE_MEMORY = 1 << 30
# The longest socket a node makes under its --temp-dir, less the pid in the session's name; Ray refuses one
# over 107 bytes (Linux's sun_path less its terminating NUL).
RAY_LONGEST_SOCKET = "/session_2026-01-01_00-00-00_000000_/sockets/dash_MetricsHead"
UNIX_PATH_MAX = 107


def ray_env(cluster: Cluster) -> dict[str, str]:
    """What every Ray node (and so every job and worker) runs with: the venv first on PATH (jobs run
    `python`), this var dir, token auth as `make ray-up`, and gloo bound to the host's bridge link."""
    var = cluster.state_dir.parent
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "NIGHTCAP_VAR": str(var),
            "RAY_AUTH_MODE": "token", "GLOO_SOCKET_IFNAME": INNER_LINK}  # fmt: skip


def ray_up(
    cluster: Cluster,
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
    total = object_store_memory * len(cluster.hosts)
    if shm and total > 0.8 * shm:
        raise ClusterError(
            f"{len(cluster.hosts)} object stores of {object_store_memory / 2**30:.1f} GiB need "
            f"{total / 2**30:.1f} GiB: more than 80 % of /dev/shm ({shm / 2**30:.1f} GiB)"
        )
    _check_socket_paths(cluster)
    env = ray_env(cluster)
    ray = str(VENV_BIN / "ray")
    # token mode needs a token: made once in ~/.ray/auth_token (kept if there), then every node checks it
    run_command([ray, "get-auth-token", "--generate"], env=env)
    head = cluster.hosts[0]
    gcs = f"{head.address}:{port}"
    for host in cluster.hosts:
        if any("raylet" in cmdline(pid) for pid in namespace_pids(host.namespace)):
            logger.info("{}: Ray already runs there", host.name)
            continue
        common = [f"--node-ip-address={host.address}", f"--temp-dir={ray_dir(cluster, host)}",
                  f"--object-store-memory={object_store_memory}", "--disable-usage-stats"]  # fmt: skip
        if host is head:
            role = ["--head", f"--port={port}", f"--num-cpus={head_cpus}", "--include-dashboard=true",
                    f"--dashboard-host={head.address}", f"--dashboard-port={dashboard_port}"]  # fmt: skip
        else:
            role = [f"--address={gcs}", f"--num-cpus={worker_cpus}"]
        ray_dir(cluster, host).mkdir(parents=True, exist_ok=True)
        log = cluster.logs / f"{host.name}-ray-start.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [ray, "start", *role, *common]
        result = cluster.exec(host, command, check=False, env=env, timeout=timeout, cwd=REPO)
        log.write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            raise ClusterError(f"{host.name}: `ray start` exited {result.returncode}, see {log}")
        with cluster.locked() as state:
            state["ray"] = {"gcs": gcs, "jobs": f"http://{head.address}:{dashboard_port}"}
        for pid in namespace_pids(host.namespace):
            cluster.track(pid, host, [cmdline(pid) or "?"])
        logger.info("{}: Ray {} node on {} (temp dir {})", host.name,
                    "head" if host is head else "worker", host.address, ray_dir(cluster, host))  # fmt: skip
    _wait_ray_nodes(cluster, gcs, env, timeout)
    jobs = f"http://{head.address}:{dashboard_port}"
    logger.info("Ray cluster of {} nodes up; jobs API {} (from inside a host)", len(cluster.hosts), jobs)
    return jobs


def _check_socket_paths(cluster: Cluster) -> None:
    """A ClusterError, before anything starts, where a node's temp dir leaves its sockets too long a path
    (``ray start`` would fail with the dashboard's, a minute in)."""
    pid_digits = len(str(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1))
    folder = max((ray_dir(cluster, host) for host in cluster.hosts), key=lambda path: len(str(path).encode()))
    longest = len(str(folder).encode()) + len(RAY_LONGEST_SOCKET) + pid_digits
    if longest > UNIX_PATH_MAX:
        raise ClusterError(
            f"Ray's sockets under {folder} would be {longest} bytes long, more than {UNIX_PATH_MAX}: give the "
            "cluster a shorter state dir"
        )


def _wait_ray_nodes(cluster: Cluster, gcs: str, env: dict[str, str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    alive = 0
    while time.monotonic() < deadline:
        status = cluster.exec(1, [str(VENV_BIN / "ray"), "status", f"--address={gcs}"], check=False, env=env)
        active = status.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in status.stdout else ""
        alive = len(re.findall(r"^\s*\d+ node_[0-9a-f]+", active, re.MULTILINE))
        if alive >= len(cluster.hosts):
            return
        time.sleep(2)
    raise ClusterError(f"only {alive} of {len(cluster.hosts)} Ray nodes alive after {timeout:.0f} s")


def kill_ray_node(cluster: Cluster, host: str | int | Host) -> int:
    """``kill -9`` every process in ``host``, there its Ray node's (raylet, agents, the workers on it), as a
    machine that dies takes them; ``ray_up`` starts the node again. Returns how many there were."""
    target = cluster.host(host)
    pids = namespace_pids(target.namespace)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    logger.info("{}: SIGKILL to the {} processes of its Ray node", target.name, len(pids))
    return len(pids)


def job_submit_command(cluster: Cluster, entrypoint: Sequence[str]) -> list[str]:
    """``ray job submit`` to the cluster's head with this repository as the working dir: it follows the job's
    log and exits with the job's status (run it in a host, with ``ray_env``)."""
    return [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_jobs_address(cluster), "--working-dir",
            str(REPO), "--", *entrypoint]  # fmt: skip


def ray_jobs_address(cluster: Cluster) -> str:
    state = read_json(cluster.state_file) or {}
    if "ray" not in state:
        raise ClusterError(f"no Ray cluster recorded in {cluster.state_file}: make cluster-up starts one")
    return state["ray"]["jobs"]


def ray_dir(cluster: Cluster, host: str | int | Host) -> Path:
    """A Ray node's --temp-dir: ray/<host> in the cluster's state dir."""
    return cluster.state_dir / "ray" / cluster.host(host).name
