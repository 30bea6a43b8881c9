"""`make cluster-check`: nightcap's serving stack on hosts made of network namespaces, under the faults a network
has, measured and written to var/bench/cluster.json.

    python -m deploy.netns.bench --model smollm2-135m-instruct     # what `make cluster-check` runs

Scenarios, each on its own three hosts (h1: the orchestrator and its chats, h2 and h3: generation replicas):
- ``latency``: one replica in h2; chats from h1 with nothing in between, through a relay adding 1, 10 and 50 ms
  each way (``relay.py``: this kernel has no netem), and with 1 % of the packets arriving at h1 and at h2 dropped
  (iptables ``statistic``); a row with orchestrator and replica in the same host is the loopback baseline.
- ``replicas``: 32 chats streaming over replicas in h2 and h3; h3 cut off from h1 (iptables DROP) mid-way, then
  healed: chats failed in flight, chats failed after the loss was visible, seconds to notice and to recover.
- ``tensor``: greedy decode tokens/s of one stream from h1, served by one rank in h2, then by tensor-parallel
  ranks in h2 and h3 directly and through transparent relays adding 0, 1 and 10 ms each way (``tensor.py``);
  rounds interleaved, each start's greedy tokens compared with one rank's.
- ``training``: a Ray head in h1, one fine-tuning worker in each of h2 and h3; every Ray process of h3 killed
  mid-run and started again: the resumed run's per-step losses against a straight run's, the steps redone, the
  seconds lost (``training.py``).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from loguru import logger

from deploy.netns.chatload import CHAT_TIMEOUT_S
from deploy.netns.cluster import Cluster
from deploy.netns.machine import DEFAULT_SUBNET, ClusterError
from deploy.netns.tensor import tensor_parallel_table
from deploy.netns.training import training_through_lost_host
from services.common.channels import KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS

GENERATION_PORT = 50051
RELAY_PORT = 7300
LATENCIES_S = (0.001, 0.01, 0.05)
LOSS_PERCENT = 1.0
SERVE_TIMEOUT_S = 300.0


def serve_generation(
    cluster: Cluster, host: str, model: str, folder: Path, var_dir: Path | None = None, port: int = GENERATION_PORT
) -> subprocess.Popen:
    """A generation replica in ``host`` on its address:``port`` (plaintext: the hosts are a private network),
    its models registered in ``var_dir`` (default: ``folder``/var), its log in ``folder``."""
    address = f"{cluster.host(host).address}:{port}"
    command = [sys.executable, "-m", "services.generation", "serve", "--model", model, "--address", address,
               "--metrics-address", "", "--var-dir", str(var_dir or folder / "var"), "--insecure"]  # fmt: skip
    return cluster.spawn(host, command, log=folder / f"generation-{host}.log")


def wait_file(path: Path, timeout: float, *processes: subprocess.Popen) -> None:
    """Waits for ``path``; an AssertionError when it does not come, or a process exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        exited = [p.args for p in processes if p.poll() is not None]
        if exited or time.monotonic() > deadline:
            raise AssertionError(f"no {path} after {timeout:.0f} s" + (f"; exited: {exited}" if exited else ""))
        time.sleep(0.05)


def mark(folder: Path, name: str) -> None:
    """The answer to the driver's marker (chatload.wait_marker): the wall time, written at once."""
    (folder / f".{name}").write_text(f"{time.time():.6f}\n")
    (folder / f".{name}").rename(folder / name)


def run_chatload(cluster: Cluster, host: str, args: list[str], folder: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "deploy.netns.chatload", *args, "--out", str(folder)]
    return cluster.spawn(host, command, log=folder / "driver.log")


def replica_partition(
    cluster: Cluster,
    model: str,
    folder: Path,
    chats: int = 32,
    tokens: int = 900,
    after_s: float = 10.0,
    var_dir: Path | None = None,
) -> dict:
    """The replicas scenario (module docstring): chatload's ``result.json``, with the driver's log on failure."""
    replicas = [serve_generation(cluster, host, model, folder, var_dir) for host in ("h2", "h3")]
    generation = ",".join(f"{cluster.host(h).address}:{GENERATION_PORT}" for h in ("h2", "h3"))
    driver = run_chatload(
        cluster, "h1", ["replicas", "--generation", generation, "--chats", str(chats), "--tokens", str(tokens),
                        "--after-s", str(after_s)], folder,
    )  # fmt: skip
    try:
        wait_file(folder / "streaming", SERVE_TIMEOUT_S, driver, *replicas)
        cluster.partition("h3", peers=["h1"])
        try:
            mark(folder, "partitioned")
            wait_file(folder / "after", after_s + 60, driver)
        finally:
            cluster.heal("h3")
        mark(folder, "healed")
        if driver.wait(CHAT_TIMEOUT_S + 120) != 0:
            raise AssertionError(f"the driver failed: {(folder / 'driver.log').read_text()[-3000:]}")
    finally:
        for process in (driver, *replicas):
            process.kill()
            process.wait(10)
    return json.loads((folder / "result.json").read_text())


