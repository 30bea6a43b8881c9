"""The Chat gRPC servicer: prepare the turn, stream the generation back, report backend status."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Iterator

import grpc
from loguru import logger

from nightcap.credentials import Credentials
from nightcap.records import to_message
from nightcap.v1 import chat_pb2, chat_pb2_grpc, common_pb2, generation_pb2, retrieval_pb2
from services.common.errors import Cancelled, InvalidArgument, ServiceError, Unavailable
from services.common.security import ServerSecurity
from services.common.server import RunningServer, ServerLimits, ServiceBinding, start_server
from services.orchestrator.backends import GenerationBackend, GenerationStream, RetrievalBackend
from services.orchestrator.conversation import ChatOrchestrator, PreparedTurn, QueryMode, TurnRequest
from services.orchestrator.grounding import Grounding, cited
from services.orchestrator.prompts import ContextPassage, Turn
from services.orchestrator.tools import CallPiece, TextPiece, ToolCall, ToolCallParser, check_grammar, tool_use_from

STATUS_TIMEOUT_S = 3.0
# grpcio reports a call without a deadline as having about 2**63 ns left; passed on as a timeout, that
# overflowed into a deadline already past. Anything beyond a year means "no deadline".
NO_DEADLINE_S = 365 * 24 * 3600.0


def backend_timeout_for(context: grpc.ServicerContext) -> float | None:
    """The time this call has left, to pass on to the backend; None when the caller set no deadline."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < NO_DEADLINE_S else None


_ROLE_NAMES = {
    chat_pb2.ROLE_SYSTEM: "system",
    chat_pb2.ROLE_USER: "user",
    chat_pb2.ROLE_ASSISTANT: "assistant",
    chat_pb2.ROLE_TOOL: "tool",
}
_CHOICE_NAMES = {
    chat_pb2.ToolChoice.MODE_AUTO: "auto",
    chat_pb2.ToolChoice.MODE_NONE: "none",
    chat_pb2.ToolChoice.MODE_REQUIRED: "required",
}
# a generation that ended by itself: its answer is complete, so calls in it are reported as FINISH_REASON_TOOL_CALLS
_ENDED_BY_MODEL = (common_pb2.FINISH_REASON_EOS, common_pb2.FINISH_REASON_STOP_SEQUENCE)


