"""nightcap-generation: serve a causal LM over gRPC, or prepare the embedded default model."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import typer
from loguru import logger

from nightcap.v1 import generation_pb2, generation_pb2_grpc
from services.common.errors import ServiceError
from services.common.logs import setup_logging
from services.common.paths import VarLayout
from services.common.server import ServiceBinding, serve_until_signalled, start_server
from services.generation.engine.engine import SerialEngine
from services.generation.loading import DEFAULT_MODEL, load_model, prepare_default
from services.generation.registry import ModelRegistry
from services.generation.server import GenerationServicer

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
        "127.0.0.1:50051", envvar="NIGHTCAP_GENERATION_ADDRESS", help="host:port to listen on (port 0: any free)"
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
    max_waiting: int = typer.Option(
        64, envvar="NIGHTCAP_MAX_WAITING", help="requests queued beyond this get RESOURCE_EXHAUSTED"
    ),
    threads: int = typer.Option(0, envvar="NIGHTCAP_TORCH_THREADS", help="torch CPU threads (0: torch default)"),
    var_dir: Path | None = VarDir,
    log_level: str = LogLevel,
) -> None:
    """Load the model and serve nightcap.v1.Generation (with health and reflection) until SIGTERM."""
    layout = VarLayout.from_env(var_dir)
    setup_logging("generation", log_level)
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        loaded = load_model(model, ModelRegistry(layout.models), device, dtype, prompt_format)
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
    engine = SerialEngine(loaded, max_waiting=max_waiting)
    servicer = GenerationServicer(loaded, engine, default_max_new_tokens=max_new_tokens)
    binding = ServiceBinding(
        generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
        generation_pb2_grpc.add_GenerationServicer_to_server,
        servicer,
    )
    try:
        running = start_server([binding], address)
    except OSError as error:
        logger.error("{}", error)
        raise typer.Exit(2) from None
    serve_until_signalled(running, "generation", on_stop=engine.shutdown)


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
