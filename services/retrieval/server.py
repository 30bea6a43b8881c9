"""The Retrieval gRPC servicer: protobuf in, Retriever call, protobuf out. Errors go to the shared interceptor."""

from __future__ import annotations

import time
import uuid

import grpc
from loguru import logger

from nightcap.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.common.server import RunningServer, ServiceBinding, start_server
from services.retrieval.retriever import DEFAULT_K, Retriever

SERVICE_NAME = retrieval_pb2.DESCRIPTOR.services_by_name["Retrieval"].full_name
REQUEST_ID_KEY = "x-request-id"


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    def __init__(self, retriever: Retriever) -> None:
        self._retriever = retriever

    def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        started = time.perf_counter()
        k = request.k if request.HasField("k") else DEFAULT_K
        hits = self._retriever.search(request.query, k)
        logger.info(
            "search id={} query_chars={} k={} hits={} ms={:.1f}",
            _request_id(context),
            len(request.query),
            k,
            len(hits),
            (time.perf_counter() - started) * 1000,
        )
        return retrieval_pb2.SearchResponse(
            passages=[
                retrieval_pb2.Passage(
                    id=hit.passage.id,
                    text=hit.passage.text,
                    title=hit.passage.title,
                    source=hit.passage.source,
                    score=hit.score,
                )
                for hit in hits
            ]
        )

    def Stats(self, request: retrieval_pb2.StatsRequest, context: grpc.ServicerContext) -> retrieval_pb2.StatsResponse:
        manifest = self._retriever.index.manifest
        return retrieval_pb2.StatsResponse(
            passages=manifest.passages,
            documents=manifest.documents,
            dimension=manifest.dimension,
            embedder=manifest.embedder,
            index_type=manifest.factory,
            index_path=str(self._retriever.index.folder),
        )


def _request_id(context: grpc.ServicerContext) -> str:
    # A caller may send its own id (the orchestrator's chat turn) so one request can be followed across services.
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY:
            return str(value)
    return uuid.uuid4().hex[:12]


def start_retrieval_server(retriever: Retriever, address: str) -> RunningServer:
    binding = ServiceBinding(
        full_name=SERVICE_NAME,
        add=retrieval_pb2_grpc.add_RetrievalServicer_to_server,
        servicer=RetrievalServicer(retriever),
    )
    return start_server([binding], address)
