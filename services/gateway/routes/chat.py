"""POST /v1/chat/completions: an OpenAI chat request into one Chat call to the orchestrator per choice (``n``),
their streams back as one completion or as chunks, with the passages the answer was grounded in and the tool
calls it made."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from loguru import logger

from nightcap.v1 import chat_pb2, common_pb2
from services.gateway import openai_responses as replies
from services.gateway import openai_types as wire
from services.gateway import translate
from services.gateway.backends import GatewayError
from services.gateway.dependencies import backends, call_metadata, gateway_metrics, gateway_settings, served_model
from services.gateway.errors import checked, named
from services.gateway.streaming import PING, Answer, Relay, finish_reason, sse

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: wire.ChatCompletionRequest, request: Request) -> Response:
    settings = gateway_settings(request)
    checked(body, settings.max_n)
    model = await served_model(request, body.model)
    metadata = call_metadata(request)
    request_id = dict(metadata)["x-request-id"]
    retrieves = settings.retrieval_default and settings.retrieval is not None
    message = translate.chat_request(body, request_id, settings.defaults, retrieves)
    stub = backends(request).chat
    calls = [
        stub.Chat(translate.seeded(message, index), timeout=settings.request_timeout, metadata=metadata)
        for index in range(body.choices())
    ]
    relay = Relay(calls, "orchestrator", settings.orchestrator)
    answer = ChatAnswer(relay, f"chatcmpl-{request_id}", model, settings, gateway_metrics(request))
    answer.legacy = body.legacy()
    try:
        return await answer.respond(request, body)
    except GatewayError as error:
        raise named(error, body) from None


@dataclass
class Choice:
    """One choice's turn as it arrives: its start, text, tool calls (id, name, arguments so far) and end."""

    start: chat_pb2.ChatStart = field(default_factory=chat_pb2.ChatStart)
    text: list[str] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    calls: dict[int, list[str]] = field(default_factory=dict)
    end: chat_pb2.ChatEnd | None = None

    def add_call(self, piece: chat_pb2.ToolCallDelta) -> None:
        call = self.calls.setdefault(piece.index, ["", "", ""])
        call[0], call[1] = call[0] or piece.id, call[1] or piece.name
        call[2] += piece.arguments

    def finished_calls(self, reason: str) -> list[tuple[str, str, str]]:
        """The calls in order; an answer cut by max tokens keeps only those whose arguments parse."""
        calls = [tuple(self.calls[index]) for index in sorted(self.calls)]
        if reason == "length":
            calls = [call for call in calls if _parses(call[2])]
        return calls  # type: ignore[return-value]


def _parses(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except ValueError:
        return False


class ChatAnswer(Answer):
    """The orchestrator's ChatStart, deltas, tool calls and ChatEnd (one stream per choice) as OpenAI's chat
    completion or its chunks; ``legacy``: tool calls in the ``functions`` shape (``function_call``)."""

    legacy = False
    early_end = "the orchestrator ended the stream without its end message"

    def _usage(self, ends: list[chat_pb2.ChatEnd]) -> dict[str, Any]:
        # as OpenAI counts n choices: the prompt once, the completions summed
        first = ends[0]
        return replies.usage(
            first.prompt_tokens,
            sum(end.completion_tokens for end in ends),
            first.cached_prompt_tokens,
            sum(end.drafted_tokens for end in ends),
            sum(end.accepted_draft_tokens for end in ends),
        )

    async def events(self, first: Any, include_usage: bool) -> AsyncIterator[str]:
        completion_id, created, model = self.id, self.created, self.model
        self.metrics.open_streams.inc()
        choices = [Choice() for _ in self.relay.calls]
        try:
            async for item in self.messages(first, lambda index: choices[index].end is not None):
                if item is PING:
                    yield ": ping\n\n"
                    continue
                index, message = item
                choice = choices[index]
                if message.HasField("start"):
                    choice.start = message.start
                    model = message.start.model or model
                    found = translate.sources(message.start)
                    opening = {"role": "assistant", "content": ""}
                    role = replies.chat_chunk(completion_id, created, model, opening, None, index)
                    role["nightcap"] = translate.start_extras(message.start, found)
                    yield sse(role)
                elif message.HasField("delta"):
                    chunk = replies.chat_chunk(completion_id, created, model, {"content": message.delta}, None, index)
                    if message.logprobs:
                        chunk["choices"][0]["logprobs"] = {"content": translate.chat_logprobs(message.logprobs)}
                    yield sse(chunk)
                elif message.HasField("tool_call"):
                    piece = message.tool_call
                    delta = replies.tool_call_delta(piece.index, piece.id, piece.name, piece.arguments, self.legacy)
                    yield sse(replies.chat_chunk(completion_id, created, model, delta, None, index))
                elif message.HasField("end"):
                    end = choice.end = message.end
                    found = translate.sources(choice.start)
                    if self.settings.citations == "markdown" and found and end.finish_reason != _TOOL_CALLS:
                        extra = translate.sources_markdown(found, end.cited)
                        yield sse(replies.chat_chunk(completion_id, created, model, {"content": extra}, None, index))
                    reason = finish_reason(end.finish_reason, self.legacy)
                    last = replies.chat_chunk(completion_id, created, model, {}, reason, index)
                    last["nightcap"] = translate.end_extras(end)
                    yield sse(last)
                    self.metrics.count_tokens(end.prompt_tokens, end.completion_tokens)
                    if all(c.end is not None for c in choices):
                        if include_usage:
                            tail = replies.chat_chunk(completion_id, created, model, {})
                            yield sse({**tail, "choices": [], "usage": self._usage([c.end for c in choices])})
                        yield "data: [DONE]\n\n"
                        return
        except GatewayError as error:
            logger.info("chat {}: failed mid-stream: {}", completion_id, error.message)
            yield sse(replies.error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            self.metrics.open_streams.dec()
            self.relay.close()  # a client that went away lands here too (the stream task is cancelled)

    async def whole(self) -> dict[str, Any]:
        choices = [Choice() for _ in self.relay.calls]
        async for item in self.messages(await self.next(), lambda index: choices[index].end is not None):
            if item is PING:
                continue
            index, message = item
            choice = choices[index]
            if message.HasField("start"):
                choice.start = message.start
            elif message.HasField("delta"):
                choice.text.append(message.delta)
                choice.logprobs.extend(message.logprobs)
            elif message.HasField("tool_call"):
                choice.add_call(message.tool_call)
            elif message.HasField("end"):
                choice.end = message.end
                if all(c.end is not None for c in choices):
                    break
        bodies = []
        for index, choice in enumerate(choices):
            end = choice.end
            reason = finish_reason(end.finish_reason, self.legacy)
            calls = choice.finished_calls(reason)
            content: str | None = "".join(choice.text)
            if calls and not content:
                content = None
            elif self.settings.citations == "markdown" and not calls:
                content += translate.sources_markdown(translate.sources(choice.start), end.cited)
            logprobs = translate.chat_logprobs(choice.logprobs) if choice.logprobs else None
            message = replies.assistant_message(content, calls, self.legacy)
            bodies.append(replies.chat_choice(index, message, reason, logprobs))
            self.metrics.count_tokens(end.prompt_tokens, end.completion_tokens)
        first = choices[0]
        found = translate.sources(first.start, first.end.cited)
        extras = {**translate.start_extras(first.start, found), **translate.end_extras(first.end)}
        return replies.chat_completion(
            self.id,
            self.created,
            first.start.model or self.model,
            bodies,
            self._usage([c.end for c in choices]),
            extras,
        )


_TOOL_CALLS = common_pb2.FINISH_REASON_TOOL_CALLS
