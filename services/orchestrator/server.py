"""The Chat gRPC servicer: prepare the turn, stream the generation back, report backend status."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator

import grpc
from loguru import logger

from nightcap.credentials import Credentials
from nightcap.v1 import chat_pb2, chat_pb2_grpc
from services.common.errors import Cancelled, ServiceError, Unavailable
from services.common.security import ServerSecurity
from services.common.server import RunningServer, ServerLimits, ServiceBinding, start_server
from services.orchestrator.backends import GenerationBackend, RetrievalBackend
from services.orchestrator.conversation import ChatOrchestrator

STATUS_TIMEOUT_S = 3.0
# grpcio reports a call without a deadline as having about 2**63 ns left; passed on as a timeout, that
# overflowed into a deadline already past. Anything beyond a year means "no deadline".
NO_DEADLINE_S = 365 * 24 * 3600.0


def backend_timeout_for(context: grpc.ServicerContext) -> float | None:
    """The time this call has left, to pass on to the backend; None when the caller set no deadline."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < NO_DEADLINE_S else None


class ChatServicer(chat_pb2_grpc.ChatServicer):
    def __init__(self, orchestrator: ChatOrchestrator) -> None:
        self.orchestrator = orchestrator

    def Chat(self, request: chat_pb2.ChatRequest, context: grpc.ServicerContext):
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex[:12]
        try:
            yield from self._chat(request, request_id, started, context)
        except Cancelled:
            if context.is_active():
                raise  # the generation service cancelled, not our client
            logger.info("chat {}: CANCELLED by its client after {:.2f}s", request_id, time.monotonic() - started)

    def _chat(
        self, request: chat_pb2.ChatRequest, request_id: str, started: float, context: grpc.ServicerContext
    ) -> Iterator[chat_pb2.ChatResponse]:
        turn = self.orchestrator.prepare(request)
        stream = self.orchestrator.generation.generate(
            turn.prompt, turn.params, timeout=backend_timeout_for(context), request_id=request_id
        )
        context.add_callback(stream.cancel)  # the client went away: stop generating
        responses = iter(stream)
        # the generation service validates before it streams: its errors reach the client before any message
        first = next(responses, None)
        if first is None:
            raise Unavailable("the generation service closed the stream without answering")
        yield chat_pb2.ChatResponse(
            start=chat_pb2.ChatStart(
                sources=turn.sources,
                prompt=turn.prompt,
                history_messages_dropped=turn.history_messages_dropped,
                model=turn.model,
            )
        )
        first_delta_at = None
        for response in itertools.chain([first], responses):
            if response.text:
                first_delta_at = first_delta_at or time.monotonic()
                yield chat_pb2.ChatResponse(delta=response.text)
            if response.HasField("finish"):
                finish = response.finish
                yield chat_pb2.ChatResponse(
                    end=chat_pb2.ChatEnd(
                        finish_reason=finish.reason,
                        prompt_tokens=finish.prompt_tokens,
                        completion_tokens=finish.generated_tokens,
                        context_used=turn.context_used,
                        notice=turn.notice,
                    )
                )
                logger.info(
                    "chat {}: history={} dropped={} sources={} prompt={} completion={} ttft={:.0f}ms total={:.2f}s"
                    " replica {}",
                    request_id,
                    len(request.history),
                    turn.history_messages_dropped,
                    len(turn.sources),
                    finish.prompt_tokens,
                    finish.generated_tokens,
                    ((first_delta_at or time.monotonic()) - started) * 1000,
                    time.monotonic() - started,
                    stream.replica() or self.orchestrator.generation.address,
                )

    def Status(self, request: chat_pb2.StatusRequest, context: grpc.ServicerContext) -> chat_pb2.StatusResponse:
        response = chat_pb2.StatusResponse()
        generation, retrieval = self.orchestrator.generation, self.orchestrator.retrieval
        for backend in (generation, retrieval):
            if backend is None:
                continue
            health, detail = backend.health(STATUS_TIMEOUT_S)
            response.backends.add(name=backend.name, address=backend.address, health=health, detail=detail)
        try:
            response.model.CopyFrom(generation.model_info(STATUS_TIMEOUT_S))
        except ServiceError as error:
            logger.debug("status: no model info: {}", error)
        if retrieval is not None:
            try:
                response.index.CopyFrom(retrieval.stats(STATUS_TIMEOUT_S))
            except ServiceError as error:
                logger.debug("status: no index stats: {}", error)
        return response


def start_chat_server(
    generation: str,
    retrieval: str | None,
    address: str,
    default_max_new_tokens: int = 256,
    backend_timeout: float = 10.0,
    limits: ServerLimits | None = None,
    security: ServerSecurity | None = None,
    backend_credentials: Credentials | None = None,
) -> RunningServer:
    """nightcap.v1.Chat in front of the given backends, with health and reflection, on ``address``.

    ``backend_credentials``: the TLS CA (and client certificate) and service token it calls the backends with."""
    orchestrator = ChatOrchestrator(
        GenerationBackend(generation, backend_credentials),
        RetrievalBackend(retrieval, backend_credentials) if retrieval else None,
        default_max_new_tokens=default_max_new_tokens,
        backend_timeout=backend_timeout,
    )
    binding = ServiceBinding(
        chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name,
        chat_pb2_grpc.add_ChatServicer_to_server,
        ChatServicer(orchestrator),
    )
    return start_server([binding], address, limits, security)
