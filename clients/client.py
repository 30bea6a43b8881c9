"""The nightcap Python client: typed, streaming, with deadlines and retries on UNAVAILABLE.

    with ChatClient("127.0.0.1:50050") as client:
        for event in client.chat("Where is Zurich?", retrieval=True):
            if isinstance(event, TextDelta):
                print(event.text, end="", flush=True)

Every failure is a ``NightcapError`` carrying the gRPC status code and the address it came from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nightcap.credentials import Credentials
from nightcap.records import (
    ORCHESTRATOR_ADDRESS,
    RETRIEVAL_ADDRESS,
    AddReport,
    CompactReport,
    DeleteReport,
    Document,
    IndexBuild,
    IndexStats,
    from_message,
    to_message,
)
from nightcap.records import Passage as Source
from nightcap.v1 import chat_pb2, chat_pb2_grpc, common_pb2, retrieval_pb2, retrieval_pb2_grpc

# Trailing metadata key of a call that failed in the orchestrator's backend (services/common/errors.py).
FAILED_SERVICE_KEY = "nightcap-failed-service"
DEFAULT_ADDRESS = os.environ.get("NIGHTCAP_ADDRESS", ORCHESTRATOR_ADDRESS)
DEFAULT_TIMEOUT_S = 300.0

# gRPC retries a call that failed with UNAVAILABLE before any response arrived (so a stream that has
# started streaming is never replayed). Backoff totals about 1.5 s over 4 attempts.
_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": "nightcap.v1.Chat"}, {"service": "grpc.health.v1.Health"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)

_ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "tool": chat_pb2.ROLE_TOOL,
}
_ROLE_NAMES = {value: name for name, value in _ROLES.items()}


class NightcapError(Exception):
    """A failed call: ``code`` is the gRPC status, ``address`` the server that was called."""

    def __init__(self, code: grpc.StatusCode, message: str, address: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.address = address


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: ``arguments`` is a JSON object as text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Tool:
    """A function the model may call; ``parameters`` is a JSON Schema as text (empty: any object)."""

    name: str
    description: str = ""
    parameters: str = ""


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user", "assistant" or "tool"
    content: str
    # For a user turn: the sources its ChatStarted listed. Sent back with the history, they stay in the
    # prompt beside their turn, and later turns do not give them again.
    sources: tuple[Source, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # a tool turn: the call it answers
    name: str = ""  # a tool turn: the function that answered


@dataclass(frozen=True)
class ChatStarted:
    """First event of a turn: what the model was given."""

    sources: list[Source]
    prompt: str
    history_messages_dropped: int
    model: str
    retrieval_query: str = ""  # what was searched for (built from the conversation, not only the message)
    retrieved_ids: list[str] = field(default_factory=list)  # every passage found, best first, incl. earlier ones
    # Set while the retrieval index is still being built: the search saw only what was indexed so far.
    index_build: IndexBuild | None = None


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of tool call ``index``: the first carries its id and name, later ones more of its arguments."""

    index: int
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatFinished:
    """Last event of a turn."""

    finish_reason: str  # "length", "eos", "stop_sequence", "tool_calls" or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    context_used: bool
    notice: str
    cached_prompt_tokens: int = 0  # of prompt_tokens, those the generation service's prefix cache supplied
    # The sources the answer cites with [n] markers, in the order first cited: their numbers
    # ([1] is ChatStarted.sources[0]) and their ids.
    cited: list[int] = field(default_factory=list)
    cited_ids: list[str] = field(default_factory=list)


ChatEvent = ChatStarted | TextDelta | ToolCallDelta | ChatFinished


@dataclass
class Reply:
    """A whole turn, collected: what ``ChatClient.ask`` returns."""

    text: str
    started: ChatStarted
    finished: ChatFinished
    tool_calls: list[ToolCall] = field(default_factory=list)  # the calls, assembled from their pieces

    @property
    def cited_sources(self) -> list[tuple[int, Source]]:
        """The sources the answer cites, in the order first cited, each with its number."""
        sources = self.started.sources
        return [(number, sources[number - 1]) for number in self.finished.cited if 1 <= number <= len(sources)]

    def as_history(self, message: str) -> list[Message]:
        """This turn as two history messages (the question with its sources, then the answer)."""
        return [Message("user", message, tuple(self.started.sources)), Message("assistant", self.text.strip())]


