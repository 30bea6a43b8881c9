"""The Retrieval gRPC servicer: protobuf in, Retriever / Ingestor call, protobuf out. Errors go to the shared
interceptor."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import grpc
import numpy as np
from loguru import logger

from nightcap.records import BUILDING, DEFAULT_K, Document, Passage, from_message, to_message
from nightcap.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.security import ServerSecurity
from services.common.server import RunningServer, ServerLimits, ServiceBinding, start_server
from services.retrieval.background_build import BackgroundBuild
from services.retrieval.ingest import Chunking, Ingestor
from services.retrieval.reranker import Reranker
from services.retrieval.retriever import HYBRID, KEYWORD, VECTOR, QueryBatcher, Retriever, Searchable, search_modes

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name
REQUEST_ID_KEY = "x-request-id"
DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT = 100, 1000
# OpenAI's own bound on inputs per embeddings request.
MAX_EMBED_TEXTS = 2048
# A cross-encoder reads every document in full: a thousand is already seconds on a CPU.
MAX_RERANK_DOCUMENTS = 1000
_MODES = {
    retrieval_pb2.SEARCH_MODE_HYBRID: HYBRID,
    retrieval_pb2.SEARCH_MODE_VECTOR: VECTOR,
    retrieval_pb2.SEARCH_MODE_KEYWORD: KEYWORD,
}


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    def __init__(
        self,
        searchable: Searchable,
        ingestor: Ingestor | None = None,
        build: BackgroundBuild | None = None,
        search_mode: str = HYBRID,
    ) -> None:
        self._searchable = searchable
        self._batcher = QueryBatcher(searchable)
        self._ingestor = ingestor
        self._build = build
        # the server's default, where the index can: an OpenChatKit index has no keyword index to fuse
        self._default_mode = search_mode if search_mode in search_modes(searchable) else VECTOR

    def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        started = time.perf_counter()
        k = request.k if request.HasField("k") else DEFAULT_K
        mode = self._mode(request.mode)
        rerank = request.rerank if request.HasField("rerank") else None
        if rerank and getattr(self._searchable, "reranker", None) is None:
            raise FailedPrecondition(
                "rerank is true but this retrieval service has no reranker: start it with --reranker (a "
                "sentence-transformers CrossEncoder folder or hub id), or leave rerank unset"
            )
        hits = self._batcher.search(request.query, k, title=request.title, mode=mode, rerank=rerank)
        logger.info(
            "search id={} query_chars={} k={} mode={} rerank={} hits={} titled={} ms={:.1f}",
            _request_id(context),
            len(request.query),
            k,
            mode,
            "default" if rerank is None else rerank,
            len(hits),
            sum(hit.titled for hit in hits),
            (time.perf_counter() - started) * 1000,
        )
        found = [
            Passage(
                hit.passage.id,
                hit.passage.text,
                hit.passage.title,
                hit.passage.source,
                hit.score,
                hit.titled,
                page=hit.passage.page,
            )
            for hit in hits
        ]
        response = retrieval_pb2.SearchResponse(passages=[to_message(p, retrieval_pb2.Passage) for p in found])
        build = self._build.progress() if self._build is not None else None
        if build is not None and build.state == BUILDING:  # the passages come from part of the index
            response.build.CopyFrom(to_message(build, retrieval_pb2.IndexBuild))
        return response

    def _mode(self, requested: int) -> str:
        if requested == retrieval_pb2.SEARCH_MODE_UNSPECIFIED:
            return self._default_mode
        if requested not in _MODES:
            names = ", ".join(retrieval_pb2.SearchMode.Name(value) for value in _MODES)
            raise InvalidArgument(f"mode {requested} is not a search mode; use one of {names} (or leave it unset)")
        mode = _MODES[requested]
        if mode not in search_modes(self._searchable):
            raise FailedPrecondition(f"this index (OpenChatKit's) has no keyword index: search it with mode {VECTOR}")
        return mode

    def Stats(self, request: retrieval_pb2.StatsRequest, context: grpc.ServicerContext) -> retrieval_pb2.StatsResponse:
        stats = self._searchable.stats()
        if self._build is not None:  # this process's build says more than the manifest
            stats = replace(stats, build=self._build.progress())
        return to_message(stats, retrieval_pb2.StatsResponse)

    def AddDocuments(
        self, request_iterator: Iterator[retrieval_pb2.AddDocumentsRequest], context: grpc.ServicerContext
    ) -> retrieval_pb2.AddDocumentsResponse:
        ingestor = self._writable()
        documents = [from_message(Document, r.document) for r in request_iterator]
        report = ingestor.add(documents)
        logger.info(
            "add id={} documents={} replaced={} passages={} seconds={:.1f}",
            _request_id(context),
            len(documents),
            report.documents_replaced,
            report.passages_added,
            report.seconds,
        )
        return to_message(report, retrieval_pb2.AddDocumentsResponse)

    def DeleteDocuments(
        self, request: retrieval_pb2.DeleteDocumentsRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.DeleteDocumentsResponse:
        report = self._writable().delete(list(request.ids))
        logger.info(
            "delete id={} documents={} passages={}",
            _request_id(context),
            report.documents_deleted,
            report.passages_removed,
        )
        return to_message(report, retrieval_pb2.DeleteDocumentsResponse)

    def Compact(
        self, request: retrieval_pb2.CompactRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.CompactResponse:
        report = self._writable().index.compact()
        logger.info(
            "compact id={} segments={}->{} vectors_dropped={} seconds={:.1f}",
            _request_id(context),
            report.segments_before,
            report.segments_after,
            report.vectors_dropped,
            report.seconds,
        )
        return retrieval_pb2.CompactResponse(
            segments_before=report.segments_before,
            segments_after=report.segments_after,
            vectors_dropped=report.vectors_dropped,
            bytes_before=report.bytes_before,
            bytes_after=report.bytes_after,
            seconds=report.seconds,
            generation=report.manifest.generation,
        )

    def ListDocuments(
        self, request: retrieval_pb2.ListDocumentsRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.ListDocumentsResponse:
        limit = request.limit if request.HasField("limit") else DEFAULT_LIST_LIMIT
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidArgument(f"limit must be between 1 and {MAX_LIST_LIMIT} (or unset for 100); got {limit}")
        index = getattr(self._searchable, "index", None)
        if index is None:
            raise FailedPrecondition("this index (OpenChatKit's) keeps no documents, only snippets: nothing to list")
        rows = index.list_documents(limit + 1, request.after)
        return retrieval_pb2.ListDocumentsResponse(
            documents=[
                retrieval_pb2.DocumentInfo(id=i, title=title, source=source, passages=count)
                for i, title, source, count in rows[:limit]
            ],
            documents_total=self._searchable.stats().documents,
            more=len(rows) > limit,
        )

    def Embed(self, request: retrieval_pb2.EmbedRequest, context: grpc.ServicerContext) -> retrieval_pb2.EmbedResponse:
        texts = list(request.texts)
        if not 1 <= len(texts) <= MAX_EMBED_TEXTS:
            raise InvalidArgument(f"texts must hold 1 to {MAX_EMBED_TEXTS} texts; got {len(texts)}")
        empty = [i for i, text in enumerate(texts) if not text.strip()]
        if empty:
            raise InvalidArgument(f"texts[{empty[0]}] is empty: every text to embed needs some words")
        embedder = self._searchable.embedder
        started = time.perf_counter()
        vectors = embedder.encode(texts)
        tokens = embedder.count_tokens(texts)
        logger.info(
            "embed id={} texts={} tokens={} ms={:.1f}",
            _request_id(context),
            len(texts),
            tokens,
            (time.perf_counter() - started) * 1000,
        )
        return retrieval_pb2.EmbedResponse(
            embeddings=[retrieval_pb2.Embedding(values=row) for row in vectors.tolist()],
            dimension=embedder.dimension,
            embedder=embedder.name,
            tokens=tokens,
            normalized=embedder.normalize,
        )

    def Rerank(
        self, request: retrieval_pb2.RerankRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.RerankResponse:
        reranker: Reranker | None = getattr(self._searchable, "reranker", None)
        if reranker is None:
            raise FailedPrecondition(
                "no reranker is configured: start the retrieval service with --reranker (a sentence-transformers "
                "CrossEncoder folder or hub id, e.g. cross-encoder/ms-marco-MiniLM-L6-v2)"
            )
        documents = list(request.documents)
        if not request.query.strip():
            raise InvalidArgument("query is empty: send the question the documents are ranked against")
        if not 1 <= len(documents) <= MAX_RERANK_DOCUMENTS:
            raise InvalidArgument(f"documents must hold 1 to {MAX_RERANK_DOCUMENTS} texts; got {len(documents)}")
        empty = [i for i, text in enumerate(documents) if not text.strip()]
        if empty:
            raise InvalidArgument(f"documents[{empty[0]}] is empty: every document to rank needs some words")
        if request.HasField("top_n") and request.top_n < 1:
            raise InvalidArgument(f"top_n must be at least 1 (or unset for every document); got {request.top_n}")
        started = time.perf_counter()
        scores = reranker.score(request.query, documents)
        order = np.argsort(-scores, kind="stable")[: request.top_n if request.HasField("top_n") else None]
        tokens = reranker.count_tokens(request.query, documents)
        logger.info(
            "rerank id={} documents={} tokens={} ms={:.1f}",
            _request_id(context),
            len(documents),
            tokens,
            (time.perf_counter() - started) * 1000,
        )
        return retrieval_pb2.RerankResponse(
            results=[retrieval_pb2.RerankResult(index=int(i), relevance_score=float(scores[i])) for i in order],
            model=reranker.name,
            tokens=tokens,
        )

    def _writable(self) -> Ingestor:
        if self._ingestor is None:
            stats = self._searchable.stats()
            raise FailedPrecondition(
                f"the index at {stats.index_path} is served read-only ({stats.format}); serve a nightcap index "
                "(`python -m services.retrieval serve --index NAME`) to add, delete or compact"
            )
        return self._ingestor

    def close(self) -> None:
        self._batcher.close()


def _request_id(context: grpc.ServicerContext) -> str:
    # A caller may send its own id (the orchestrator's chat turn) so one request can be followed across services.
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return uuid.uuid4().hex[:12]


def start_retrieval_server(
    searchable: Searchable,
    address: str,
    chunking: Chunking | None = None,
    batch_size: int | None = None,
    limits: ServerLimits | None = None,
    security: ServerSecurity | None = None,
    build: BackgroundBuild | None = None,
    search_mode: str = HYBRID,
) -> RunningServer:
    """Serves ``searchable``; a Retriever over an index opened writable also takes AddDocuments/DeleteDocuments.
    ``build``, when given, is the background build filling the index: Stats and Search report its progress.
    ``search_mode``: how a Search that names none ranks (where the index can; else by vector)."""
    ingestor = None
    if isinstance(searchable, Retriever) and not searchable.read_only:
        ingestor = Ingestor(searchable.embedder, searchable.index, chunking or Chunking())
        if batch_size:
            ingestor.batch_size = batch_size
    binding = ServiceBinding(
        full_name=SERVICE_NAME,
        add=retrieval_pb2_grpc.add_RetrievalServicer_to_server,
        servicer=RetrievalServicer(searchable, ingestor, build, search_mode),
    )
    return start_server([binding], address, limits, security)
