"""POST /v1/completions: a raw prompt straight to the generation service, no chat template and no
retrieval; its stream back as one completion or as chunks. The constraint fields vLLM's server takes
(``structured_outputs``, ``response_format``, ``guided_*``) become the generation's constraint."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
from services.gateway.streaming import END, PING, Answer, Relay, finish_reason, sse

router = APIRouter()


@router.post("/v1/completions")
async def completions(body: wire.CompletionRequest, request: Request) -> Response:
    checked(body)
    settings = gateway_settings(request)
    model = await served_model(request, body.model)
    metadata = call_metadata(request)
    request_id = dict(metadata)["x-request-id"]
    message = translate.generate_request(body, request_id, settings.defaults)
    call = backends(request).generation.Generate(message, timeout=settings.request_timeout, metadata=metadata)
    relay = Relay([call], "generation", settings.generation)
    answer = CompletionAnswer(relay, f"cmpl-{request_id}", model, settings, gateway_metrics(request))
    try:
        return await answer.respond(request, body)
    except GatewayError as error:
        raise named(error, body) from None


class CompletionAnswer(Answer):
    """The generation service's tokens as OpenAI's text completion or its chunks."""

    async def events(self, first: Any, include_usage: bool) -> AsyncIterator[str]:
        completion_id, created, model, item = self.id, self.created, self.model, first
        item = item if item is PING else item[1]
        self.metrics.open_streams.inc()
        offset = 0
        try:
            while True:
                if item is PING:
                    yield ": ping\n\n"
                elif item is END:
                    raise GatewayError(503, "the generation service ended the stream without finishing", "server_error")
                else:
                    model = item.model or model
                    if item.text or item.logprobs:
                        logprobs = translate.completion_logprobs(item.logprobs, offset) if item.logprobs else None
                        offset += len(item.text)
                        yield sse(replies.completion_chunk(completion_id, created, model, item.text, None, logprobs))
                    if item.HasField("finish"):
                        finish = item.finish
                        reason = finish_reason(finish.reason)
                        yield sse(replies.completion_chunk(completion_id, created, model, "", reason))
                        self.metrics.count_tokens(finish.prompt_tokens, finish.generated_tokens)
                        if include_usage:
                            tail = replies.completion_chunk(completion_id, created, model, "")
                            yield sse(replies.usage_chunk(tail, _usage(finish)))
                        yield "data: [DONE]\n\n"
                        return
                item = await self.next()
                item = item if item is PING else item[1]
        except GatewayError as error:
            yield sse(replies.error_body(error.message, error.type, error.param, error.code))
            yield "data: [DONE]\n\n"
        finally:
            self.metrics.open_streams.dec()
            self.relay.close()

    async def whole(self) -> dict[str, Any]:
        text, logprobs, model = [], [], self.model
        item = await self.next()
        while True:
            item = item if item is PING else item[1]
            if item is END:
                raise GatewayError(503, "the generation service ended the stream without finishing", "server_error")
            if item is not PING:
                model = item.model or model
                text.append(item.text)
                logprobs.extend(item.logprobs)
                if item.HasField("finish"):
                    break
            item = await self.next()
        finish = item.finish
        self.metrics.count_tokens(finish.prompt_tokens, finish.generated_tokens)
        body = replies.completion_chunk(
            self.id,
            self.created,
            model,
            "".join(text),
            finish_reason(finish.reason),
            translate.completion_logprobs(logprobs, 0) if logprobs else None,
        )
        body["usage"] = _usage(finish)
        return body


def _usage(finish: generation_pb2.Finish) -> dict[str, Any]:
    return replies.usage(
        finish.prompt_tokens,
        finish.generated_tokens,
        finish.cached_prompt_tokens,
        finish.drafted_tokens,
        finish.accepted_draft_tokens,
    )
