"""POST /v1/rerank: documents ordered by the retrieval service's cross-encoder (`--reranker`), in the shape
llama.cpp's server and vLLM answer (results with index and relevance_score, best first; usage)."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from nightcap.v1 import retrieval_pb2
from services.gateway import openai_types as wire
from services.gateway.backends import GatewayError
from services.gateway.dependencies import (
    call_metadata,
    gateway_metrics,
    gateway_settings,
    retrieval_error,
    retrieval_stub,
)
from services.gateway.errors import JSON_HEADERS

router = APIRouter()


@router.post("/v1/rerank")
async def rerank(body: wire.RerankRequest, request: Request) -> JSONResponse:
    documents = body.texts()
    asked = retrieval_pb2.RerankRequest(query=body.query, documents=documents)
    if body.top_n is not None:
        asked.top_n = body.top_n
    try:
        reply = await retrieval_stub(request).Rerank(
            asked, timeout=gateway_settings(request).request_timeout, metadata=call_metadata(request)
        )
    except grpc.aio.AioRpcError as error:
        if error.code() is grpc.StatusCode.FAILED_PRECONDITION:  # no reranker: not the caller's to fix by retrying
            raise GatewayError(503, error.details(), "service_unavailable", None, "no_reranker", retry=False) from None
        raise retrieval_error(request, error) from None
    if body.model and body.model not in {reply.model, Path(reply.model).name}:
        raise GatewayError(
            404,
            f"the rerank model {body.model!r} is not served here; this server reranks with {reply.model!r}",
            "invalid_request_error",
            "model",
            "model_not_found",
            retry=False,
        )
    results = []
    for result in reply.results:
        entry: dict = {"index": result.index, "relevance_score": result.relevance_score}
        if body.return_documents:
            entry["document"] = {"text": documents[result.index]}
        results.append(entry)
    gateway_metrics(request).tokens.labels("rerank").inc(reply.tokens)
    return JSONResponse(
        {
            "id": f"rerank-{uuid.uuid4().hex}",
            "object": "list",
            "model": reply.model,
            "results": results,
            "usage": {"prompt_tokens": reply.tokens, "total_tokens": reply.tokens},
        },
        headers=JSON_HEADERS,
    )
