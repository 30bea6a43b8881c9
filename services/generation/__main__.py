"""nightcap-generation: serve a causal LM over gRPC, or prepare the embedded default model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer
from loguru import logger

from nightcap.records import GENERATION_ADDRESS
from services.common.errors import ServiceError
from services.common.logs import setup_logging
from services.common.paths import VarLayout
from services.common.registry import ModelRegistry
from services.common.security import (
    HealthAddressOption,
    InsecureOption,
    ReflectionOption,
    TlsCertOption,
    TlsClientCaOption,
    TlsKeyOption,
    TokensFileOption,
    server_security_or_exit,
)
from services.common.server import MaxConcurrentRpcs, MaxInputBytes, ServerLimits, serve_until_signalled
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.host import DEFAULT_DRAIN_SECONDS, ModelHost
from services.generation.loading import DEFAULT_MODEL, load_model, prepare_default
from services.generation.metrics import GenerationMetrics
from services.generation.server import serve_model_host

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

VarDir = typer.Option(None, "--var-dir", envvar="NIGHTCAP_VAR", help="runtime folder (registry, logs); default ./var")
LogLevel = typer.Option("INFO", "--log-level", envvar="NIGHTCAP_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR")


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
    metrics_address: str = typer.Option(
        "127.0.0.1:9400",
        envvar="NIGHTCAP_METRICS_ADDRESS",
        help="host:port of the Prometheus /metrics endpoint (port 0: any free; empty: off)",
    ),
    grace: float = typer.Option(
        10.0, envvar="NIGHTCAP_GRACE", help="seconds SIGTERM lets running requests finish before cancelling"
    ),
    threads: int = typer.Option(0, envvar="NIGHTCAP_TORCH_THREADS", help="torch CPU threads (0: torch default)"),
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
    if threads > 0:
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
    registry = ModelRegistry(layout.models)
    try:
        loaded = load_model(model, registry, device, dtype, prompt_format)
    except ServiceError as error:
        logger.error("cannot serve {}: {}", model, error)
        raise typer.Exit(2) from None
    logger.info(
        "loaded {} ({}, {} tokens of context, prompt format {}, {} on {})",
        loaded.name,
        loaded.architecture,
        loaded.context_length,
        loaded.prompt_format,
        loaded.dtype,
        loaded.device,
    )
    engine = ContinuousBatchingEngine(
        loaded,
        SchedulerConfig(max_batch_size, max_batch_total_tokens, max_concurrent_requests, max_prefill_tokens),
        metrics,
    )
    # Later versions load on the same device and dtype as the first (ModelAdmin/LoadVersion).
    host = ModelHost(
        loaded,
        engine,
        registry,
        load=lambda spec: load_model(spec, registry, device, dtype, prompt_format),
        drain_seconds=swap_drain_seconds,
    )
    try:
        running = serve_model_host(
            host, address, max_new_tokens, ServerLimits(max_concurrent_rpcs, max_input_bytes), security
        )
    except OSError as error:
        logger.error("{}", error)
        raise typer.Exit(2) from None
    serve_until_signalled(running, "generation", grace=grace, on_stop=host.shutdown)


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
