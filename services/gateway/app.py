"""The HTTP gateway: an OpenAI-compatible API and the web page, in front of the gRPC services.

Routes are thin, like the gRPC servicers: validate (openai_types), translate (translate), call a backend
(backends), stream back. Around them, pure ASGI middlewares, outermost first: CORS (a preflight is answered
before anything else), security headers and metrics, authentication (the same token table and roles as the
gRPC services), the concurrency limit (429), the body limit (413).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from clients.documents import DocumentReadError, documents_from_text
from nightcap.credentials import TOKEN_SCHEME, Credentials
from nightcap.v1 import admin_pb2, chat_pb2, retrieval_pb2
from services.common.security import (
    GRANTS,
    HTTP_ROUTE_ROLES,
    OPEN_HTTP_ROUTES,
    TokenTable,
    matching_route,
    required_http_role,
)
from services.gateway import openai_types as wire
from services.gateway import translate
from services.gateway.backends import Backends, GatewayError, bad_request, http_error

WEB_DIR = Path(__file__).parent / "web"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
JSON_HEADERS = {"Cache-Control": "no-store"}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream
_PING = object()
_END = object()


@dataclass
class GatewaySettings:
    orchestrator: str
    generation: str
    retrieval: str | None = None
    citations: str = "nightcap"  # or "markdown": also append a "Sources:" list to the answer
    retrieval_default: bool = True  # a chat request that does not say retrieves when a retrieval service is set
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 * 1024 * 1024
    max_concurrent_requests: int = 256
    request_timeout: float | None = 600.0  # the deadline of the gRPC call behind one request
    ping_interval: float = 10.0  # seconds of silence before a ": ping" comment keeps proxies from closing
    defaults: translate.SamplingDefaults = field(default_factory=translate.SamplingDefaults)
    tokens: TokenTable | None = None
    backend_credentials: Credentials = field(default_factory=Credentials)
    web_dir: Path | None = WEB_DIR


# --- metrics ----------------------------------------------------------------------------------------------------


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "nightcap_gateway_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.time_to_first_byte = Histogram(
            "nightcap_gateway_time_to_first_byte_seconds",
            "from the request to the first byte of the response body",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.tokens = Counter(
            "nightcap_gateway_tokens", "prompt and completion tokens", ["kind"], registry=self.registry
        )
        self.open_streams = Gauge("nightcap_gateway_open_streams", "streaming responses open", registry=self.registry)


# Metric labels: the API routes of the role table, the open ones, and "/" for the page.
_ROUTES = (*HTTP_ROUTE_ROLES, *OPEN_HTTP_ROUTES, "/health", "/metrics")


def route_label(path: str) -> str:
    route = matching_route(path, _ROUTES)
    if route is not None:
        return route
    return "/" if path == "/" or path.startswith("/web/") else "other"


# --- middlewares ------------------------------------------------------------------------------------------------

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


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

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = GatewayError(
            413,
            f"the request body is larger than {self.limit} bytes (--max-body-bytes)",
            "invalid_request_error",
            None,
            "request_too_large",
            retry=False,
        )
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await send_error(send, too_large)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise too_large
            return message

        await self.app(scope, counted, send)


# --- errors -----------------------------------------------------------------------------------------------------


def error_response(error: GatewayError) -> JSONResponse:
    headers = {"x-should-retry": "true" if error.retry else "false", **JSON_HEADERS}
    if error.retry_after is not None:
        headers["Retry-After"] = str(int(error.retry_after))
    return JSONResponse(
        wire.error_body(error.message, error.type, error.param, error.code), status_code=error.status, headers=headers
    )


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(location: tuple) -> str | None:
    """``messages[0].content`` from pydantic's location, without "body" and the tags of union members."""
    parts = [
        str(p)
        for p in location
        if p != "body" and (isinstance(p, int) or (str(p).isidentifier() and str(p) not in _UNION_TAGS))
    ]
    if not parts:
        return None
    text = parts[0]
    for part in parts[1:]:
        text += f"[{part}]" if part.isdigit() else f".{part}"
    return text