@dataclass(frozen=True)
class BackendStatus:
    name: str
    address: str
    health: str
    detail: str


@dataclass
class StackStatus:
    orchestrator_address: str
    orchestrator_health: str
    backends: list[BackendStatus] = field(default_factory=list)
    model: dict[str, Any] | None = None
    index: dict[str, Any] | None = None  # the StatsResponse fields that are set; "build" as an IndexBuild


@dataclass
class SamplingParams:
    """Unset (None) fields take the server's defaults."""

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    # What the answer must be, enforced token by token; at most one: a JSON Schema as JSON text, any JSON
    # object, a regular expression, a Lark or GBNF grammar, or one of some strings.
    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    lark: str | None = None
    gbnf: str | None = None
    choice: list[str] | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias, clamped to [-100, 100]

    def to_proto(self) -> common_pb2.SamplingParams:
        params = common_pb2.SamplingParams(stop=self.stop, logit_bias=self.logit_bias)
        for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
            value = getattr(self, name)
            if value is not None:
                setattr(params, name, value)
        kinds = {name: getattr(self, name) for name in ("json_schema", "regex", "lark", "gbnf")}
        kinds = {name: value for name, value in kinds.items() if value is not None}
        if self.json_object:
            kinds["json_object"] = True
        if self.choice is not None:
            kinds["choice"] = common_pb2.Choice(options=self.choice)
        if len(kinds) > 1:
            raise ValueError(f"one constraint at a time, got {', '.join(kinds)}")
        if kinds:
            params.constraint.CopyFrom(common_pb2.Constraint(**kinds))
        return params


def finish_reason_name(reason: int) -> str:
    return common_pb2.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower()


