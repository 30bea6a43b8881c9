"""nightcap-orchestrator: one Chat call composed from the retrieval and generation services."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from loguru import logger

from nightcap.credentials import Credentials, CredentialsError
from nightcap.records import GENERATION_ADDRESS, ORCHESTRATOR_ADDRESS, RETRIEVAL_ADDRESS
from services.common.logs import setup_logging
from services.common.security import (
    SERVICE_TOKEN_ENV,
    BackendTlsCaOption,
    BackendTlsCertOption,
    BackendTlsKeyOption,
    HealthAddressOption,
    InsecureOption,
    ReflectionOption,
    ServiceTokenFileOption,
    TlsCertOption,
    TlsClientCaOption,
    TlsKeyOption,
    TokensFileOption,
    server_security_or_exit,
)
from services.common.server import MaxConcurrentRpcs, MaxInputBytes, ServerLimits, serve_until_signalled
from services.orchestrator.conversation import QueryMode
from services.orchestrator.grounding import Grounding, PromptStyle
from services.orchestrator.server import start_chat_server

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


@app.callback()
def cli() -> None:
    """Keeps `serve` a subcommand (typer folds a lone command into the app), like the other services."""


@app.command()
def serve(
    address: str = typer.Option(
        ORCHESTRATOR_ADDRESS, envvar="NIGHTCAP_ORCHESTRATOR_ADDRESS", help="host:port to listen on (port 0: any free)"
    ),
    generation: str = typer.Option(
        GENERATION_ADDRESS,
        envvar="NIGHTCAP_GENERATION_ADDRESS",
        help="host:port of the generation service; for replicas, IP:port,IP:port,... or one DNS name that"
        " resolves to each (dns:///generation:50051), spread by gRPC round_robin with health checks",
    ),
    retrieval: str = typer.Option(
        RETRIEVAL_ADDRESS,
        envvar="NIGHTCAP_RETRIEVAL_ADDRESS",
        help="host:port of the retrieval service; empty to run without retrieval",
    ),
    max_new_tokens: int = typer.Option(
        256, envvar="NIGHTCAP_MAX_NEW_TOKENS", help="max_new_tokens of a chat turn that leaves it unset"
    ),
    backend_timeout: float = typer.Option(
        10.0, envvar="NIGHTCAP_BACKEND_TIMEOUT", help="seconds to wait for a search, model info or sentence embeddings"
    ),
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_client_ca: TlsClientCaOption = None,
    tokens_file: TokensFileOption = None,
    insecure: InsecureOption = False,
    reflection: ReflectionOption = True,
    health_address: HealthAddressOption = "",
    backend_tls_ca: BackendTlsCaOption = None,
    backend_tls_cert: BackendTlsCertOption = None,
    backend_tls_key: BackendTlsKeyOption = None,
    service_token_file: ServiceTokenFileOption = None,
    max_concurrent_rpcs: MaxConcurrentRpcs = ServerLimits.max_concurrent_rpcs,
    max_input_bytes: MaxInputBytes = ServerLimits.max_input_bytes,
    retrieval_query: Annotated[
        QueryMode,
        typer.Option(
            envvar="NIGHTCAP_RETRIEVAL_QUERY",
            help="what a follow-up searches for: recent (a weighted mix of the last user turns), condense (the"
            " model rewrites it as a standalone question; costs a generation call) or last (the message alone)",
        ),
    ] = QueryMode.RECENT,
    prompt: Annotated[
        PromptStyle,
        typer.Option(
            envvar="NIGHTCAP_PROMPT",
            help="how passages are given: grounded (numbered [1], [2] for the answer to cite; the model is told to"
            ' say "The documents do not say." when they do not hold the answer; an earlier turn\'s passage that is'
            " again among the best hits is repeated beside the question) or plain (unnumbered, each given once:"
            " whole passages: the prompt before grounding, kept as the baseline `make eval` measures against)",
        ),
    ] = PromptStyle.GROUNDED,
    context_cut: Annotated[
        bool,
        typer.Option(
            envvar="NIGHTCAP_CONTEXT_CUT",
            help="keep only the passages' sentences that best answer the question (scored by the retrieval"
            " service's embedder), within --context-tokens",
        ),
    ] = Grounding.cut,
    context_tokens: Annotated[
        int,
        typer.Option(
            envvar="NIGHTCAP_CONTEXT_TOKENS",
            min=1,
            help="with --context-cut: the new turn's passages, in the served model's tokens (the best sentence is"
            " always kept)",
        ),
    ] = Grounding.context_tokens,
    min_score: Annotated[
        float,
        typer.Option(
            envvar="NIGHTCAP_MIN_SCORE",
            help="retrieval score floor (cosine similarity, -1..1): passages below it are not given, and when none"
            " is left the reply says no source matched instead of asking the model; 0: no floor",
        ),
    ] = Grounding.min_score,
    title_lookup: Annotated[
        bool,
        typer.Option(
            envvar="NIGHTCAP_TITLE_LOOKUP",
            help='with --prompt grounded: a "What is X?" / "Who was X?" / "Tell me about X" question also looks up'
            ' the document titled X (or "X (qualifier)"); when found, its first passage is given alone, its'
            " opening sentence first",
        ),
    ] = Grounding.titles,
    log_level: str = typer.Option("INFO", envvar="NIGHTCAP_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR"),
) -> None:
    """Serve nightcap.v1.Chat (with health and reflection) until SIGTERM. Holds no model."""
    setup_logging("orchestrator", log_level)
    security = server_security_or_exit(
        address, tls_cert, tls_key, tls_client_ca, tokens_file, insecure, reflection, health_address
    )
    backends = Credentials(
        backend_tls_ca, backend_tls_cert, backend_tls_key, os.environ.get(SERVICE_TOKEN_ENV), service_token_file
    )
    try:
        running = start_chat_server(
            generation,
            retrieval or None,
            address,
            default_max_new_tokens=max_new_tokens,
            backend_timeout=backend_timeout,
            limits=ServerLimits(max_concurrent_rpcs, max_input_bytes),
            security=security,
            backend_credentials=backends,
            query_mode=retrieval_query,
            grounding=PromptStyle(prompt).grounding(context_cut, context_tokens, min_score, title_lookup),
        )
    # a taken port; unreadable certificates; a list of generation addresses that is not IPs
    except (OSError, CredentialsError, ValueError) as error:
        logger.error("{}", error)
        raise typer.Exit(2) from None
    query = retrieval_query.value
    logger.info("generation at {}, retrieval at {} (query: {})", generation, retrieval or "(none)", query)
    serve_until_signalled(running, "orchestrator")


def main() -> None:
    app(prog_name="nightcap-orchestrator")


if __name__ == "__main__":
    sys.exit(main())
