"""nightcap-gateway: an OpenAI-compatible HTTP API (and the web chat page) in front of the gRPC services."""

from __future__ import annotations

import os
import sys
from enum import Enum
from typing import Annotated

import typer
import uvicorn
from loguru import logger

from nightcap.credentials import Credentials, CredentialsError
from nightcap.records import GATEWAY_ADDRESS, GENERATION_ADDRESS, ORCHESTRATOR_ADDRESS, RETRIEVAL_ADDRESS
from services.common.logs import setup_logging
from services.common.security import (
    SERVICE_TOKEN_ENV,
    BackendTlsCaOption,
    BackendTlsCertOption,
    BackendTlsKeyOption,
    InsecureBinding,
    InsecureOption,
    ServerSecurity,
    TlsCertOption,
    TlsKeyOption,
    TokensFileOption,
    TokenTable,
)
from services.gateway.server import bind, uvicorn_config
from services.gateway.settings import MAX_FILE_BYTES, GatewaySettings
from services.gateway.translate import SamplingDefaults

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


class Citations(str, Enum):
    nightcap = "nightcap"
    markdown = "markdown"


@app.callback()
def cli() -> None:
    """Keeps `serve` a subcommand, like the other services."""


@app.command()
def serve(
    address: str = typer.Option(
        GATEWAY_ADDRESS, envvar="NIGHTCAP_GATEWAY_ADDRESS", help="host:port to listen on (port 0: any free)"
    ),
    orchestrator: str = typer.Option(
        ORCHESTRATOR_ADDRESS, envvar="NIGHTCAP_ORCHESTRATOR_ADDRESS", help="host:port of the orchestrator (chat)"
    ),
    generation: str = typer.Option(
        GENERATION_ADDRESS,
        envvar="NIGHTCAP_GENERATION_ADDRESS",
        help="host:port of the generation service (/v1/completions, /v1/models); replicas as IP:port,IP:port",
    ),
    retrieval: str = typer.Option(
        RETRIEVAL_ADDRESS,
        envvar="NIGHTCAP_RETRIEVAL_ADDRESS",
        help="host:port of the retrieval service (/v1/embeddings, /v1/documents); empty: none",
    ),
    citations: Annotated[
        Citations,
        typer.Option(
            envvar="NIGHTCAP_CITATIONS",
            help="nightcap: sources only in the response's `nightcap` object; markdown: also a 'Sources:' list"
            " appended to the answer, for clients that drop unknown fields (Open WebUI)",
        ),
    ] = Citations.nightcap,
    retrieval_default: bool = typer.Option(
        True,
        "--retrieval-default/--no-retrieval-default",
        envvar="NIGHTCAP_RETRIEVAL_DEFAULT",
        help="ground chat completions in retrieved passages when the request does not say (`retrieval` field)",
    ),
    cors_origins: str = typer.Option(
        "",
        envvar="NIGHTCAP_CORS_ORIGINS",
        help="comma-separated origins allowed by CORS (e.g. http://localhost:3000, or * for any); empty: no CORS",
    ),
    max_body_bytes: int = typer.Option(
        4 * 1024 * 1024, envvar="NIGHTCAP_MAX_BODY_BYTES", min=1, help="largest request body; larger ones get 413"
    ),
    max_file_bytes: int = typer.Option(
        MAX_FILE_BYTES,
        envvar="NIGHTCAP_MAX_FILE_BYTES",
        min=1,
        help="largest file /v1/documents reads; larger ones get 413 (a POST to /v1/documents may be as large as"
        " one such file as base64, 4/3 of its size, whatever --max-body-bytes says)",
    ),
    max_concurrent_requests: int = typer.Option(
        256,
        envvar="NIGHTCAP_MAX_CONCURRENT_REQUESTS",
        min=1,
        help="API requests served at once (streams count until they end); beyond, 429 with Retry-After",
    ),
    request_timeout: float = typer.Option(
        600.0,
        envvar="NIGHTCAP_REQUEST_TIMEOUT",
        min=0.0,
        help="seconds one request may take (the deadline of its gRPC call; past it, 504); 0: no deadline",
    ),
    max_n: int = typer.Option(
        8, envvar="NIGHTCAP_MAX_N", min=1, help="most choices (n) one chat or text completion may ask for; beyond, 400"
    ),
    ping_interval: float = typer.Option(
        10.0, envvar="NIGHTCAP_PING_INTERVAL", min=0.1, help="seconds of silence in a stream before a ': ping' comment"
    ),
    temperature: float = typer.Option(
        SamplingDefaults.temperature, envvar="NIGHTCAP_DEFAULT_TEMPERATURE", help="temperature when a request sets none"
    ),
    grounded_temperature: float = typer.Option(
        SamplingDefaults.grounded_temperature,
        envvar="NIGHTCAP_DEFAULT_GROUNDED_TEMPERATURE",
        help="temperature of a chat answered from the index when the request sets none (0: greedy, which answered"
        " make eval's questions best)",
    ),
    top_p: float = typer.Option(SamplingDefaults.top_p, envvar="NIGHTCAP_DEFAULT_TOP_P", help="top_p when unset"),
    top_k: int = typer.Option(SamplingDefaults.top_k, envvar="NIGHTCAP_DEFAULT_TOP_K", help="top_k when unset"),
    max_tokens: int = typer.Option(
        SamplingDefaults.max_tokens, envvar="NIGHTCAP_DEFAULT_MAX_TOKENS", help="max_tokens when unset"
    ),
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tokens_file: TokensFileOption = None,
    insecure: InsecureOption = False,
    backend_tls_ca: BackendTlsCaOption = None,
    backend_tls_cert: BackendTlsCertOption = None,
    backend_tls_key: BackendTlsKeyOption = None,
    service_token_file: Annotated[
        str,
        typer.Option(
            envvar="NIGHTCAP_SERVICE_TOKEN_FILE",
            help=f"the token sent to the backends when the caller sent none (or {SERVICE_TOKEN_ENV}); a caller's"
            " own token is passed on as it is",
        ),
    ] = "",
    grace: float = typer.Option(10.0, envvar="NIGHTCAP_GRACE", help="seconds SIGTERM lets open requests finish"),
    log_level: str = typer.Option("INFO", envvar="NIGHTCAP_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR"),
) -> None:
    """Serve the OpenAI-compatible API and the web page until SIGTERM. Holds no model."""
    setup_logging("gateway", log_level)
    try:
        tokens = TokenTable.from_sources(tokens_file)
        # the same rule as every gRPC service: beyond loopback, TLS and tokens or an explicit --insecure
        ServerSecurity(tls_cert, tls_key, None, tokens, insecure, reflection=False).check_address(address)
        backends = Credentials(
            backend_tls_ca,
            backend_tls_cert,
            backend_tls_key,
            os.environ.get(SERVICE_TOKEN_ENV) or None,
            service_token_file or None,
        )
        backends.token_source()
        sock = bind(address)
    except (CredentialsError, InsecureBinding, OSError) as error:
        logger.error("{}", error)
        raise typer.Exit(2) from None
    settings = GatewaySettings(
        orchestrator=orchestrator,
        generation=generation,
        retrieval=retrieval or None,
        citations=citations.value,
        retrieval_default=retrieval_default,
        cors_origins=tuple(o.strip() for o in cors_origins.split(",") if o.strip()),
        max_body_bytes=max_body_bytes,
        max_file_bytes=max_file_bytes,
        max_concurrent_requests=max_concurrent_requests,
        request_timeout=request_timeout or None,
        ping_interval=ping_interval,
        max_n=max_n,
        defaults=SamplingDefaults(temperature, top_p, top_k, max_tokens, grounded_temperature),
        tokens=tokens,
        backend_credentials=backends,
    )
    scheme = "https" if tls_cert else "http"
    logger.info(
        "gateway on {}://{} ({}, {}); orchestrator {}, generation {}, retrieval {}",
        scheme,
        address,
        "TLS" if tls_cert else "plaintext",
        "tokens" if tokens else "no tokens",
        orchestrator,
        generation,
        retrieval or "(none)",
    )
    uvicorn.Server(uvicorn_config(settings, tls_cert, tls_key, grace, "warning")).run(sockets=[sock])
    logger.info("gateway stopped")


def main() -> None:
    app(prog_name="nightcap-gateway")


if __name__ == "__main__":
    sys.exit(main())
