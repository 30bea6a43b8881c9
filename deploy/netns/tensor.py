"""Tensor-parallel ranks on two hosts with latency between them (``make cluster-check``'s ``tensor`` scenario, and
tests/test_cluster.py).

Rank 0 (``serve --num-shard 2 --shard-launch external``) serves gRPC in one host, rank 1 (``shard``) runs in
another, gloo between them over the bridge; a client in a third host asks for greedy tokens and times them.
Latency between the ranks is ``Cluster.latency`` in both rank hosts, each towards the other, so every connection
gloo and its store open passes one delaying relay (the opener's) and is delayed both ways. A relay only takes
connections opened after its rule, so each configuration is a fresh start of the ranks; rounds interleave the
configurations, so that the machine's load falls on each alike. Each start's greedy tokens are compared with
one rank's.

SmolLM2-135M has 9 attention heads over 3 KV heads, which 2 ranks cannot split (``check_shardable``): the
table's model is SmolLM2-135M without its third KV group (6 heads over 2 KV heads, ``shardable_model``), its
own weights otherwise, so a decode step still crosses 30 layers of two all-reduces each.

    python -m deploy.netns.tensor greedy --address 10.213.0.2:50052 --tokens 32 --out result.json   # the client
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from loguru import logger

from deploy.netns.cluster import Cluster
from deploy.netns.machine import INNER_LINK

GENERATION_PORT = 50052
MASTER_PORT = 29600  # the first start's rendezvous port; each start takes the next (a killed store's may linger)
ADDED_LATENCIES_S = (0.0, 0.001, 0.01)
SHARD_TIMEOUT_S = 30.0
START_TIMEOUT_S = 300.0
PROMPT = "Zurich is the largest city in Switzerland. Its lake"

# --------------------------------------------------------------------------------------------- the ranks


def shardable_model(model: str, var_dir: Path, folder: Path, num_shard: int = 2) -> tuple[str, str]:
    """``model`` when ``num_shard`` ranks can split it, else a copy of it (a registry name or folder of a Llama)
    with the KV groups past the largest multiple of ``num_shard`` removed, their query heads and output columns
    with them: (what ``serve --model`` takes, what it is)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from services.common.errors import FailedPrecondition
    from services.common.registry import ModelRegistry
    from services.generation.loading import resolve_source
    from services.generation.shards import check_shardable

    source, name, _ = resolve_source(model, ModelRegistry(var_dir / "models"))
    config = AutoConfig.from_pretrained(source)
    try:
        check_shardable(config, num_shard)
        return model, name
    except FailedPrecondition:
        if config.model_type != "llama" or not isinstance(source, Path):
            raise
    groups = config.num_key_value_heads // num_shard * num_shard
    per_group = config.num_attention_heads // config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads = groups * per_group
    pruned = folder / f"{name}-{heads}h{groups}kv"
    pruned.mkdir(parents=True, exist_ok=True)
    weights = load_file(source / "model.safetensors")
    for key, tensor in weights.items():
        if key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            weights[key] = tensor[: heads * head_dim].clone()
        elif key.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight", "k_proj.bias", "v_proj.bias")):
            weights[key] = tensor[: groups * head_dim].clone()
        elif key.endswith("self_attn.o_proj.weight"):
            weights[key] = tensor[:, : heads * head_dim].contiguous()
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    save_file(weights, pruned / "model.safetensors", metadata={"format": "pt"})
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = heads, groups, head_dim
    config.save_pretrained(pruned)
    for extra in source.iterdir():
        if extra.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            shutil.copy(extra, pruned / extra.name)
    return str(pruned), f"{name} without its KV groups past {groups} ({heads} heads over {groups} KV heads)"


