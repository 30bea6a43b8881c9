"""GET /v1/models: the served model, the registry's other versions, and the embedder."""

from __future__ import annotations

import contextlib
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from nightcap.v1 import admin_pb2, retrieval_pb2
from services.gateway import openai_responses as replies
from services.gateway.backends import GatewayError
from services.gateway.dependencies import backends, call_metadata
from services.gateway.errors import JSON_HEADERS

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": await model_cards(request)}, headers=JSON_HEADERS)


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> JSONResponse:
    for card in await model_cards(request):
        if card["id"] == model_id or (card["id"].split(":")[0] == model_id and card["nightcap"].get("served")):
            return JSONResponse(card, headers=JSON_HEADERS)
    raise GatewayError(
        404,
        f"no model {model_id!r} here: GET /v1/models lists them",
        "invalid_request_error",
        "model",
        "model_not_found",
        retry=False,
    )


async def model_cards(request: Request) -> list[dict[str, Any]]:
    metadata = call_metadata(request)
    stack = backends(request)
    names = await stack.model(metadata, fresh=True)
    info = names.info
    created: dict[str, float] = {}
    cards: list[dict[str, Any]] = []
    try:  # the registry's other versions; ModelAdmin needs an admin token, and a chat token just sees the one
        listed = await stack.admin.ListVersions(admin_pb2.ListVersionsRequest(), timeout=5, metadata=metadata)
        created = {f"{v.name}:{v.version}": v.created for v in listed.versions}
        others = [v for v in listed.versions if f"{v.name}:{v.version}" != names.label]
    except grpc.aio.AioRpcError:
        others = []
    cards.append(
        replies.model_card(
            names.label,
            created.get(names.label, 0),
            "chat",
            served=True,
            architecture=info.architecture,
            context_length=info.context_length,
            prompt_format=info.prompt_format,
        )
    )
    cards += [replies.model_card(f"{v.name}:{v.version}", v.created, "chat", served=False) for v in others]
    if stack.retrieval is not None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            stats = await stack.retrieval.Stats(retrieval_pb2.StatsRequest(), timeout=5, metadata=metadata)
            cards.append(replies.model_card(stats.embedder, 0, "embedding", dimension=stats.dimension))
    return cards
