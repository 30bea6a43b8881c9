"""The open routes: /health, /metrics, the web page and what it asks first (/v1/nightcap/config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from services.gateway import openai_responses as replies
from services.gateway.backends import GatewayError
from services.gateway.dependencies import backends, call_metadata, gateway_metrics, gateway_settings
from services.gateway.errors import JSON_HEADERS

router = APIRouter()
page_router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    stack = backends(request)
    states = await stack.health()
    down = {name: state for name, state in states.items() if state != "SERVING"}
    body: dict[str, Any] = {"status": "ok" if not down else "unavailable", "backends": states}
    if down:
        body["error"] = replies.error_body(
            "not serving: " + ", ".join(f"{n} at {stack.addresses[n]} is {s}" for n, s in down.items()),
            "service_unavailable",
            None,
            "backend_unavailable",
        )["error"]
    return JSONResponse(body, status_code=503 if down else 200, headers=JSON_HEADERS)


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    return Response(generate_latest(gateway_metrics(request).registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/nightcap/config")
async def page_config(request: Request) -> JSONResponse:
    """What the web page shows before it asks anything: the model, the defaults, whether a token is needed."""
    settings = gateway_settings(request)
    try:
        model = (await backends(request).model(call_metadata(request))).label
    except GatewayError:
        model = ""
    return JSONResponse(
        {
            "model": model,
            "auth_required": settings.tokens is not None,
            "defaults": {
                **settings.defaults.as_dict(),
                "retrieval": settings.retrieval_default and settings.retrieval is not None,
                "retrieval_k": 3,
                "system_prompt": "",
            },
            "retrieval_available": settings.retrieval is not None,
            "citations": settings.citations,
        },
        headers=JSON_HEADERS,
    )


@page_router.get("/", include_in_schema=False)
async def page(request: Request) -> FileResponse:
    return FileResponse(gateway_settings(request).web_dir / "index.html", headers={"Cache-Control": "no-cache"})


def add_page(app: FastAPI, web_dir: Path | None) -> None:
    """The web page at / and its files under /web, when ``web_dir`` has one."""
    if web_dir is not None and (web_dir / "index.html").is_file():
        app.include_router(page_router)
        app.mount("/web", StaticFiles(directory=web_dir), name="web")
