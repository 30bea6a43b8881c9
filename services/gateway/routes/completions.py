"""POST /v1/completions: a raw prompt straight to the generation service, no chat template and no
retrieval, one Generate call per choice (``n``); their streams back as one completion or as chunks. The
constraint fields vLLM's server takes (``structured_outputs``, ``response_format``, ``guided_*``) become every
choice's constraint."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from nightcap.v1 import generation_pb2
from services.gateway import openai_responses as replies
from services.gateway import openai_types as wire
from services.gateway import translate
from services.gateway.backends import GatewayError
from services.gateway.dependencies import backends, call_metadata, gateway_metrics, gateway_settings, served_model
from services.gateway.errors import checked, named
from services.gateway.streaming import PING, Answer, Relay, finish_reason, sse

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: wire.CompletionRequest, request: Request) -> Response:
    settings = gateway_settings(request)
    checked(body, settings.max_n)
    model = await served_model(request, body.model)
    metadata = call_metadata(request)
    request_id = dict(metadata)["x-request-id"]
    message = translate.generate_request(body, request_id, settings.defaults)
    stub = backends(request).generation
    calls = [
        stub.Generate(translate.seeded(message, index), timeout=settings.request_timeout, metadata=metadata)
        for index in range(body.choices())
    ]
    relay = Relay(calls, "generation", settings.generation)
    answer = CompletionAnswer(relay, f"cmpl-{request_id}", model, settings, gateway_metrics(request))
    try:
        return await answer.respond(request, body)
    except GatewayError as error:
        raise named(error, body) from None


@dataclass
class Generated:
    """One choice's generation as it arrives: its text, logprobs and finish; ``sent``: the characters a stream
    has sent (where the next piece's logprobs ``text_offset`` starts)."""

    text: list[str] = field(default_factory=list)
    logprobs: list[generation_pb2.TokenLogprob] = field(default_factory=list)
    finish: generation_pb2.Finish | None = None
    sent: int = 0


class CompletionAnswer(Answer):
    """The generation service's tokens (one stream per choice) as OpenAI's text completion or its chunks."""

    early_end = "the generation service ended the stream without finishing"

    async def events(self, first: Any, include_usage: bool) -> AsyncIterator[str]:
        completion_id, created, model = self.id, self.created, self.model
        self.metrics.open_streams.inc()
        choices = [Generated() for _ in self.relay.calls]
        try:
            async for item in self.messages(first, lambda index: choices[index].finish is not None):
                if item is PING:
                    yield ": ping\n\n"
                    continue
                index, message = item
                choice = choices[index]
                model = message.model or model
                if message.text or message.logprobs:
                    logprobs = (
                        translate.completion_logprobs(message.logprobs, choice.sent) if message.logprobs else None
                    )
                    choice.sent += len(message.text)
                    yield sse(
                        replies.completion_chunk(completion_id, created, model, message.text, None, logprobs, index)
                    )
                if message.HasField("finish"):
                    finish = choice.finish = message.finish
                    reason = finish_reason(finish.reason)
                    yield sse(replies.completion_chunk(completion_id, created, model, "", reason, None, index))
                    self.metrics.count_tokens(finish.prompt_tokens, finish.generated_tokens)
                    if all(c.finish is not None for c in choices):
                        if include_usage:
                            tail = replies.text_completion(completion_id, created, model, [])
                            yield sse(replies.usage_chunk(tail, _usage([c.finish for c in choices])))
                        yield "data: [DONE]\n\n"
                        return
        except GatewayError as error:
            yield sse(replies.error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            self.metrics.open_streams.dec()
            self.relay.close()

    async def whole(self) -> dict[str, Any]:
        choices, model = [Generated() for _ in self.relay.calls], self.model
        async for item in self.messages(await self.next(), lambda index: choices[index].finish is not None):
            if item is PING:
                continue
            index, message = item
            choice = choices[index]
            model = message.model or model
            choice.text.append(message.text)
            choice.logprobs.extend(message.logprobs)
            if message.HasField("finish"):
                choice.finish = message.finish
                if all(c.finish is not None for c in choices):
                    break
        bodies = []
        for index, choice in enumerate(choices):
            finish = choice.finish
            logprobs = translate.completion_logprobs(choice.logprobs, 0) if choice.logprobs else None
            bodies.append(
                replies.completion_choice(index, "".join(choice.text), finish_reason(finish.reason), logprobs)
            )
            self.metrics.count_tokens(finish.prompt_tokens, finish.generated_tokens)
        body = replies.text_completion(self.id, self.created, model, bodies)
        body["usage"] = _usage([c.finish for c in choices])
        return body


def _usage(finishes: list[generation_pb2.Finish]) -> dict[str, Any]:
    # as OpenAI counts n choices: the prompt once, the completions summed
    first = finishes[0]
    return replies.usage(
        first.prompt_tokens,
        sum(finish.generated_tokens for finish in finishes),
        first.cached_prompt_tokens,
        sum(finish.drafted_tokens for finish in finishes),
        sum(finish.accepted_draft_tokens for finish in finishes),
    )