def validation_error(error: RequestValidationError) -> GatewayError:
    """FastAPI's 422 as OpenAI's 400, naming the first field that is wrong."""
    first = error.errors()[0]
    kind, param = first.get("type", ""), _param(tuple(first.get("loc", ())))
    if kind == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
    if kind == "extra_forbidden":
        return bad_request(f"unknown field {param!r}: this server does not support it", param, "unknown_field")
    if kind == "missing":
        if param is None:
            return bad_request("the request needs a JSON body")
        return bad_request(f"{param} is required", param, "missing_field")
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return bad_request(f"{param}: {message}" if param else message, param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, error: GatewayError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(error))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}: see /v1/models, /v1/chat/completions, ..."
            return error_response(
                GatewayError(404, message, "invalid_request_error", None, "unknown_route", retry=False)
            )
        if error.status_code == 405:
            message = f"{request.url.path} does not take {request.method}"
            return error_response(
                GatewayError(405, message, "invalid_request_error", None, "method_not_allowed", retry=False)
            )
        return error_response(GatewayError(error.status_code, str(error.detail), "invalid_request_error", retry=False))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.opt(exception=error).error("{} {} failed with an unexpected error", request.method, request.url.path)
        return error_response(GatewayError(500, f"internal error: {type(error).__name__}: {error}", "server_error"))


def checked(body: Any) -> None:
    try:
        body.check()
    except wire.Unsupported as error:
        raise bad_request(str(error), error.param, "unsupported_parameter") from None


# --- streams ----------------------------------------------------------------------------------------------------


