"""The relay from a gRPC response stream to one HTTP response: a JSON body, or server-sent events with pings
while the backend is silent, and the call cancelled when the client hangs up."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from loguru import logger

from services.gateway import openai_types as wire
from services.gateway import translate
from services.gateway.backends import GatewayError, http_error
from services.gateway.errors import JSON_HEADERS
from services.gateway.metrics import GatewayMetrics
from services.gateway.settings import GatewaySettings

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream
PING = object()
END = object()


class Relay:
    """Reads gRPC response streams (one per choice of the answer) into one queue, each in its own task, so the
    writer can ping while it waits and a client that goes away cancels every call (``close``)."""

    def __init__(self, calls: Sequence[grpc.aio.UnaryStreamCall], name: str, address: str) -> None:
        self.calls, self.name, self.address = list(calls), name, address
        self._queue: asyncio.Queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._read(index, call)) for index, call in enumerate(self.calls)]

    async def _read(self, index: int, call: grpc.aio.UnaryStreamCall) -> None:
        try:
            async for message in call:
                await self._queue.put((index, message))
            await self._queue.put((index, END))
        except grpc.aio.AioRpcError as error:
            await self._queue.put((index, http_error(self.name, self.address, error)))

    async def next(self, wait: float) -> Any:
        """``(choice, message)``, ``(choice, END)`` after a call's last message, or PING when nothing came for
        ``wait`` seconds."""
        if not self._queue.empty():  # a lagging writer skips the timer (wait_for makes a task per call)
            item = self._queue.get_nowait()
        else:
            try:
                item = await asyncio.wait_for(self._queue.get(), wait)
            except asyncio.TimeoutError:
                return PING
        if isinstance(item[1], GatewayError):
            raise item[1]
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
        for call in self.calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()


class Answer:
    """One response relayed from a backend's stream: collected into one JSON body (``whole``) or sent as
    server-sent events that start with the first message (``events``). Each API says how its messages read."""

    def __init__(
        self, relay: Relay, completion_id: str, model: str, settings: GatewaySettings, metrics: GatewayMetrics
    ) -> None:
        self.relay, self.id, self.model, self.created = relay, completion_id, model, int(time.time())
        self.settings, self.metrics = settings, metrics

    async def whole(self) -> dict[str, Any]:
        raise NotImplementedError

    def events(self, first: Any, include_usage: bool) -> AsyncIterator[str]:
        raise NotImplementedError

    early_end = "the backend ended the stream without its end message"  # each API names its backend

    async def next(self) -> Any:
        return await self.relay.next(self.settings.ping_interval)

    async def messages(self, first: Any, finished: Callable[[int], bool]) -> AsyncIterator[Any]:
        """PING for a silence, else (choice index, message) from the choices' streams, ``first`` first. A stream
        that ends before ``finished(index)`` says its choice did is a 503: the backend broke off."""
        item = first
        while True:
            if item is PING or item[1] is not END:
                yield item
            elif not finished(item[0]):
                raise GatewayError(503, self.early_end, "server_error")
            item = await self.next()

    async def respond(self, request: Request, body: wire._Sampling) -> Response:
        """One JSON body (the client hanging up cancels it), or a stream that starts with the first message."""
        if not body.stream:
            result = await unless_disconnected(request, self.whole(), self.relay)
            return result if isinstance(result, Response) else JSONResponse(result, headers=JSON_HEADERS)
        first = await self.relay.first(request, self.settings.ping_interval)
        if first is None:
            return Response(status_code=499)  # the client went away before the answer started
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(self.events(first, include_usage), media_type="text/event-stream", headers=SSE_HEADERS)


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


def finish_reason(reason: int, legacy: bool = False) -> str:
    """OpenAI's finish reason for a generation's (``function_call`` for tool calls asked for by the legacy
    ``functions``); a generation the server cancelled is a 503."""
    if reason in translate.FINISH_REASONS:
        name = translate.FINISH_REASONS[reason]
        return "function_call" if legacy and name == "tool_calls" else name
    raise GatewayError(
        503, "the generation was cancelled by the server (shutting down?)", "service_unavailable", None, "cancelled"
    )
