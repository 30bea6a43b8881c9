"""Your documents in the retrieval index: GET /v1/index, and /v1/documents to list, add (as files or as text)
and delete them."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from clients.documents import DocumentReadError, documents_from_text
from nightcap.v1 import retrieval_pb2
from services.gateway import openai_types as wire
from services.gateway.backends import bad_request
from services.gateway.dependencies import call_metadata, gateway_settings, retrieval_error, retrieval_stub
from services.gateway.errors import JSON_HEADERS, checked

router = APIRouter()


@router.get("/v1/index")
async def index_stats(request: Request) -> JSONResponse:
    try:
        stats = await retrieval_stub(request).Stats(
            retrieval_pb2.StatsRequest(), timeout=10, metadata=call_metadata(request)
        )
    except grpc.aio.AioRpcError as error:
        raise retrieval_error(request, error) from None
    return JSONResponse(stats_dict(stats), headers=JSON_HEADERS)


@router.get("/v1/documents")
async def list_documents(request: Request, limit: int = 100, after: str = "") -> JSONResponse:
    if not 1 <= limit <= 1000:
        raise bad_request("limit must be between 1 and 1000", "limit")
    metadata = call_metadata(request)
    try:
        listed = await retrieval_stub(request).ListDocuments(
            retrieval_pb2.ListDocumentsRequest(limit=limit, after=after), timeout=10, metadata=metadata
        )
        stats = await retrieval_stub(request).Stats(retrieval_pb2.StatsRequest(), timeout=10, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        raise retrieval_error(request, error) from None
    data = [{"id": d.id, "title": d.title, "source": d.source, "passages": d.passages} for d in listed.documents]
    body = {"object": "list", "data": data, "has_more": listed.more, "stats": stats_dict(stats)}
    return JSONResponse(body, headers=JSON_HEADERS)


@router.post("/v1/documents")
async def add_documents(body: wire.DocumentsRequest, request: Request) -> JSONResponse:
    checked(body)
    documents = []
    for index, upload in enumerate(body.files):
        try:
            documents += [(d.id, d.text, d.title, d.source) for d in documents_from_text(upload.name, upload.content)]
        except DocumentReadError as error:
            raise bad_request(str(error), f"files[{index}]") from None
    documents += [(d.id, d.text, d.title, d.source) for d in body.documents]
    messages = [
        retrieval_pb2.AddDocumentsRequest(document=retrieval_pb2.Document(id=i, text=t, title=title, source=src))
        for i, t, title, src in documents
    ]
    try:
        report = await retrieval_stub(request).AddDocuments(
            iter(messages), timeout=gateway_settings(request).request_timeout, metadata=call_metadata(request)
        )
    except grpc.aio.AioRpcError as error:
        raise retrieval_error(request, error) from None
    return JSONResponse(
        {
            "documents_added": report.documents_added,
            "documents_replaced": report.documents_replaced,
            "passages_added": report.passages_added,
            "passages_removed": report.passages_removed,
            "passages_total": report.passages_total,
            "documents_total": report.documents_total,
            "seconds": round(report.seconds, 3),
            "ids": [m.document.id for m in messages],
        },
        headers=JSON_HEADERS,
    )


@router.delete("/v1/documents/{doc_id:path}")
async def delete_document(doc_id: str, request: Request) -> JSONResponse:
    try:
        report = await retrieval_stub(request).DeleteDocuments(
            retrieval_pb2.DeleteDocumentsRequest(ids=[doc_id]), timeout=60, metadata=call_metadata(request)
        )
    except grpc.aio.AioRpcError as error:
        raise retrieval_error(request, error) from None
    return JSONResponse(
        {
            "id": doc_id,
            "deleted": True,
            "documents_deleted": report.documents_deleted,
            "passages_removed": report.passages_removed,
            "documents_total": report.documents_total,
        },
        headers=JSON_HEADERS,
    )


def stats_dict(stats: retrieval_pb2.StatsResponse) -> dict[str, Any]:
    return {
        "passages": stats.passages,
        "documents": stats.documents,
        "embedder": stats.embedder,
        "dimension": stats.dimension,
        "index_type": stats.index_type,
        "segments": stats.segments,
        "format": stats.format,
    }