class Relay:
    """Reads a gRPC response stream into a queue in its own task, so the writer can ping while it waits and
    a client that goes away cancels the call (``close``)."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, name: str, address: str) -> None:
        self.call, self.name, self.address = call, name, address
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for message in self.call:
                await self._queue.put(message)
            await self._queue.put(_END)
        except grpc.aio.AioRpcError as error:
            await self._queue.put(http_error(self.name, self.address, error))

    async def next(self, wait: float) -> Any:
        """The next message, _END after the last, or _PING when nothing came for ``wait`` seconds."""
        if not self._queue.empty():  # a lagging writer skips the timer (wait_for makes a task per call)
            item = self._queue.get_nowait()
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), wait)
            except asyncio.TimeoutError:
                return _PING
        if isinstance(item, GatewayError):
            raise item
        return item

    async def first(self, request: Request, wait: float) -> Any:
        """The first message, waiting ``wait`` seconds at most, so that an error by then (bad input, a full
        engine) gets its own HTTP status; after that the stream starts with pings, and errors go in it.
        None when the client hung up first (the call is cancelled)."""
        try:
            answered, item = await before_disconnect(request, self.next(wait))
        except BaseException:
            self.close()
            raise
        if not answered:
            self.close()
        return item

    def close(self) -> None:
        self.call.cancel()
        self._task.cancel()


async def until_disconnected(request: Request) -> None:
    """Returns when the HTTP client hangs up (after the body was read, the next ASGI message is that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def before_disconnect(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """(True, ``work``'s result), or (False, None) when the client hangs up first; ``work`` is then cancelled."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        answered = task.done()
        if not answered:
            task.cancel()
    return (True, task.result()) if answered else (False, None)


async def unless_disconnected(request: Request, work: Awaitable[Any], relay: Relay) -> Any:
    """``work``'s result; if the client goes away first, the gRPC call is cancelled and nothing is sent."""
    try:
        answered, result = await before_disconnect(request, work)
    finally:
        relay.close()
    if not answered:
        logger.info("{} {}: the client went away; its generation was cancelled", request.method, request.url.path)
        return Response(status_code=499)
    return result


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


# --- the app ----------------------------------------------------------------------------------------------------


def create_app(settings: GatewaySettings) -> FastAPI:
    metrics = GatewayMetrics()
    state: dict[str, Backends] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # grpc.aio channels belong to the event loop they are made in: uvicorn's
        state["backends"] = Backends(
            settings.orchestrator, settings.generation, settings.retrieval, settings.backend_credentials
        )
        yield
        await state["backends"].close()

    app = FastAPI(
        title="nightcap gateway",
        description="OpenAI-compatible HTTP API in front of the nightcap gRPC services",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)

    def backends() -> Backends:
        return state["backends"]

    def call_metadata(request: Request) -> tuple[tuple[str, str], ...]:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
        return backends().metadata(request.state.token, request_id)

    async def served_model(request: Request, requested: str | None) -> str:
        """The served model's name:version; a request naming another is 404."""
        metadata = call_metadata(request)
        names = await backends().model(metadata)
        if not names.matches(requested):
            names = await backends().model(metadata, fresh=True)  # perhaps it was just swapped in
        if not names.matches(requested):
            raise GatewayError(
                404,
                f"the model {requested!r} is not served here; this server serves {names.label!r} "
                f"(also accepted: {names.name!r}, or leave model out). GET /v1/models lists it",
                "invalid_request_error",
                "model",
                "model_not_found",
                retry=False,
            )
        return names.label

    def retrieval_stub():
        stub = backends().retrieval
        if stub is None:
            raise GatewayError(
                503, "no retrieval service is configured (--retrieval)", "service_unavailable", None, "no_retrieval"
            )
        return stub

    def retrieval_error(error: grpc.aio.AioRpcError) -> GatewayError:
        return http_error("retrieval", backends().addresses.get("retrieval", ""), error)

    # --- chat completions ---------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: wire.ChatCompletionRequest, request: Request) -> Response:
        checked(body)
        model = await served_model(request, body.model)
        metadata = call_metadata(request)
        request_id = dict(metadata)["x-request-id"]
        has_retrieval = settings.retrieval is not None
        message = translate.chat_request(
            body, request_id, settings.defaults, settings.retrieval_default and has_retrieval
        )
        call = backends().chat.Chat(message, timeout=settings.request_timeout, metadata=metadata)
        relay = Relay(call, "orchestrator", settings.orchestrator)
        completion_id, created = f"chatcmpl-{request_id}", int(time.time())
        return await respond(
            request,
            relay,
            body,
            lambda: collect_chat(relay, completion_id, created, model),
            lambda first, usage: chat_events(relay, first, completion_id, created, model, usage),
        )

    async def respond(
        request: Request,
        relay: Relay,
        body: wire._Sampling,
        whole: Callable[[], Awaitable[dict[str, Any]]],
        events: Callable[[Any, bool], AsyncIterator[str]],
    ) -> Response:
        """One JSON body (the client hanging up cancels it), or a stream that starts with the first message."""
        if not body.stream:
            result = await unless_disconnected(request, whole(), relay)
            return result if isinstance(result, Response) else JSONResponse(result, headers=JSON_HEADERS)
        first = await relay.first(request, settings.ping_interval)
        if first is None:
            return Response(status_code=499)  # the client went away before the answer started
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(events(first, include_usage), media_type="text/event-stream", headers=SSE_HEADERS)

    async def chat_events(
        relay: Relay, first: Any, completion_id: str, created: int, model: str, include_usage: bool
    ) -> AsyncIterator[str]:
        metrics.open_streams.inc()
        found: list[dict[str, Any]] = []
        try:
            item = first
            while True:
                if item is _PING:
                    yield ": ping\n\n"
                elif item is _END:
                    raise GatewayError(503, "the orchestrator ended the stream without its end message", "server_error")
                elif item.HasField("start"):
                    start = item.start
                    model = start.model or model
                    found = translate.sources(start)
                    role = wire.chat_chunk(completion_id, created, model, {"role": "assistant", "content": ""})
                    role["nightcap"] = translate.start_extras(start, found)
                    yield sse(role)
                elif item.HasField("delta"):
                    chunk = wire.chat_chunk(completion_id, created, model, {"content": item.delta})
                    if item.logprobs:
                        chunk["choices"][0]["logprobs"] = {"content": translate.chat_logprobs(item.logprobs)}
                    yield sse(chunk)
                elif item.HasField("end"):
                    end = item.end
                    if settings.citations == "markdown" and found:
                        extra = translate.sources_markdown(found, end.cited)
                        yield sse(wire.chat_chunk(completion_id, created, model, {"content": extra}))
                    last = wire.chat_chunk(completion_id, created, model, {}, finish_reason(end.finish_reason))
                    last["nightcap"] = translate.end_extras(end)
                    yield sse(last)
                    count_tokens(end.prompt_tokens, end.completion_tokens)
                    if include_usage:
                        tail = wire.chat_chunk(completion_id, created, model, {})
                        yield sse(
                            wire.usage_chunk(tail, end.prompt_tokens, end.completion_tokens, end.cached_prompt_tokens)
                        )
                    yield "data: [DONE]\n\n"
                    return
                item = await relay.next(settings.ping_interval)
        except GatewayError as error:
            logger.info("chat {}: failed mid-stream: {}", completion_id, error.message)
            yield sse(wire.error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            metrics.open_streams.dec()
            relay.close()  # a client that went away lands here too (the stream task is cancelled)

    async def collect_chat(relay: Relay, completion_id: str, created: int, model: str) -> dict[str, Any]:
        start, answer, logprobs = chat_pb2.ChatStart(), [], []
        item = await relay.next(settings.ping_interval)
        while True:
            if item is _END:
                raise GatewayError(503, "the orchestrator ended the stream without its end message", "server_error")
            if item is not _PING:
                if item.HasField("start"):
                    start = item.start
                elif item.HasField("delta"):
                    answer.append(item.delta)
                    logprobs.extend(item.logprobs)
                elif item.HasField("end"):
                    break
            item = await relay.next(settings.ping_interval)
        end = item.end
        found = translate.sources(start, end.cited)
        content = "".join(answer)
        extras = {**translate.start_extras(start, found), **translate.end_extras(end)}
        if settings.citations == "markdown":
            content += translate.sources_markdown(found, end.cited)
        count_tokens(end.prompt_tokens, end.completion_tokens)
        return wire.chat_completion(
            completion_id,
            created,
            start.model or model,
            content,
            finish_reason(end.finish_reason),
            wire.usage(end.prompt_tokens, end.completion_tokens, end.cached_prompt_tokens),
            translate.chat_logprobs(logprobs) if logprobs else None,
            extras,
        )

    def finish_reason(reason: int) -> str:
        if reason in translate.FINISH_REASONS:
            return translate.FINISH_REASONS[reason]
        raise GatewayError(
            503, "the generation was cancelled by the server (shutting down?)", "service_unavailable", None, "cancelled"
        )

    def count_tokens(prompt: int, completion: int) -> None:
        metrics.tokens.labels("prompt").inc(prompt)
        metrics.tokens.labels("completion").inc(completion)

    # --- raw completions ----------------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: wire.CompletionRequest, request: Request) -> Response:
        checked(body)
        model = await served_model(request, body.model)
        metadata = call_metadata(request)
        request_id = dict(metadata)["x-request-id"]
        message = translate.generate_request(body, request_id, settings.defaults)
        call = backends().generation.Generate(message, timeout=settings.request_timeout, metadata=metadata)
        relay = Relay(call, "generation", settings.generation)
        completion_id, created = f"cmpl-{request_id}", int(time.time())
        return await respond(
            request,
            relay,
            body,
            lambda: collect_completion(relay, completion_id, created, model),
            lambda first, usage: completion_events(relay, first, completion_id, created, model, usage),
        )

    async def completion_events(
        relay: Relay, item: Any, completion_id: str, created: int, model: str, include_usage: bool
    ) -> AsyncIterator[str]:
        metrics.open_streams.inc()
        offset = 0
        try:
            while True:
                if item is _PING:
                    yield ": ping\n\n"
                elif item is _END:
                    raise GatewayError(503, "the generation service ended the stream without finishing", "server_error")
                else:
                    model = item.model or model
                    if item.text or item.logprobs:
                        logprobs = translate.completion_logprobs(item.logprobs, offset) if item.logprobs else None
                        offset += len(item.text)
                        yield sse(wire.completion_chunk(completion_id, created, model, item.text, None, logprobs))
                    if item.HasField("finish"):
                        finish = item.finish
                        reason = finish_reason(finish.reason)
                        yield sse(wire.completion_chunk(completion_id, created, model, "", reason))
                        count_tokens(finish.prompt_tokens, finish.generated_tokens)
                        if include_usage:
                            tail = wire.completion_chunk(completion_id, created, model, "")
                            yield sse(
                                wire.usage_chunk(
                                    tail, finish.prompt_tokens, finish.generated_tokens, finish.cached_prompt_tokens
                                )
                            )
                        yield "data: [DONE]\n\n"
                        return
                item = await relay.next(settings.ping_interval)
        except GatewayError as error:
            yield sse(wire.error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            metrics.open_streams.dec()
            relay.close()

    async def collect_completion(relay: Relay, completion_id: str, created: int, model: str) -> dict:
        text, logprobs = [], []
        item = await relay.next(settings.ping_interval)
        while True:
            if item is _END:
                raise GatewayError(503, "the generation service ended the stream without finishing", "server_error")
            if item is not _PING:
                model = item.model or model
                text.append(item.text)
                logprobs.extend(item.logprobs)
                if item.HasField("finish"):
                    break
            item = await relay.next(settings.ping_interval)
        finish = item.finish
        count_tokens(finish.prompt_tokens, finish.generated_tokens)
        body = wire.completion_chunk(
            completion_id,
            created,
            model,
            "".join(text),
            finish_reason(finish.reason),
            translate.completion_logprobs(logprobs, 0) if logprobs else None,
        )
        body["usage"] = wire.usage(finish.prompt_tokens, finish.generated_tokens, finish.cached_prompt_tokens)
        return body

    # --- models, embeddings -------------------------------------------------------------------------------------

    async def model_cards(request: Request) -> list[dict[str, Any]]:
        metadata = call_metadata(request)
        names = await backends().model(metadata, fresh=True)
        info = names.info
        created: dict[str, float] = {}
        cards: list[dict[str, Any]] = []
        try:  # the registry's other versions; ModelAdmin needs an admin token, and a chat token just sees the one
            listed = await backends().admin.ListVersions(admin_pb2.ListVersionsRequest(), timeout=5, metadata=metadata)
            created = {f"{v.name}:{v.version}": v.created for v in listed.versions}
            others = [v for v in listed.versions if f"{v.name}:{v.version}" != names.label]
        except grpc.aio.AioRpcError:
            others = []
        cards.append(
            wire.model_card(
                names.label,
                created.get(names.label, 0),
                "chat",
                served=True,
                architecture=info.architecture,
                context_length=info.context_length,
                prompt_format=info.prompt_format,
            )
        )
        cards += [wire.model_card(f"{v.name}:{v.version}", v.created, "chat", served=False) for v in others]
        if backends().retrieval is not None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                stats = await backends().retrieval.Stats(retrieval_pb2.StatsRequest(), timeout=5, metadata=metadata)
                cards.append(wire.model_card(stats.embedder, 0, "embedding", dimension=stats.dimension))
        return cards

    @app.get("/v1/models")
    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": await model_cards(request)}, headers=JSON_HEADERS)

    @app.get("/v1/models/{model_id:path}")
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

    @app.post("/v1/embeddings")
    async def embeddings(body: wire.EmbeddingRequest, request: Request) -> JSONResponse:
        try:
            texts = body.texts()
        except wire.Unsupported as error:
            raise bad_request(str(error), error.param, "unsupported_parameter") from None
        try:
            reply = await retrieval_stub().Embed(
                retrieval_pb2.EmbedRequest(texts=texts),
                timeout=settings.request_timeout,
                metadata=call_metadata(request),
            )
        except grpc.aio.AioRpcError as error:
            raise retrieval_error(error) from None
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
            raise bad_request(
                f"dimensions: this embedder makes {reply.dimension}-dimensional vectors only", "dimensions"
            )
        data = []
        for index, embedding in enumerate(reply.embeddings):
            values: Any = list(embedding.values)
            if body.encoding_format == "base64":
                values = base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": index, "embedding": values})
        metrics.tokens.labels("embedding").inc(reply.tokens)
        return JSONResponse(
            {
                "object": "list",
                "data": data,
                "model": reply.embedder,
                "usage": {"prompt_tokens": reply.tokens, "total_tokens": reply.tokens},
            },
            headers=JSON_HEADERS,
        )

    # --- your documents -----------------------------------------------------------------------------------------

    @app.get("/v1/index")
    async def index_stats(request: Request) -> JSONResponse:
        try:
            stats = await retrieval_stub().Stats(
                retrieval_pb2.StatsRequest(), timeout=10, metadata=call_metadata(request)
            )
        except grpc.aio.AioRpcError as error:
            raise retrieval_error(error) from None
        return JSONResponse(stats_dict(stats), headers=JSON_HEADERS)

    @app.get("/v1/documents")
    async def list_documents(request: Request, limit: int = 100, after: str = "") -> JSONResponse:
        if not 1 <= limit <= 1000:
            raise bad_request("limit must be between 1 and 1000", "limit")
        metadata = call_metadata(request)
        try:
            listed = await retrieval_stub().ListDocuments(
                retrieval_pb2.ListDocumentsRequest(limit=limit, after=after), timeout=10, metadata=metadata
            )
            stats = await retrieval_stub().Stats(retrieval_pb2.StatsRequest(), timeout=10, metadata=metadata)
        except grpc.aio.AioRpcError as error:
            raise retrieval_error(error) from None
        data = [{"id": d.id, "title": d.title, "source": d.source, "passages": d.passages} for d in listed.documents]
        body = {"object": "list", "data": data, "has_more": listed.more, "stats": stats_dict(stats)}
        return JSONResponse(body, headers=JSON_HEADERS)

    @app.post("/v1/documents")
    async def add_documents(body: wire.DocumentsRequest, request: Request) -> JSONResponse:
        checked(body)
        documents = []
        for index, upload in enumerate(body.files):
            try:
                documents += [
                    (d.id, d.text, d.title, d.source) for d in documents_from_text(upload.name, upload.content)
                ]
            except DocumentReadError as error:
                raise bad_request(str(error), f"files[{index}]") from None
        documents += [(d.id, d.text, d.title, d.source) for d in body.documents]
        messages = [
            retrieval_pb2.AddDocumentsRequest(document=retrieval_pb2.Document(id=i, text=t, title=title, source=src))
            for i, t, title, src in documents
        ]
        try:
            report = await retrieval_stub().AddDocuments(
                iter(messages), timeout=settings.request_timeout, metadata=call_metadata(request)
            )
        except grpc.aio.AioRpcError as error:
            raise retrieval_error(error) from None
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

    @app.delete("/v1/documents/{doc_id:path}")
    async def delete_document(doc_id: str, request: Request) -> JSONResponse:
        try:
            report = await retrieval_stub().DeleteDocuments(
                retrieval_pb2.DeleteDocumentsRequest(ids=[doc_id]), timeout=60, metadata=call_metadata(request)
            )
        except grpc.aio.AioRpcError as error:
            raise retrieval_error(error) from None
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

    # --- open routes --------------------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        states = await backends().health()
        down = {name: state for name, state in states.items() if state != "SERVING"}
        body: dict[str, Any] = {"status": "ok" if not down else "unavailable", "backends": states}
        if down:
            body["error"] = wire.error_body(
                "not serving: " + ", ".join(f"{n} at {backends().addresses[n]} is {s}" for n, s in down.items()),
                "service_unavailable",
                None,
                "backend_unavailable",
            )["error"]
        return JSONResponse(body, status_code=503 if down else 200, headers=JSON_HEADERS)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/nightcap/config")
    async def page_config(request: Request) -> JSONResponse:
        """What the web page shows before it asks anything: the model, the defaults, whether a token is needed."""
        try:
            model = (await backends().model(call_metadata(request))).label
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

    if settings.web_dir is not None and (settings.web_dir / "index.html").is_file():
        index_file = settings.web_dir / "index.html"

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(index_file, headers={"Cache-Control": "no-cache"})

        app.mount("/web", StaticFiles(directory=settings.web_dir), name="web")

    # add_middleware wraps what is there: the first added runs innermost
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
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
    app.state.metrics = metrics
    return app


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