def start_ranks(
    cluster: Cluster,
    model: str,
    hosts: Sequence[str],
    folder: Path,
    var_dir: Path,
    master_port: int,
    label: str = "",
    shard_timeout: float = SHARD_TIMEOUT_S,
) -> list[subprocess.Popen]:
    """Rank 0 serving gRPC in ``hosts[0]`` (its address:GENERATION_PORT) and one more rank started in each other
    host (``--shard-launch external``), gloo over the bridge; one host: one rank, no sharding. Logs:
    ``rank_log``."""
    rank0 = cluster.host(hosts[0]).address
    common = ["--model", model, "--var-dir", str(var_dir), "--threads", "1", "--shard-timeout", str(shard_timeout)]
    serve = [sys.executable, "-m", "services.generation", "serve", *common, "--num-shard", str(len(hosts)),
             "--address", f"{rank0}:{GENERATION_PORT}", "--metrics-address", "", "--insecure",
             "--grace", "2"]  # fmt: skip
    if len(hosts) > 1:
        serve += ["--shard-master-addr", rank0, "--shard-master-port", str(master_port), "--shard-launch", "external"]
    gloo = {**os.environ, "GLOO_SOCKET_IFNAME": INNER_LINK}
    ranks = [cluster.spawn(hosts[0], serve, env=gloo, log=rank_log(folder, label, 0))]
    for rank, host in enumerate(hosts[1:], start=1):
        env = {**gloo, "RANK": str(rank), "WORLD_SIZE": str(len(hosts)), "MASTER_ADDR": rank0,
               "MASTER_PORT": str(master_port)}  # fmt: skip
        command = [sys.executable, "-m", "services.generation", "shard", *common]
        ranks.append(cluster.spawn(host, command, env=env, log=rank_log(folder, label, rank)))
    return ranks


def rank_log(folder: Path, label: str, rank: int) -> Path:
    return folder / f"{label}rank{rank}.log"


def stop_ranks(ranks: Sequence[subprocess.Popen], grace: float = 20.0) -> None:
    """Rank 0 told to stop (it tells the others), then whatever is left killed."""
    ranks[0].terminate()
    deadline = time.monotonic() + grace
    for rank in ranks:
        try:
            rank.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            rank.kill()
            rank.wait(10)


def greedy(
    cluster: Cluster,
    host: str,
    address: str,
    out: Path,
    tokens: int,
    ranks: Sequence[subprocess.Popen] = (),
    logs: Sequence[Path] = (),
    prompt_ids: Sequence[int] = (),
) -> dict:
    """The ``greedy`` client run in ``host`` against ``address`` (prompt: ``prompt_ids``, else PROMPT): its
    result, or an AssertionError quoting its log and ``logs`` when it fails or one of ``ranks`` exits first."""
    command = [sys.executable, "-m", "deploy.netns.tensor", "greedy", "--address", address, "--tokens", str(tokens),
               "--out", str(out)]  # fmt: skip
    if prompt_ids:
        command += ["--prompt-ids", ",".join(map(str, prompt_ids))]
    client = cluster.spawn(host, command, log=out.with_suffix(".log"))
    deadline = time.monotonic() + START_TIMEOUT_S + 600  # the ranks' start, then a stream at 10 ms a collective
    while client.poll() is None and time.monotonic() < deadline:
        if any(rank.poll() is not None for rank in ranks):
            break
        time.sleep(0.2)
    if client.poll() != 0:
        client.kill()
        client.wait(10)
        quoted = [log for log in (out.with_suffix(".log"), *logs) if log.exists()]
        raise AssertionError("greedy failed:\n" + "\n".join(f"{p}:\n{p.read_text()[-1500:]}" for p in quoted))
    return json.loads(out.read_text())


# --------------------------------------------------------------------------------------------- the scenario


