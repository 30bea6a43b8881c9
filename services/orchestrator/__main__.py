"""nightcap-orchestrator: one Chat call composed from the retrieval and generation services."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from loguru import logger

from nightcap.records import GENERATION_ADDRESS, ORCHESTRATOR_ADDRESS, RETRIEVAL_ADDRESS
from services.common.logs import setup_logging
from services.common.server import serve_until_signalled
from services.orchestrator.conversation import QueryMode
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
        GENERATION_ADDRESS, envvar="NIGHTCAP_GENERATION_ADDRESS", help="host:port of the generation service"
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
        10.0, envvar="NIGHTCAP_BACKEND_TIMEOUT", help="seconds to wait for a search, model info or token count"
    ),
    retrieval_query: Annotated[
        QueryMode,
        typer.Option(
            envvar="NIGHTCAP_RETRIEVAL_QUERY",
            help="what a follow-up searches for: recent (a weighted mix of the last user turns), condense (the"
            " model rewrites it as a standalone question; costs a generation call) or last (the message alone)",
        ),
    ] = QueryMode.RECENT,
    log_level: str = typer.Option("INFO", envvar="NIGHTCAP_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR"),
) -> None:
    """Serve nightcap.v1.Chat (with health and reflection) until SIGTERM. Holds no model."""
    setup_logging("orchestrator", log_level)
    try:
        running = start_chat_server(
            generation,
            retrieval or None,
            address,
            default_max_new_tokens=max_new_tokens,
            backend_timeout=backend_timeout,
            query_mode=retrieval_query,
        )
    except OSError as error:
        logger.error("{}", error)
        raise typer.Exit(2) from None
    query = retrieval_query.value
    logger.info("generation at {}, retrieval at {} (query: {})", generation, retrieval or "(none)", query)
    serve_until_signalled(running, "orchestrator")


def main() -> None:
    app(prog_name="nightcap-orchestrator")


if __name__ == "__main__":
    sys.exit(main())
