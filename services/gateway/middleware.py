"""The gateway's pure ASGI middlewares, and the request metrics and log line they keep.

Outermost first: CORS (a preflight is answered before anything else), security headers and metrics,
authentication (the same token table and roles as the gRPC services), the concurrency limit (429), the body
limit (413).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from loguru import logger
from starlette.middleware.cors import CORSMiddleware

from nightcap.credentials import TOKEN_SCHEME
from services.common.security import (
    GRANTS,
    HTTP_ROUTE_ROLES,
    OPEN_HTTP_ROUTES,
    TokenTable,
    matching_route,
    required_http_role,
)
from services.gateway.backends import GatewayError
from services.gateway.errors import error_response
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
# Metric labels: the API routes of the role table, the open ones, and "/" for the page.
_ROUTES = (*HTTP_ROUTE_ROLES, *OPEN_HTTP_ROUTES, "/health", "/metrics")


def route_label(path: str) -> str:
    route = matching_route(path, _ROUTES)
    if route is not None:
        return route
    return "/" if path == "/" or path.startswith("/web/") else "other"


async def send_error(send: Callable, error: GatewayError) -> None:
    response = error_response(error)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class HeadersAndMetrics:
    """Security headers on every response; one log line and the request metrics per request."""

    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.monotonic()
        route = route_label(scope["path"])
        seen: dict[str, Any] = {"status": 500, "bytes": 0, "first": None}

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                ]
            elif message["type"] == "http.response.body" and message.get("body"):
                if seen["first"] is None:
                    seen["first"] = time.monotonic()
                    self.metrics.time_to_first_byte.labels(route).observe(seen["first"] - started)
                seen["bytes"] += len(message["body"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            self.metrics.requests.labels(route, str(seen["status"])).inc()
            if route not in ("/health", "/metrics", "/"):
                logger.info(
                    "{} {} -> {} bytes={} ttfb={:.0f}ms total={:.2f}s",
                    scope["method"],
                    scope["path"],
                    seen["status"],
                    seen["bytes"],
                    ((seen["first"] or time.monotonic()) - started) * 1000,
                    time.monotonic() - started,
                )


def _bearer(scope: dict) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == b"authorization":
            text = value.decode("latin-1").strip()
            return text[len(TOKEN_SCHEME) :].strip() if text.lower().startswith(TOKEN_SCHEME.lower()) else text
    return None


class Authentication:
    """The caller's bearer token against the role its route needs; the token is kept for the backend calls."""

    def __init__(self, app: ASGIApp, *, tokens: TokenTable | None) -> None:
        self.app, self.tokens = app, tokens

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        presented = _bearer(scope)
        scope.setdefault("state", {})["token"] = presented
        needed = required_http_role(scope["path"])
        if self.tokens is None or needed is None or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        token = self.tokens.find(presented) if presented else None
        if token is None:
            why = "no token was sent" if not presented else "the token is not valid"
            logger.warning("{} {} refused: {}", scope["method"], scope["path"], why)
            message = f"{scope['path']} needs a {needed} token and {why}: send 'Authorization: Bearer TOKEN'"
            return await send_error(send, GatewayError(401, message, "authentication_error", None, "invalid_api_key"))
        if needed not in GRANTS[token.role]:
            message = f"{scope['path']} needs the {needed} role; this token has the {token.role} role"
            logger.warning(
                "{} {} refused: token {} has role {}", scope["method"], scope["path"], token.name, token.role
            )
            return await send_error(send, GatewayError(403, message, "permission_error", None, "permission_denied"))
        return await self.app(scope, receive, send)


class ConcurrencyLimit:
    """At most ``limit`` API requests at once (streams count until they end); beyond, 429 with Retry-After."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app, self.limit, self.running = app, limit, 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        if self.running >= self.limit:
            message = f"the gateway is running {self.running} requests, its limit (--max-concurrent-requests)"
            return await send_error(
                send, GatewayError(429, message, "rate_limit_error", None, "too_many_requests", retry_after=1)
            )
        self.running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.running -= 1


class BodyLimit:
    """A body over ``limit`` bytes is refused with 413: at once from Content-Length, or as it streams in."""

    def __init__(self, app: ASGIApp, *, limit: int, uploads: int = 0) -> None:
        self.app, self.limit, self.uploads = app, limit, max(limit, uploads)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # a file sent to /v1/documents may be larger than any other request: its own limit, from --max-file-bytes
        upload = scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/documents"
        limit = self.uploads if upload else self.limit
        flag = "--max-file-bytes" if upload else "--max-body-bytes"
        too_large = GatewayError(
            413,
            f"the request body is larger than {limit} bytes ({flag})",
            "invalid_request_error",
            None,
            "request_too_large",
            retry=False,
        )
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await send_error(send, too_large)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
            return message

        await self.app(scope, counted, send)


def add_middlewares(app: FastAPI, settings: GatewaySettings, metrics: GatewayMetrics) -> None:
    """The middlewares of the module docstring, in its order."""
    # add_middleware wraps what is there: the first added runs innermost
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, uploads=settings.upload_body_bytes)
    app.add_middleware(ConcurrencyLimit, limit=settings.max_concurrent_requests)
    app.add_middleware(Authentication, tokens=settings.tokens)
    app.add_middleware(HeadersAndMetrics, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["authorization", "content-type", "x-request-id", "openai-organization", "openai-project"],
            expose_headers=["x-request-id", "retry-after", "x-should-retry"],
            max_age=600,
        )
