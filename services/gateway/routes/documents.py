"""Your documents in the retrieval index: GET /v1/index, and /v1/documents to list, add (as files or as text)
and delete them."""

from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from clients.documents import DocumentReadError, FileTooLargeError, documents_of_file
from nightcap.records import Document
from nightcap.v1 import retrieval_pb2
from services.gateway import openai_types as wire
from services.gateway.backends import GatewayError, bad_request
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
    """Files are read here, by the reader chatctl uses, all before anything is sent: a bad file adds nothing."""
    checked(body)
    max_bytes = gateway_settings(request).max_file_bytes
    documents = []
    for index, upload in enumerate(body.files):
        # parsing a PDF takes a while: off the event loop, so other requests go on meanwhile
        documents += await run_in_threadpool(read_upload, upload, index, max_bytes)
    documents += [Document(d.id, d.text, d.title, d.source) for d in body.documents]
    messages = [
        retrieval_pb2.AddDocumentsRequest(
            document=retrieval_pb2.Document(id=d.id, text=d.text, title=d.title, source=d.source)
        )
        for d in documents
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


def read_upload(upload: wire.UploadedFile, index: int, max_bytes: int) -> list[Document]:
    """The documents of one uploaded file, or the error that names it: 413 over the size limit, else 400."""
    param = f"files[{index}]"
    try:
        data = upload.data()
    except ValueError:
        raise bad_request(f"{upload.name}: the content is not base64", f"{param}.content") from None
    try:
        return documents_of_file(upload.name, data, max_bytes=max_bytes)
    except FileTooLargeError as error:
        message = f"{error} (--max-file-bytes)"
        raise GatewayError(413, message, "invalid_request_error", param, "file_too_large", retry=False) from None
    except DocumentReadError as error:
        raise bad_request(str(error), param, "unreadable_file") from None


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