def summarize_partition(result: dict) -> dict:
    """The figures the note gives: chats failed in flight, failed after the loss was visible, hung, seconds."""
    partitioned = result["partitioned_at"]
    failed = [c for c in result["in_flight"] if c["status"] != "OK"]
    visible = max((c["ended"] for c in failed), default=partitioned)
    after = result["after"]
    return {
        "chats_in_flight": len(result["in_flight"]),
        "failed_in_flight": len(failed),
        "failed_in_flight_codes": sorted({c["status"] for c in failed}),
        "seconds_to_notice": round(visible - partitioned, 2),
        "chats_started_after_partition": len(after),
        "failed_before_visible": sum(c["status"] != "OK" and c["started"] <= visible for c in after),
        "failed_after_visible": sum(c["status"] != "OK" and c["started"] > visible for c in after),
        "hung": sum(c["status"] in ("RUNNING", "DEADLINE_EXCEEDED") for c in result["in_flight"] + after),
        "seconds_to_recover": result["seconds_to_recover"] and round(result["seconds_to_recover"], 2),
        "keepalive_ms": {"time": KEEPALIVE_TIME_MS, "timeout": KEEPALIVE_TIMEOUT_MS},
    }


def latency_table(
    cluster: Cluster, model: str, folder: Path, chats: int, tokens: int, var_dir: Path | None = None
) -> list[dict]:
    """TTFT and decode tokens/s of chats one at a time, for each path between orchestrator (h1) and replica."""
    replica = serve_generation(cluster, "h2", model, folder, var_dir)
    h1, h2 = cluster.host("h1").address, cluster.host("h2").address
    direct = f"{h2}:{GENERATION_PORT}"
    rows = []

    def measure(name: str, host: str, generation: str) -> None:
        where = folder / name.replace(" ", "_").replace("%", "pct")
        where.mkdir()
        driver = run_chatload(cluster, host, ["latency", "--generation", generation, "--chats", str(chats),
                                              "--tokens", str(tokens)], where)  # fmt: skip
        if driver.wait(600) != 0:
            raise AssertionError(f"{name}: the driver failed: {(where / 'driver.log').read_text()[-3000:]}")
        rows.append({"path": name, **json.loads((where / "result.json").read_text())})
        logger.info("{}: {}", name, rows[-1])

    try:
        deadline = time.monotonic() + SERVE_TIMEOUT_S
        while replica.poll() is None and time.monotonic() < deadline:
            try:
                cluster.wait_port("h1", h2, GENERATION_PORT, 2.0)
                break
            except ClusterError:
                continue
        if replica.poll() is not None:
            raise AssertionError(f"the replica exited: {(folder / 'generation-h2.log').read_text()[-2000:]}")
        measure("same host (loopback)", "h2", direct)
        measure("bridge", "h1", direct)
        for delay in LATENCIES_S:
            relay = cluster.relay("h1", RELAY_PORT, direct, delay)
            try:
                measure(f"bridge + {delay * 1000:g} ms each way", "h1", f"{h1}:{RELAY_PORT}")
            finally:
                relay.kill()
                relay.wait(10)
        for host in ("h1", "h2"):
            cluster.loss(host, LOSS_PERCENT)
        try:
            measure(f"bridge + {LOSS_PERCENT:g}% loss each way", "h1", direct)
        finally:
            for host in ("h1", "h2"):
                cluster.loss(host, 0)
    finally:
        replica.kill()
        replica.wait(10)
    return rows


