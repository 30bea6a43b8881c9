"""nightcap-generation: serve a causal LM over gRPC, or prepare the embedded default model."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import typer
from loguru import logger

from nightcap.records import GENERATION_ADDRESS
from services.common.errors import FailedPrecondition, ServiceError
from services.common.logs import setup_logging
from services.common.paths import VarLayout
from services.common.registry import ModelRegistry
from services.common.security import (
    HealthAddressOption,
    InsecureOption,
    ReflectionOption,
    ServerSecurity,
    TlsCertOption,
    TlsClientCaOption,
    TlsKeyOption,
    TokensFileOption,
    server_security_or_exit,
)
from services.common.server import MaxConcurrentRpcs, MaxInputBytes, ServerLimits, serve_until_signalled
from services.generation.engine.constraints import DEFAULT_COMPILE_TIMEOUT_S, ConstraintCompiler
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.engine.speculation import SPECULATIVE_MAX_BATCH, SPECULATIVE_TOKENS
from services.generation.host import DEFAULT_DRAIN_SECONDS, ModelHost
from services.generation.loading import (
    AUTO_RUNNER,
    DEFAULT_MODEL,
    LoadedModel,
    Placement,
    check_can_shard,
    check_flash_attn,
    choose_runner,
    load_model,
    make_runner,
    parse_max_memory,
    prepare_default,
    resolve_device,
    runner_kind,
)
from services.generation.metrics import GenerationMetrics
from services.generation.server import serve_model_host
from services.generation.shards import Rendezvous, ShardGroup, ShardSpec, follow_rank0, init_rank, shard_device

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

VarDir = typer.Option(None, "--var-dir", envvar="NIGHTCAP_VAR", help="runtime folder (registry, logs); default ./var")
LogLevel = typer.Option("INFO", "--log-level", envvar="NIGHTCAP_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR")
Threads = typer.Option(
    0,
    "--threads",
    envvar="NIGHTCAP_TORCH_THREADS",
    help="CPU threads: torch's (0: torch default, one per core), or llama.cpp's when it runs the model"
    " (0: one per core)",
)
ShardTimeout = typer.Option(
    60.0,
    "--shard-timeout",
    envvar="NIGHTCAP_SHARD_TIMEOUT",
    help="seconds any collective between ranks may take; a rank silent for longer ends the service",
)


@app.command()
def serve(
    model: str = typer.Option(
        DEFAULT_MODEL,
        envvar="NIGHTCAP_MODEL",
        help="registry name (name or name:version), a Hugging Face folder, a .gguf file, or a hub id",
    ),
    address: str = typer.Option(
        GENERATION_ADDRESS, envvar="NIGHTCAP_GENERATION_ADDRESS", help="host:port to listen on (port 0: any free)"
    ),
    runner: str = typer.Option(
        AUTO_RUNNER,
        "--runner",
        envvar="NIGHTCAP_RUNNER",
        help="what runs the model under our scheduler: llamacpp (llama.cpp through llama-cpp-python, `make"
        " llamacpp`; a .gguf file or a registry version holding one, kept quantized; 3-5x transformers' one-stream"
        " decode on the default model on 2 cores), transformers (PyTorch; any HF folder, GGUF de-quantized; CUDA,"
        " --num-shard, --device-map, --quantize), or auto: llamacpp for a GGUF model (the default model included)"
        " on a CPU when llama-cpp-python imports, transformers otherwise",
    ),
    device: str = typer.Option("cpu", envvar="NIGHTCAP_DEVICE", help="cpu, cuda, cuda:N or auto"),
    dtype: str = typer.Option(
        "auto", envvar="NIGHTCAP_DTYPE", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"
    ),
    prompt_format: str = typer.Option(
        "",
        envvar="NIGHTCAP_PROMPT_FORMAT",
        help="override the prompt format: chat_template or openchatkit (default: from registry or tokenizer)",
    ),
    max_new_tokens: int = typer.Option(
        256, envvar="NIGHTCAP_MAX_NEW_TOKENS", help="default max_new_tokens when a request leaves it unset"
    ),
    constraint_compile_timeout: float = typer.Option(
        DEFAULT_COMPILE_TIMEOUT_S,
        envvar="NIGHTCAP_CONSTRAINT_COMPILE_TIMEOUT",
        help="seconds a request's constraint (JSON schema, grammar) may take to compile before it is refused",
    ),
    max_batch_size: int = typer.Option(
        32, envvar="NIGHTCAP_MAX_BATCH_SIZE", help="most sequences decoding together in one batch"
    ),
    max_batch_total_tokens: int = typer.Option(
        32768,
        envvar="NIGHTCAP_MAX_BATCH_TOTAL_TOKENS",
        help="KV-cache budget: prompt + max_new_tokens summed over the running batch; bounds memory",
    ),
    max_concurrent_requests: int = typer.Option(
        128,
        envvar="NIGHTCAP_MAX_CONCURRENT_REQUESTS",
        help="running + queued requests; beyond it new requests get RESOURCE_EXHAUSTED",
    ),
    max_prefill_tokens: int = typer.Option(
        2048,
        envvar="NIGHTCAP_MAX_PREFILL_TOKENS",
        help="prompt tokens admitted per group and prefilled per step (longer prompts go in chunks)",
    ),
    prefix_cache_bytes: int = typer.Option(
        1 << 30,
        envvar="NIGHTCAP_PREFIX_CACHE_BYTES",
        min=0,
        help="keys and values of prompts (and answers) seen, kept so a prompt that starts with them prefills only"
        " the rest (on the model's device; --runner llamacpp: in host memory); least recently used first out; 0: off",
    ),
    speculative_tokens: int = typer.Option(
        SPECULATIVE_TOKENS,
        envvar="NIGHTCAP_SPECULATIVE_TOKENS",
        min=0,
        help="speculative decoding drafted from the prompt: the most tokens a row guesses a step, where its last"
        " tokens occurred before in its prompt or answer (each row adapts its own length to what is accepted;"
        " greedy output is unchanged, sampled output keeps its distribution); 0: off",
    ),
    speculative_max_batch: int = typer.Option(
        SPECULATIVE_MAX_BATCH,
        envvar="NIGHTCAP_SPECULATIVE_MAX_BATCH",
        min=1,
        help="rows decoding together above which nobody drafts (verifying many rows' guesses costs more than it saves)",
    ),
    metrics_address: str = typer.Option(
        "127.0.0.1:9400",
        envvar="NIGHTCAP_METRICS_ADDRESS",
        help="host:port of the Prometheus /metrics endpoint (port 0: any free; empty: off)",
    ),
    grace: float = typer.Option(
        10.0, envvar="NIGHTCAP_GRACE", help="seconds SIGTERM lets running requests finish before cancelling"
    ),
    threads: int = Threads,
    flash_attn: str = typer.Option(
        "auto",
        "--flash-attn",
        envvar="NIGHTCAP_FLASH_ATTN",
        help="llama.cpp runner: flash attention auto (llama.cpp's choice: on, a CPU included), on or off. On a"
        " 2-core AVX2 CPU, off decoded one stream 1.5x faster beside 2.5k-3.8k cached tokens and scored drafts"
        " faster; on was 1.3x faster for 16 streams at once (docs/generation-scaling.md)",
    ),
    num_shard: int = typer.Option(
        1,
        "--num-shard",
        envvar="NIGHTCAP_NUM_SHARD",
        help="tensor-parallel ranks: N processes each holding 1/N of every layer (nccl, one GPU each, on CUDA;"
        " gloo on CPU); this process is rank 0 and starts the others",
    ),
    shard_timeout: float = ShardTimeout,
    shard_master_addr: str = typer.Option(
        "127.0.0.1",
        envvar="NIGHTCAP_SHARD_MASTER_ADDR",
        help="--num-shard: the address rank 0 waits for the other ranks on (this host's address on the network"
        " they share, with GLOO_SOCKET_IFNAME naming its interface, when ranks run on other hosts)",
    ),
    shard_master_port: int = typer.Option(
        0,
        envvar="NIGHTCAP_SHARD_MASTER_PORT",
        min=0,
        max=65535,
        help="--num-shard: the port of --shard-master-addr; 0: a free one (ranks this process starts only)",
    ),
    shard_launch: str = typer.Option(
        "local",
        envvar="NIGHTCAP_SHARD_LAUNCH",
        help="--num-shard: local (this process starts ranks 1..N-1) or external (they are started on their own"
        " hosts, as `python -m services.generation shard` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set;"
        " needs --shard-master-port)",
    ),
    device_map: str = typer.Option(
        "",
        "--device-map",
        envvar="NIGHTCAP_DEVICE_MAP",
        help="auto: spread layers over the GPUs and offload the rest to CPU (accelerate); empty: all on --device",
    ),
    max_memory: str = typer.Option(
        "",
        "--max-memory",
        envvar="NIGHTCAP_MAX_MEMORY",
        help="with --device-map auto, memory per device, e.g. 0=6GiB,cpu=30GiB (GPU 0 gets at most 6 GiB)",
    ),
    quantize: str = typer.Option(
        "",
        "--quantize",
        envvar="NIGHTCAP_QUANTIZE",
        help="int8: int8 weights, bfloat16 activations, through torch's own kernel (CPU only; a one-row decode"
        " step 2.3x faster than float32's on an AVX512-BF16 CPU); 8bit: LLM.int8() through bitsandbytes (CUDA only;"
        " pip install bitsandbytes); empty: none",
    ),
    swap_drain_seconds: float = typer.Option(
        DEFAULT_DRAIN_SECONDS,
        envvar="NIGHTCAP_SWAP_DRAIN_SECONDS",
        help="after a model swap (ModelAdmin/LoadVersion), how long running streams may finish on the old version",
    ),
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_client_ca: TlsClientCaOption = None,
    tokens_file: TokensFileOption = None,
    insecure: InsecureOption = False,
    reflection: ReflectionOption = True,
    health_address: HealthAddressOption = "",
    max_concurrent_rpcs: MaxConcurrentRpcs = ServerLimits.max_concurrent_rpcs,
    max_input_bytes: MaxInputBytes = ServerLimits.max_input_bytes,
    var_dir: Path | None = VarDir,
    log_level: str = LogLevel,
) -> None:
    """Load the model and serve nightcap.v1.Generation and ModelAdmin (with health and reflection) until SIGTERM."""
    layout = VarLayout.from_env(var_dir)
    setup_logging("generation", log_level)
    security = server_security_or_exit(
        address, tls_cert, tls_key, tls_client_ca, tokens_file, insecure, reflection, health_address
    )
    registry = ModelRegistry(layout.models)
    try:
        placement = Placement(
            tp_size=num_shard, device_map=device_map, max_memory=parse_max_memory(max_memory), quantize=quantize
        )
        placement.check(resolve_device(device))
        if num_shard < 1:
            raise FailedPrecondition(f"--num-shard must be at least 1, got {num_shard}")
        if num_shard > 1:
            check_can_shard(model, registry, num_shard)
        runner = choose_runner(runner, model, registry, resolve_device(device), placement)
        check_flash_attn(flash_attn, runner)
        kind = runner_kind(runner, placement)
    except ServiceError as error:
        logger.error("cannot serve {}: {}", model, error)
        raise typer.Exit(2) from None
    if kind.own_threads:
        # torch only samples here; its own OpenMP pool spinning beside the runner's would take its cores
        torch.set_num_threads(1)
    elif threads > 0:
        torch.set_num_threads(threads)
    metrics = GenerationMetrics()
    if metrics_address:  # bound before the model loads, so a taken port fails in a second, not a minute
        try:
            port = metrics.serve(metrics_address)
        except OSError as error:
            logger.error(
                "cannot serve metrics on {}: {}; pick a free port or pass --metrics-address ''", metrics_address, error
            )
            raise typer.Exit(2) from None
        logger.info("metrics on http://{}:{}/metrics", metrics_address.rpartition(":")[0], port)
    config = SchedulerConfig(
        max_batch_size,
        max_batch_total_tokens,
        max_concurrent_requests,
        max_prefill_tokens,
        prefix_cache_bytes,
        speculative_tokens,
        speculative_max_batch,
    )
    group = None
    if num_shard > 1:
        rank_args = ["--model", model, "--device", device, "--dtype", dtype, "--var-dir", str(layout.root),
                     "--log-level", log_level, "--threads", str(threads)]  # fmt: skip
        try:
            where = Rendezvous.checked(shard_master_addr, shard_master_port, shard_launch)
        except ValueError as error:
            logger.error("{}", error)
            raise typer.Exit(2) from None
        try:
            group = ShardGroup.launch(num_shard, shard_timeout, resolve_device(device), rank_args, where)
        except Exception as error:
            logger.error("the {} ranks did not come together: {}: {}", num_shard, type(error).__name__, error)
            raise typer.Exit(2) from None
    try:
        try:
            loaded = load_model(model, registry, device, dtype, prompt_format, placement, runner, threads, flash_attn)
        except ServiceError as error:
            logger.error("cannot serve {}: {}", model, error)
            raise typer.Exit(2) from None
        # Later versions load on the same device and dtype as the first (ModelAdmin/LoadVersion); a sharded
        # server cannot swap yet: its other ranks would have to load the new version too.
        # a version swapped in keeps the int8 weights (the other placements apply to the first load only)
        swapped = Placement(quantize=quantize) if quantize == "int8" else None
        load = (
            None
            if group is not None
            else (
                lambda spec: load_model(
                    spec, registry, device, dtype, prompt_format, swapped, runner, threads, flash_attn
                )
            )
        )
        limits = ServerLimits(max_concurrent_rpcs, max_input_bytes)
        serve = Serving(address, max_new_tokens, grace, limits, security, constraint_compile_timeout)
        _serve_loaded(loaded, group, registry, load, swap_drain_seconds, serve, metrics, config)
    finally:
        if group is not None:
            group.close()
    if group is not None and group.failure is not None:
        raise typer.Exit(1)


@dataclass(frozen=True)
class Serving:
    """How rank 0 serves gRPC."""

    address: str
    max_new_tokens: int
    grace: float
    limits: ServerLimits
    security: ServerSecurity
    constraint_compile_timeout: float = DEFAULT_COMPILE_TIMEOUT_S


def _serve_loaded(
    loaded: LoadedModel,
    group: ShardGroup | None,
    registry: ModelRegistry,
    load: Callable[[str], LoadedModel] | None,
    drain_seconds: float,
    serve: Serving,
    metrics: GenerationMetrics,
    config: SchedulerConfig,
) -> None:
    logger.info(
        "loaded {} ({}, {} tokens of context, prompt format {}, {} on {}, the {} runner)",
        loaded.name,
        loaded.architecture,
        loaded.context_length,
        loaded.prompt_format,
        loaded.dtype,
        loaded.device,
        loaded.runner,
    )
    try:
        runner = make_runner(loaded, config)
    except ServiceError as error:  # llama.cpp could not make its context (too large for memory)
        logger.error("cannot serve {}: {}", loaded.name, error)
        raise typer.Exit(2) from None
    execute = group.executor(runner) if group is not None else None
    engine = ContinuousBatchingEngine(runner, loaded.tokenizer, loaded.eos_token_ids, config, metrics, execute=execute)
    host = ModelHost(loaded, engine, registry, load=load, drain_seconds=drain_seconds)
    try:
        compiler = ConstraintCompiler(timeout_s=serve.constraint_compile_timeout)
        running = serve_model_host(host, serve.address, serve.max_new_tokens, serve.limits, serve.security, compiler)
    except OSError as error:
        logger.error("{}", error)
        raise typer.Exit(2) from None
    if group is not None:
        group.on_failure = lambda _error: (running.set_serving(False), os.kill(os.getpid(), signal.SIGTERM))
    serve_until_signalled(running, "generation", grace=serve.grace, on_stop=host.shutdown)


@app.command()
def shard(
    model: str = typer.Option(DEFAULT_MODEL, envvar="NIGHTCAP_MODEL", help="the model rank 0 serves"),
    device: str = typer.Option("cpu", envvar="NIGHTCAP_DEVICE", help="cpu or cuda (rank N takes cuda:N)"),
    dtype: str = typer.Option("auto", envvar="NIGHTCAP_DTYPE", help="as for serve"),
    shard_timeout: float = ShardTimeout,
    threads: int = Threads,
    var_dir: Path | None = VarDir,
    log_level: str = LogLevel,
) -> None:
    """One tensor-parallel rank above 0 (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment):
    `serve --num-shard N` starts these; it runs the steps rank 0 broadcasts until told to stop."""
    layout = VarLayout.from_env(var_dir)
    spec = ShardSpec.from_env(shard_timeout)
    setup_logging(f"generation-rank{spec.rank}", log_level)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        init_rank(spec, shard_device(resolve_device(device), spec.rank))
        loaded = load_model(
            model, ModelRegistry(layout.models), device, dtype, "", Placement(spec.world_size, spec.rank)
        )
        follow_rank0(make_runner(loaded))
    except Exception as error:
        logger.error("rank {} stops: {}: {}", spec.rank, type(error).__name__, error)
        raise typer.Exit(1) from None


@app.command("prepare-default")
def prepare_default_model(var_dir: Path | None = VarDir, log_level: str = LogLevel) -> None:
    """Convert the embedded SmolLM2-135M-Instruct GGUF into the model registry (once; a no-op after)."""
    layout = VarLayout.from_env(var_dir)
    setup_logging("generation", log_level)
    try:
        version = prepare_default(ModelRegistry(layout.models))
    except ServiceError as error:
        logger.error("{}", error)
        raise typer.Exit(2) from None
    typer.echo(f"{version.metadata.name}:{version.metadata.version} at {version.path}")


def main() -> None:
    app(prog_name="nightcap-generation")


if __name__ == "__main__":
    sys.exit(main())