class ChatServicer(chat_pb2_grpc.ChatServicer):
    def __init__(self, orchestrator: ChatOrchestrator) -> None:
        self.orchestrator = orchestrator

    def Chat(self, request: chat_pb2.ChatRequest, context: grpc.ServicerContext):
        started = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex[:12]
        try:
            yield from self._chat(request, request_id, started, context)
        except (Cancelled, GeneratorExit) as stop:
            # Cancelled: seen while we waited for generation; GeneratorExit: grpcio closed the stream while we
            # waited to send. Only a Cancelled with our client still there is the generation service's doing.
            if isinstance(stop, Cancelled) and context.is_active():
                raise
            logger.info("chat {}: CANCELLED by its client after {:.2f}s", request_id, time.monotonic() - started)
            if isinstance(stop, GeneratorExit):
                raise

    def _chat(
        self, request: chat_pb2.ChatRequest, request_id: str, started: float, context: grpc.ServicerContext
    ) -> Iterator[chat_pb2.ChatResponse]:
        turn = self.orchestrator.prepare(turn_request(request, request_id))
        if turn.reply:
            yield from self._reply_without_model(turn, request_id)
            return
        stream, responses, first = self._generate(turn, request, request_id, context)
        if self.orchestrator.served_by(first.model) and not self.orchestrator.prepared_for_served(turn):
            # Another model was switched in after the turn was prepared, and it tokenizes or formats prompts
            # differently: the ids sent mean other tokens to it. The turn is prepared again for it, once.
            stream.cancel()
            logger.info("chat {}: {} serves now; the turn is prepared again for it", request_id, first.model)
            turn = self.orchestrator.prepare(turn_request(request, request_id))
            if turn.reply:
                yield from self._reply_without_model(turn, request_id)
                return
            stream, responses, first = self._generate(turn, request, request_id, context)
            self.orchestrator.served_by(first.model)
        yield chat_pb2.ChatResponse(start=_start(turn, first.model or turn.model))
        first_delta_at = None
        answer: list[str] = []
        parser = ToolCallParser() if turn.parses_calls else None
        pending_logprobs: list = []  # of text the parser holds back, sent with the next event
        for response in itertools.chain([first], responses):
            if response.text or response.logprobs:
                first_delta_at = first_delta_at or time.monotonic()
                if parser is None:
                    answer.append(response.text)
                    yield chat_pb2.ChatResponse(delta=response.text, logprobs=response.logprobs)
                else:
                    pending_logprobs.extend(response.logprobs)
                    pieces = parser.feed(response.text)
                    if pieces:
                        yield from _relay_pieces(pieces, pending_logprobs, answer)
                        pending_logprobs = []
            if response.HasField("finish"):
                finish = response.finish
                if parser is not None:
                    yield from _relay_pieces(parser.finish(), pending_logprobs, answer)
                end = _end(turn, "".join(answer))
                end.finish_reason = finish.reason
                if parser is not None and parser.calls and not parser.inside_call and finish.reason in _ENDED_BY_MODEL:
                    end.finish_reason = common_pb2.FINISH_REASON_TOOL_CALLS
                end.prompt_tokens = finish.prompt_tokens
                end.completion_tokens = finish.generated_tokens
                end.cached_prompt_tokens = finish.cached_prompt_tokens
                end.drafted_tokens = finish.drafted_tokens
                end.accepted_draft_tokens = finish.accepted_draft_tokens
                yield chat_pb2.ChatResponse(end=end)
                logger.info(
                    "chat {}: history={} dropped={} sources={} prompt={} (cached {}) completion={} query_ms={:.0f}"
                    " ttft={:.0f}ms total={:.2f}s replica {}",
                    request_id,
                    len(request.history),
                    turn.history_messages_dropped,
                    len(turn.sources),
                    finish.prompt_tokens,
                    finish.cached_prompt_tokens,
                    finish.generated_tokens,
                    turn.query_ms,
                    ((first_delta_at or time.monotonic()) - started) * 1000,
                    time.monotonic() - started,
                    stream.replica() or self.orchestrator.generation.address,
                )

    def _generate(
        self, turn: PreparedTurn, request: chat_pb2.ChatRequest, request_id: str, context: grpc.ServicerContext
    ) -> tuple[GenerationStream, Iterator[generation_pb2.GenerateResponse], generation_pb2.GenerateResponse]:
        """The turn's Generate call, its responses, and the first of them."""
        params = common_pb2.SamplingParams()
        params.CopyFrom(request.params)
        params.max_new_tokens = turn.max_new_tokens
        del params.stop[:]
        params.stop.extend(turn.stop)
        if turn.grammar:
            params.constraint.lark = turn.grammar
        stream = self.orchestrator.generation.generate(
            turn.prompt_token_ids, params, timeout=backend_timeout_for(context), request_id=request_id
        )
        context.add_callback(stream.cancel)  # the client went away: stop generating
        responses = iter(stream)
        # the generation service validates before it streams: its errors reach the client before any message
        try:
            first = next(responses, None)
        except ServiceError:
            self.orchestrator.forget_model()  # perhaps a new model with another vocabulary: ask again next turn
            raise
        if first is None:
            raise Unavailable("the generation service closed the stream without answering")
        return stream, responses, first

    def _reply_without_model(self, turn: PreparedTurn, request_id: str) -> Iterator[chat_pb2.ChatResponse]:
        """The turn's fixed answer (no passage scored above --min-score), streamed as a model's would be."""
        yield chat_pb2.ChatResponse(start=_start(turn, turn.model))
        yield chat_pb2.ChatResponse(delta=turn.reply)
        end = _end(turn, turn.reply)
        end.finish_reason = common_pb2.FINISH_REASON_EOS  # the answer is complete, as when a model ends it
        yield chat_pb2.ChatResponse(end=end)
        logger.info("chat {}: no source matched ({}); answered without the model", request_id, turn.notice)

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