class ChatClient:
    """A connection to the orchestrator (``nightcap.v1.Chat``)."""

    def __init__(
        self, address: str = DEFAULT_ADDRESS, timeout: float = DEFAULT_TIMEOUT_S, credentials: Credentials | None = None
    ) -> None:
        """``credentials``: TLS CA, client certificate and token; by default from ``NIGHTCAP_TLS_CA``,
        ``NIGHTCAP_CLIENT_CERT``, ``NIGHTCAP_CLIENT_KEY``, ``NIGHTCAP_TOKEN`` or ``NIGHTCAP_TOKEN_FILE``."""
        self.address = address
        self.timeout = timeout
        self._channel = (credentials or Credentials.from_env()).channel(
            address, options=[("grpc.service_config", _RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        )
        self._chat = chat_pb2_grpc.ChatStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> ChatClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def chat(
        self,
        message: str,
        history: Sequence[Message] = (),
        retrieval: bool = False,
        k: int | None = None,
        params: SamplingParams | None = None,
        timeout: float | None = None,
        request_id: str = "",
        tools: Sequence[Tool] = (),
        tool_choice: str = "",
    ) -> Iterator[ChatEvent]:
        """Streams one turn: a ``ChatStarted``, then ``TextDelta``s (and ``ToolCallDelta``s when ``tools`` are
        offered), then a ``ChatFinished``. ``tool_choice``: "auto" (default), "none", "required" or a tool's name.

        Closing the iterator early cancels the call, and the server stops generating."""
        request = chat_pb2.ChatRequest(
            request_id=request_id,
            history=[
                chat_pb2.ChatMessage(
                    role=_role(m.role),
                    content=m.content,
                    sources=[to_message(s, retrieval_pb2.Passage) for s in m.sources],
                    tool_calls=[chat_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls],
                    tool_call_id=m.tool_call_id,
                    name=m.name,
                )
                for m in history
            ],
            message=message,
            retrieval=retrieval,
            params=(params or SamplingParams()).to_proto(),
            tools=[chat_pb2.Tool(name=t.name, description=t.description, parameters=t.parameters) for t in tools],
        )
        if tool_choice in _TOOL_MODES:
            request.tool_choice.mode = _TOOL_MODES[tool_choice]
        elif tool_choice:
            request.tool_choice.function = tool_choice
        if k is not None:
            request.retrieval_k = k
        call = self._chat.Chat(request, timeout=timeout or self.timeout)
        try:
            for response in call:
                yield _chat_event(response)
        except grpc.RpcError as error:
            raise self._error(error) from None
        finally:
            call.cancel()

    def ask(self, message: str, on_text: Callable[[str], object] | None = None, **kwargs: Any) -> Reply:
        """One turn, collected into a ``Reply``; ``on_text`` sees each piece of the answer as it streams.
        Takes the same arguments as ``chat``; an exception in ``on_text`` (Ctrl-C) cancels the call."""
        text: list[str] = []
        calls: dict[int, list[str]] = {}
        started = finished = None
        events = self.chat(message, **kwargs)
        try:
            for event in events:
                if isinstance(event, ChatStarted):
                    started = event
                elif isinstance(event, TextDelta):
                    text.append(event.text)
                    if on_text is not None:
                        on_text(event.text)
                elif isinstance(event, ToolCallDelta):
                    call = calls.setdefault(event.index, ["", "", ""])
                    call[0], call[1] = call[0] or event.id, call[1] or event.name
                    call[2] += event.arguments
                else:
                    finished = event
        finally:
            events.close()
        if started is None or finished is None:
            raise NightcapError(grpc.StatusCode.INTERNAL, "the chat stream ended early", self.address)
        tool_calls = [ToolCall(*calls[index]) for index in sorted(calls)]
        return Reply(text="".join(text), started=started, finished=finished, tool_calls=tool_calls)

    def status(self, timeout: float = 10.0) -> StackStatus:
        """The orchestrator's health and, through it, each backend's health, model and index."""
        status = StackStatus(orchestrator_address=self.address, orchestrator_health=self.health(timeout))
        try:
            response = self._chat.Status(chat_pb2.StatusRequest(), timeout=timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        status.backends = [BackendStatus(b.name, b.address, b.health, b.detail) for b in response.backends]
        if response.HasField("model"):
            status.model = _fields(response.model)
        if response.HasField("index"):
            status.index = _fields(response.index)
            if response.index.HasField("build"):  # as its record, which can describe itself
                status.index["build"] = from_message(IndexBuild, response.index.build)
        return status

    def health(self, timeout: float = 5.0) -> str:
        """``SERVING`` or ``NOT_SERVING`` per grpc.health.v1; raises NightcapError when unreachable."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as error:
            raise self._error(error) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _error(self, error: grpc.RpcError) -> NightcapError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = (error.details() if hasattr(error, "details") else None) or str(error)
        if _failed_backend(error) is not None:
            pass  # the orchestrator answered; its message names the backend that failed
        elif code == grpc.StatusCode.UNAVAILABLE:
            details = f"cannot reach the nightcap orchestrator at {self.address} ({details})"
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            details = f"no answer from {self.address} within the deadline ({details})"
        return NightcapError(code, details, self.address)


def _failed_backend(error: grpc.RpcError) -> str | None:
    """``name address`` of the backend the server said failed, when the server answered at all."""
    metadata = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    return dict(metadata or ()).get(FAILED_SERVICE_KEY)


def check_health(address: str, timeout: float = 2.0, credentials: Credentials | None = None) -> str:
    """Health of any nightcap service (or any gRPC server with grpc.health.v1), without retries."""
    with (credentials or Credentials.from_env()).channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.RpcError as error:
            raise NightcapError(error.code(), f"{address}: {error.details()}", address) from None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


_TOOL_MODES = {
    "auto": chat_pb2.ToolChoice.MODE_AUTO,
    "none": chat_pb2.ToolChoice.MODE_NONE,
    "required": chat_pb2.ToolChoice.MODE_REQUIRED,
}


def _role(name: str) -> int:
    try:
        return _ROLES[name]
    except KeyError:
        raise ValueError(f"unknown role {name!r}: use one of {', '.join(_ROLES)}") from None


def role_name(role: int) -> str:
    return _ROLE_NAMES.get(role, "unspecified")


def _chat_event(response: chat_pb2.ChatResponse) -> ChatEvent:
    kind = response.WhichOneof("event")
    if kind == "start":
        start = response.start
        return ChatStarted(
            sources=[from_message(Source, p) for p in start.sources],
            prompt=start.prompt,
            history_messages_dropped=start.history_messages_dropped,
            model=start.model,
            retrieval_query=start.retrieval_query,
            retrieved_ids=list(start.retrieved_ids),
            index_build=from_message(IndexBuild, start.index_build) if start.HasField("index_build") else None,
        )
    if kind == "delta":
        return TextDelta(response.delta)
    if kind == "tool_call":
        piece = response.tool_call
        return ToolCallDelta(piece.index, piece.id, piece.name, piece.arguments)
    end = response.end
    return ChatFinished(
        finish_reason=finish_reason_name(end.finish_reason),
        prompt_tokens=end.prompt_tokens,
        completion_tokens=end.completion_tokens,
        context_used=end.context_used,
        notice=end.notice,
        cached_prompt_tokens=end.cached_prompt_tokens,
        cited=list(end.cited),
        cited_ids=list(end.cited_ids),
    )


def _fields(message: Any) -> dict[str, Any]:
    return {descriptor.name: value for descriptor, value in message.ListFields()}


# --- the retrieval index -----------------------------------------------------------------------------------

DEFAULT_RETRIEVAL_ADDRESS = os.environ.get("NIGHTCAP_RETRIEVAL_ADDRESS", RETRIEVAL_ADDRESS)
SEARCH_MODES = {
    "": retrieval_pb2.SEARCH_MODE_UNSPECIFIED,
    "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID,
    "vector": retrieval_pb2.SEARCH_MODE_VECTOR,
    "keyword": retrieval_pb2.SEARCH_MODE_KEYWORD,
}

# Reads are retried on UNAVAILABLE like chat calls; writes are not (a replayed stream could commit twice).
_INDEX_RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "nightcap.v1.Retrieval", "method": "Search"},
                    {"service": "nightcap.v1.Retrieval", "method": "Stats"},
                ],
                "retryPolicy": json.loads(_RETRY_SERVICE_CONFIG)["methodConfig"][0]["retryPolicy"],
            }
        ]
    }
)


class IndexClient:
    """A connection to a retrieval service (``nightcap.v1.Retrieval``): search it, feed it, inspect it.

    with IndexClient("127.0.0.1:50052") as index:
        report = index.add_documents(read_documents(["notes/"]))
    """

    def __init__(
        self,
        address: str = DEFAULT_RETRIEVAL_ADDRESS,
        timeout: float = DEFAULT_TIMEOUT_S,
        credentials: Credentials | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self._channel = (credentials or Credentials.from_env()).channel(
            address, options=[("grpc.service_config", _INDEX_RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1)]
        )
        self._stub = retrieval_pb2_grpc.RetrievalStub(self._channel)

    def __enter__(self) -> IndexClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def search(
        self, query: str, k: int | None = None, timeout: float | None = None, title: str = "", mode: str = ""
    ) -> list[Source]:
        """The k passages that best match ``query``, best first; ``title``: a document title to look up, whose
        first passage (``Source.titled``) comes first; ``mode``: "hybrid", "vector" or "keyword" ("" for the
        service's default)."""
        if mode not in SEARCH_MODES:
            raise ValueError(f"mode must be one of {', '.join(m for m in SEARCH_MODES if m)} (or empty); got {mode!r}")
        request = retrieval_pb2.SearchRequest(query=query, title=title, mode=SEARCH_MODES[mode])
        if k is not None:
            request.k = k
        response = self._call(self._stub.Search, request, timeout)
        return [from_message(Source, p) for p in response.passages]

    def stats(self, timeout: float | None = None) -> IndexStats:
        response = self._call(self._stub.Stats, retrieval_pb2.StatsRequest(), timeout)
        return from_message(IndexStats, response)

    def add_documents(self, documents: Iterable[Document], timeout: float | None = None) -> AddReport:
        """Streams the documents in one call: the service commits all of them, or none."""
        requests = (
            retrieval_pb2.AddDocumentsRequest(document=to_message(d, retrieval_pb2.Document)) for d in documents
        )
        return from_message(AddReport, self._call(self._stub.AddDocuments, requests, timeout))

    def delete_documents(self, ids: Sequence[str], timeout: float | None = None) -> DeleteReport:
        request = retrieval_pb2.DeleteDocumentsRequest(ids=list(ids))
        return from_message(DeleteReport, self._call(self._stub.DeleteDocuments, request, timeout))

    def compact(self, timeout: float | None = None) -> CompactReport:
        """Merges the index's vector segments into one and drops removed passages' vectors; returns when done."""
        response = self._call(self._stub.Compact, retrieval_pb2.CompactRequest(), timeout)
        return from_message(CompactReport, response)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
            details = (error.details() if hasattr(error, "details") else None) or str(error)
            if code == grpc.StatusCode.UNAVAILABLE:
                details = f"cannot reach the nightcap retrieval service at {self.address} ({details})"
            raise NightcapError(code, details, self.address) from None
