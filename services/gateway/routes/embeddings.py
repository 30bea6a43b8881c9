"""POST /v1/embeddings: texts embedded by the retrieval service's embedder, as floats or base64."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from nightcap.v1 import retrieval_pb2
from services.gateway import openai_types as wire
from services.gateway.backends import GatewayError, bad_request
from services.gateway.dependencies import (
    call_metadata,
    gateway_metrics,
    gateway_settings,
    retrieval_error,
    retrieval_stub,
)
from services.gateway.errors import JSON_HEADERS, unsupported

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: wire.EmbeddingRequest, request: Request) -> JSONResponse:
    try:
        texts = body.texts()
    except wire.Unsupported as error:
        raise unsupported(error) from None
    try:
        reply = await retrieval_stub(request).Embed(
            retrieval_pb2.EmbedRequest(texts=texts),
            timeout=gateway_settings(request).request_timeout,
            metadata=call_metadata(request),
        )
    except grpc.aio.AioRpcError as error:
        raise retrieval_error(request, error) from None
    accepted = {reply.embedder, Path(reply.embedder).name}
    if body.model and body.model not in accepted:
        raise GatewayError(
            404,
            f"the embedding model {body.model!r} is not served here; this server embeds with {reply.embedder!r}",
            "invalid_request_error",
            "model",
            "model_not_found",
            retry=False,
        )
    if body.dimensions is not None and body.dimensions != reply.dimension:
        raise bad_request(f"dimensions: this embedder makes {reply.dimension}-dimensional vectors only", "dimensions")
    data = []
    for index, embedding in enumerate(reply.embeddings):
        values: Any = list(embedding.values)
        if body.encoding_format == "base64":
            values = base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
        data.append({"object": "embedding", "index": index, "embedding": values})
    gateway_metrics(request).tokens.labels("embedding").inc(reply.tokens)
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "model": reply.embedder,
            "usage": {"prompt_tokens": reply.tokens, "total_tokens": reply.tokens},
        },
        headers=JSON_HEADERS,
    )