def _start(turn: PreparedTurn, model: str) -> chat_pb2.ChatStart:
    start = chat_pb2.ChatStart(
        sources=[to_message(p, retrieval_pb2.Passage) for p in turn.sources],
        prompt=turn.prompt,
        history_messages_dropped=turn.history_messages_dropped,
        model=model,
        retrieval_query=turn.retrieval_query,
        retrieved_ids=turn.retrieved_ids,
    )
    if turn.index_build is not None:
        start.index_build.CopyFrom(turn.index_build)
    return start


def _end(turn: PreparedTurn, answer: str) -> chat_pb2.ChatEnd:
    """ChatEnd with what the orchestrator knows (the token counts come from the generation service)."""
    numbers = cited(answer, len(turn.sources)) if turn.numbered else []
    return chat_pb2.ChatEnd(
        context_used=turn.context_used,
        notice=turn.notice,
        cited=numbers,
        cited_ids=[turn.sources[number - 1].id for number in numbers],
    )


def _relay_pieces(pieces: list[TextPiece | CallPiece], logprobs, answer: list[str]) -> Iterator[chat_pb2.ChatResponse]:
    """The parser's pieces as ChatResponses; the tokens' logprobs go with the first."""
    for piece in pieces:
        if isinstance(piece, TextPiece):
            answer.append(piece.text)
            yield chat_pb2.ChatResponse(delta=piece.text, logprobs=logprobs)
        else:
            delta = chat_pb2.ToolCallDelta(index=piece.index, id=piece.id, name=piece.name, arguments=piece.arguments)
            yield chat_pb2.ChatResponse(tool_call=delta, logprobs=logprobs)
        logprobs = []


def turn_request(request: chat_pb2.ChatRequest, request_id: str) -> TurnRequest:
    """The ChatRequest as the orchestrator's plain record; a history entry without a role is refused here."""
    history = []
    for index, entry in enumerate(request.history):
        if entry.role not in _ROLE_NAMES:
            raise InvalidArgument(
                f"history[{index}] has no role: use ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"
            )
        context = tuple(ContextPassage(p.title, p.text, p.source, p.id) for p in entry.sources)
        calls = tuple(ToolCall(c.id, c.name, c.arguments) for c in entry.tool_calls)
        role = _ROLE_NAMES[entry.role]
        history.append(Turn(role, entry.content, context, calls, entry.tool_call_id, entry.name))
    params = request.params
    choice = request.tool_choice
    tool_use = tool_use_from(
        request.tools,
        _CHOICE_NAMES.get(choice.mode, "auto"),
        choice.function,
        request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True,
        params.HasField("constraint"),
    )
    if tool_use is not None:
        check_grammar(tool_use)
    return TurnRequest(
        message=request.message,
        history=history,
        retrieval=request.retrieval,
        k=request.retrieval_k if request.HasField("retrieval_k") else None,
        max_new_tokens=params.max_new_tokens if params.HasField("max_new_tokens") else None,
        stop=tuple(params.stop),
        request_id=request_id,
        tool_use=tool_use,
    )


def start_chat_server(
    generation: str,
    retrieval: str | None,
    address: str,
    default_max_new_tokens: int = 256,
    backend_timeout: float = 10.0,
    limits: ServerLimits | None = None,
    security: ServerSecurity | None = None,
    backend_credentials: Credentials | None = None,
    query_mode: QueryMode | str = QueryMode.RECENT,
    grounding: Grounding | None = None,
) -> RunningServer:
    """nightcap.v1.Chat in front of the given backends, with health and reflection, on ``address``.

    ``backend_credentials``: the TLS CA (and client certificate) and service token it calls the backends with."""
    orchestrator = ChatOrchestrator(
        GenerationBackend(generation, backend_credentials),
        RetrievalBackend(retrieval, backend_credentials) if retrieval else None,
        default_max_new_tokens=default_max_new_tokens,
        backend_timeout=backend_timeout,
        query_mode=QueryMode(query_mode),
        grounding=grounding,
    )
    binding = ServiceBinding(
        chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name,
        chat_pb2_grpc.add_ChatServicer_to_server,
        ChatServicer(orchestrator),
    )
    return start_server([binding], address, limits, security)