def tensor_parallel_table(
    cluster: Cluster,
    model: str,
    folder: Path,
    var_dir: Path,
    latencies: Sequence[float] = ADDED_LATENCIES_S,
    rounds: int = 3,
    tokens: int = 16,
) -> dict:
    """Decode tokens/s of one greedy stream from h1: one rank in h2, then 2 ranks (h2, h3) with each of
    ``latencies`` added each way between them; ``rounds`` rounds, each a fresh start of every configuration."""
    served, description = shardable_model(model, var_dir, folder)
    # (row, slug for the logs, rank hosts, seconds added each way by relays; None: no relay in the path)
    configurations: list[tuple[str, str, list[str], float | None]] = [
        ("one rank (h2)", "one-rank", ["h2"], None),
        ("2 ranks (h2, h3), no relay", "direct", ["h2", "h3"], None),
    ]
    configurations += [
        (f"2 ranks (h2, h3), relay + {delay * 1000:g} ms each way", f"{delay * 1000:g}ms", ["h2", "h3"], delay)
        for delay in latencies
    ]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in configurations}
    address = f"{cluster.host('h2').address}:{GENERATION_PORT}"
    master_port = MASTER_PORT
    for round_ in range(1, rounds + 1):
        for name, slug, hosts, delay in configurations:
            label = f"round{round_}-{slug}-"
            if delay is not None:
                cluster.latency("h2", delay, peers=["h3"])
                cluster.latency("h3", delay, peers=["h2"])
            master_port += 1
            ranks = start_ranks(cluster, served, hosts, folder, var_dir, master_port, label)
            logs = [rank_log(folder, label, rank) for rank in range(len(hosts))]
            try:
                result = greedy(cluster, "h1", address, folder / f"{label}greedy.json", tokens, ranks, logs)
                runs[name].append(result)
            finally:
                stop_ranks(ranks)
                for host in ("h2", "h3"):
                    cluster.clear_latency(host)
            logger.info("round {}, {}: {:.2f} tokens/s", round_, name, runs[name][-1]["decode_tokens_per_s"])
    one_rank = runs[configurations[0][0]][0]["tokens"]
    rows = []
    for name, _, hosts, delay in configurations:
        rates = [run["decode_tokens_per_s"] for run in runs[name]]
        rows.append({
            "path": name,
            "ranks": len(hosts),
            "added_ms_each_way": None if delay is None else delay * 1000,
            "decode_tokens_per_s": [round(rate, 2) for rate in rates],
            "decode_tokens_per_s_median": round(statistics.median(rates), 2),
            "ttft_ms_median": round(statistics.median(run["ttft_ms"] for run in runs[name]), 1),
            "greedy_equals_one_rank": all(run["tokens"] == one_rank for run in runs[name]),
        })  # fmt: skip
    return {"model": description, "tokens": tokens, "rounds": rounds, "rows": rows}


# --------------------------------------------------------------------------------------------- the client


def greedy_stream(address: str, tokens: int, prompt_ids: Sequence[int] = (), timeout: float = START_TIMEOUT_S) -> dict:
    """Waits until ``address`` is SERVING, warms it up, then one greedy stream of ``tokens`` tokens after
    ``prompt_ids`` (none: PROMPT): its token ids, time to first token and decode tokens/s (after the first)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
    from services.common.channels import channel_options

    channel = grpc.insecure_channel(address, channel_options(address))
    health = health_pb2_grpc.HealthStub(channel)
    deadline, status = time.monotonic() + timeout, "UNKNOWN"
    while status != "SERVING":
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address} not SERVING in {timeout:.0f} s: {status}")
        try:
            reply = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError as error:
            status = error.code().name
        time.sleep(0 if status == "SERVING" else 0.5)
    stub = generation_pb2_grpc.GenerationStub(channel)

    def generate(new_tokens: int):
        params = common_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, temperature=0.0)
        if prompt_ids:
            prompt = generation_pb2.TokenIds(ids=prompt_ids)
            request = generation_pb2.GenerateRequest(token_ids=prompt, params=params)
        else:
            request = generation_pb2.GenerateRequest(text=PROMPT, add_special_tokens=True, params=params)
        return stub.Generate(request, timeout=timeout)

    for _ in generate(2):
        pass
    began, ids, arrivals = time.monotonic(), [], []
    for response in generate(tokens):
        if response.token_ids:
            arrivals.append((time.monotonic(), len(response.token_ids)))
            ids.extend(response.token_ids)
    channel.close()
    (first, first_count), (last, _) = arrivals[0], arrivals[-1]
    return {
        "tokens": ids,
        "ttft_ms": 1000 * (first - began),
        "decode_tokens_per_s": (len(ids) - first_count) / max(1e-9, last - first),
    }


app = typer.Typer(add_completion=False, no_args_is_help=True, help="The tensor-parallel scenario's client.")


@app.command("greedy")
def greedy_command(
    address: Annotated[str, typer.Option(help="The generation service (rank 0).")],
    out: Annotated[Path, typer.Option(help="Where the result goes (JSON).")],
    tokens: Annotated[int, typer.Option(help="Tokens of the timed stream.")] = 32,
    prompt_ids: Annotated[str, typer.Option(help="The prompt as comma-separated token ids (default: a text).")] = "",
) -> None:
    """One greedy stream, timed, once the service is SERVING."""
    ids = [int(i) for i in prompt_ids.split(",") if i.strip()]
    out.write_text(json.dumps(greedy_stream(address, tokens, ids)) + "\n")


@app.callback()
def _subcommands() -> None:
    """(A callback keeps ``greedy`` a subcommand: typer runs a lone command as the app itself.)"""


if __name__ == "__main__":
    app()
