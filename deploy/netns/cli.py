"""The `python -m deploy.netns` command line (see the package docstring for a tour)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
import uvloop
from loguru import logger

from deploy.netns import ray as ray_nodes
from deploy.netns.cluster import Cluster
from deploy.netns.machine import (
    DEFAULT_HOSTS,
    DEFAULT_PREFIX,
    DEFAULT_STATE_DIR,
    DEFAULT_SUBNET,
    MAX_HOSTS,
    REPO,
    STOP_GRACE_S,
    ClusterError,
    cmdline,
    namespace_pids,
    namespaces,
    run_command,
)
from deploy.netns.ray import RAY_DASHBOARD_PORT, RAY_OBJECT_STORE_MEMORY, RAY_PORT
from deploy.netns.relay import run_relay


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"{text!r}: expected host:port")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------------------------- the CLI

HELP = "Hosts on one machine: Linux network namespaces on a bridge (python -m deploy.netns)."
app = typer.Typer(
    add_completion=False, no_args_is_help=True, help=(sys.modules["deploy.netns"].__doc__ or "").splitlines()[0]
)

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
            jobs = ray_nodes.ray_up(
                cluster, object_store_memory, worker_cpus, head_cpus, ray_port, dashboard_port, timeout
            )
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
    up_links = {e["ifname"]: e.get("operstate") for e in json.loads(run_command(["ip", "-j", "link", "show"]) or "[]")}
    for host in cluster.hosts:
        if host.namespace not in existing:
            typer.echo(f"{host.name:<4} {host.address:<15} (no namespace)")
            continue
        pids = sorted(namespace_pids(host.namespace))
        typer.echo(
            f"{host.name:<4} {host.address:<15} link {up_links.get(host.veth, 'missing')}, {len(pids)} process(es)"
        )
        for pid in pids:
            typer.echo(f"       {pid:>7} {cmdline(pid)[:100]}")


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
    delay: Annotated[float, typer.Option(min=0, help="Seconds added to every byte sent towards the target.")],
    target: Annotated[
        str | None,
        typer.Option(
            help="host:port to forward each connection to (names allowed); none: to where each was going before "
            "an iptables REDIRECT rule sent it here (transparent)."
        ),
    ] = None,
    delay_back: Annotated[
        float | None, typer.Option(min=0, help="Seconds added to every byte coming back (default: --delay).")
    ] = None,
) -> None:
    """A delaying TCP relay, run where it is started (`exec HOST -- python -m deploy.netns relay ...` puts it
    in a host): latency without netem."""
    with contextlib.suppress(KeyboardInterrupt):
        # uvloop (the gateway's pinned loop): the relay's own cost per message is what a tensor-parallel step,
        # dozens of small exchanges, pays most for
        uvloop.run(run_relay(_host_port(listen), _host_port(target) if target else None, delay, delay_back))


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
        run = cluster.command(host, ray_nodes.job_submit_command(cluster, entrypoint))
    except ClusterError as error:
        _fail(str(error))
    raise typer.Exit(subprocess.run(run, env=ray_nodes.ray_env(cluster), cwd=REPO).returncode)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
