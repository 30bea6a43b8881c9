"""POST /v1/chat/completions: an OpenAI chat request into one Chat call to the orchestrator, its stream back
as one completion or as chunks, with the passages the answer was grounded in."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from loguru import logger

from nightcap.v1 import chat_pb2
from services.gateway import openai_types as wire
from services.gateway import translate
from services.gateway.backends import GatewayError
from services.gateway.dependencies import backends, call_metadata, gateway_metrics, gateway_settings, served_model
from services.gateway.errors import checked
from services.gateway.streaming import END, PING, Answer, Relay, finish_reason, sse

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: wire.ChatCompletionRequest, request: Request) -> Response:
    checked(body)
    settings = gateway_settings(request)
    model = await served_model(request, body.model)
    metadata = call_metadata(request)
    request_id = dict(metadata)["x-request-id"]
    retrieves = settings.retrieval_default and settings.retrieval is not None
    message = translate.chat_request(body, request_id, settings.defaults, retrieves)
    call = backends(request).chat.Chat(message, timeout=settings.request_timeout, metadata=metadata)
    relay = Relay(call, "orchestrator", settings.orchestrator)
    answer = ChatAnswer(relay, f"chatcmpl-{request_id}", model, settings, gateway_metrics(request))
    return await answer.respond(request, body)


class ChatAnswer(Answer):
    """The orchestrator's ChatStart, deltas and ChatEnd as OpenAI's chat completion or its chunks."""

    async def events(self, first: Any, include_usage: bool) -> AsyncIterator[str]:
        completion_id, created, model = self.id, self.created, self.model
        self.metrics.open_streams.inc()
        found: list[dict[str, Any]] = []
        try:
            item = first
            while True:
                if item is PING:
                    yield ": ping\n\n"
                elif item is END:
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
                    if self.settings.citations == "markdown" and found:
                        extra = translate.sources_markdown(found, end.cited)
                        yield sse(wire.chat_chunk(completion_id, created, model, {"content": extra}))
                    last = wire.chat_chunk(completion_id, created, model, {}, finish_reason(end.finish_reason))
                    last["nightcap"] = translate.end_extras(end)
                    yield sse(last)
                    self.metrics.count_tokens(end.prompt_tokens, end.completion_tokens)
                    if include_usage:
                        tail = wire.chat_chunk(completion_id, created, model, {})
                        yield sse(
                            wire.usage_chunk(tail, end.prompt_tokens, end.completion_tokens, end.cached_prompt_tokens)
                        )
                    yield "data: [DONE]\n\n"
                    return
                item = await self.next()
        except GatewayError as error:
            logger.info("chat {}: failed mid-stream: {}", completion_id, error.message)
            yield sse(wire.error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            self.metrics.open_streams.dec()
            self.relay.close()  # a client that went away lands here too (the stream task is cancelled)

    async def whole(self) -> dict[str, Any]:
        start, answer, logprobs = chat_pb2.ChatStart(), [], []
        item = await self.next()
        while True:
            if item is END:
                raise GatewayError(503, "the orchestrator ended the stream without its end message", "server_error")
            if item is not PING:
                if item.HasField("start"):
                    start = item.start
                elif item.HasField("delta"):
                    answer.append(item.delta)
                    logprobs.extend(item.logprobs)
                elif item.HasField("end"):
                    break
            item = await self.next()
        end = item.end
        found = translate.sources(start, end.cited)
        content = "".join(answer)
        extras = {**translate.start_extras(start, found), **translate.end_extras(end)}
        if self.settings.citations == "markdown":
            content += translate.sources_markdown(found, end.cited)
        self.metrics.count_tokens(end.prompt_tokens, end.completion_tokens)
        return wire.chat_completion(
            self.id,
            self.created,
            start.model or self.model,
            content,
            finish_reason(end.finish_reason),
            wire.usage(end.prompt_tokens, end.completion_tokens, end.cached_prompt_tokens),
            translate.chat_logprobs(logprobs) if logprobs else None,
            extras,
        )