def print_tables(report: dict) -> None:
    if "latency" in report:
        typer.echo(
            f"\n{'path orchestrator -> generation':<34} {'TTFT median':>12} {'TTFT max':>10} {'tokens/s':>9}  ok"
        )
        for row in report["latency"]:
            ttft, worst, rate = row["ttft_ms_median"], row["ttft_ms_max"], row["tokens_per_s_median"]
            typer.echo(
                f"{row['path']:<34} {ttft or 0:>9.1f} ms {worst or 0:>7.1f} ms {rate or 0:>9.1f}  "
                f"{row['answered']}/{row['chats']}"
            )
    if "replicas" in report:
        typer.echo("\nreplica partitioned mid-stream:")
        for key, value in report["replicas"].items():
            typer.echo(f"  {key:<32} {value}")
    if "tensor" in report:
        tensor = report["tensor"]
        typer.echo(f"\n{tensor['model']}, {tensor['tokens']} greedy tokens, {tensor['rounds']} rounds:")
        typer.echo(f"{'ranks':<40} {'tokens/s median':>15} {'TTFT median':>12}  per round; tokens = one rank's")
        for row in tensor["rows"]:
            typer.echo(
                f"{row['path']:<40} {row['decode_tokens_per_s_median']:>15.2f} {row['ttft_ms_median']:>9.0f} ms  "
                f"{row['decode_tokens_per_s']}; {row['greedy_equals_one_rank']}"
            )


app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


@app.command()
def check(
    model: Annotated[str, typer.Option(envvar="NIGHTCAP_MODEL", help="The model every replica serves.")] = (
        "smollm2-135m-instruct"
    ),
    out: Annotated[Path, typer.Option(help="Where the figures go (JSON).")] = Path("var/bench/cluster.json"),
    scenarios: Annotated[str, typer.Option(help="Comma-separated: latency, replicas, tensor, training.")] = (
        "latency,replicas,tensor,training"
    ),
    chats: Annotated[int, typer.Option(help="Latency: chats per path, one at a time.")] = 3,
    tokens: Annotated[int, typer.Option(help="Latency: tokens per chat.")] = 16,
    partition_chats: Annotated[int, typer.Option(help="Replicas: chats streaming at the partition.")] = 32,
    partition_tokens: Annotated[int, typer.Option(help="Replicas: tokens each of those asks for.")] = 64,
    tensor_tokens: Annotated[int, typer.Option(help="Tensor: greedy tokens per stream.")] = 16,
    tensor_rounds: Annotated[int, typer.Option(help="Tensor: rounds over the configurations.")] = 3,
    prefix: Annotated[str, typer.Option(help="The check's cluster prefix (beside another cluster).")] = "ncchk",
    subnet: Annotated[str, typer.Option(help="The check's cluster subnet.")] = DEFAULT_SUBNET,
    state_dir: Annotated[Path, typer.Option(help="The check's own cluster state (logs stay there).")] = Path(
        "var/cluster-check"
    ),
    var_dir: Annotated[Path, typer.Option(envvar="NIGHTCAP_VAR", help="Where the model is registered.")] = Path("var"),
) -> None:
    """Run the scenarios on a cluster of their own (prefix ncchk by default), print the tables, write ``out``."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the hosts are taken down on the way out
    report: dict = {"model": model, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for scenario in [s.strip() for s in scenarios.split(",") if s.strip()]:
        folder = state_dir.resolve() / scenario
        subprocess.run(["rm", "-rf", str(folder)], check=False)
        folder.mkdir(parents=True)
        cluster = Cluster(prefix, 3, subnet, state_dir=state_dir / "hosts")
        try:
            cluster.up()
            if scenario == "latency":
                report["latency"] = latency_table(cluster, model, folder, chats, tokens, var_dir.resolve())
            elif scenario == "replicas":
                result = replica_partition(
                    cluster, model, folder, partition_chats, partition_tokens, var_dir=var_dir.resolve()
                )
                report["replicas"] = summarize_partition(result)
            elif scenario == "tensor":
                report["tensor"] = tensor_parallel_table(
                    cluster, model, folder, var_dir.resolve(), rounds=tensor_rounds, tokens=tensor_tokens
                )
            elif scenario == "training":
                report["training"] = training_through_lost_host(cluster, model, folder, var_dir.resolve())
            else:
                raise typer.BadParameter(f"scenario {scenario!r}: latency, replicas, tensor or training")
        finally:
            cluster.down(grace=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_tables(report)
    typer.echo(f"\nwritten to {out} (logs in {state_dir})")


if __name__ == "__main__":
    app()
