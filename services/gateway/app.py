"""The HTTP gateway: an OpenAI-compatible API and the web page, in front of the gRPC services.

Routes are thin, like the gRPC servicers: validate (openai_types), translate (translate), call a backend
(backends), stream back (streaming). One module per API under routes/; the middlewares around them in
middleware, every failure as an OpenAI error in errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway.backends import Backends
from services.gateway.errors import install_error_handlers
from services.gateway.metrics import GatewayMetrics
from services.gateway.middleware import add_middlewares
from services.gateway.routes import chat, completions, documents, embeddings, health, models, rerank
from services.gateway.settings import GatewaySettings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: GatewaySettings = app.state.settings
    # grpc.aio channels belong to the event loop they are made in: uvicorn's
    app.state.backends = Backends(
        settings.orchestrator, settings.generation, settings.retrieval, settings.backend_credentials
    )
    yield
    await app.state.backends.close()


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway's ASGI app; its backends are connected when the server starts it (``lifespan``)."""
    app = FastAPI(
        title="nightcap gateway",
        description="OpenAI-compatible HTTP API in front of the nightcap gRPC services",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics()
    install_error_handlers(app)
    for api in (chat, completions, models, embeddings, rerank, documents, health):
        app.include_router(api.router)
    health.add_page(app, settings.web_dir)
    add_middlewares(app, settings, app.state.metrics)
    return app
