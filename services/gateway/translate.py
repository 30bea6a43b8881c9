"""OpenAI requests into nightcap messages, nightcap messages into OpenAI fields. Pure functions."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from nightcap.records import IndexBuild, from_message
from nightcap.v1 import chat_pb2, common_pb2, generation_pb2, retrieval_pb2
from services.gateway.openai_structured import Constraint, NamedFunction, NamedToolChoice
from services.gateway.openai_types import ChatCompletionRequest, ChatMessage, CompletionRequest, _Sampling

_ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "developer": chat_pb2.ROLE_SYSTEM,  # OpenAI's newer name for the system turn
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "tool": chat_pb2.ROLE_TOOL,
    "function": chat_pb2.ROLE_TOOL,  # legacy: the result of an assistant's function_call
}
# OpenAI's reasons: an end-of-sequence token and a stop sequence are both "stop"; tool calls "tool_calls"
# (a request that used the legacy ``functions`` gets "function_call" instead, see ``finish_name``).
FINISH_REASONS = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_EOS: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_TOOL_MODES = {
    "auto": chat_pb2.ToolChoice.MODE_AUTO,
    "none": chat_pb2.ToolChoice.MODE_NONE,
    "required": chat_pb2.ToolChoice.MODE_REQUIRED,
}
LEGACY_CALL_ID = "call_fn_{}"  # the id given to the n-th legacy function_call of a conversation
SNIPPET_CHARS = 200


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a field unset gets: the OpenChatKit shell's defaults, except the temperature
    of a chat answered from the index (``grounded_temperature``). make eval on the default model and index
    (2026-12-07), grounded, 64 tokens: greedy answered 0.733 of the single questions, 0.90 of the openings and
    0.70 of the follow-ups; temperature 0.6 with top-k 40 answered 0.617, 0.725 and 0.60 (both admitted all 30
    unanswerable questions). Sampling lets a small model wander off the passage it was given."""

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 40
    max_tokens: int = 256
    grounded_temperature: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "grounded_temperature": self.grounded_temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
        }

    def for_chat(self, grounded: bool) -> SamplingDefaults:
        """These defaults for a chat that is (or is not) answered from the index."""
        return replace(self, temperature=self.grounded_temperature) if grounded else self


def constraint(found: Constraint | None) -> common_pb2.Constraint | None:
    """The proto's Constraint for a checked wire constraint."""
    if found is None:
        return None
    if found.kind == "json_object":
        return common_pb2.Constraint(json_object=True)
    if found.kind == "choice":
        return common_pb2.Constraint(choice=common_pb2.Choice(options=found.options))
    return common_pb2.Constraint(**{found.kind: found.value})


def sampling_params(
    request: _Sampling,
    new_tokens: int | None,
    defaults: SamplingDefaults,
    logprobs: bool,
    top_logprobs: int | None,
    wanted: Constraint | None = None,
) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(
        max_new_tokens=new_tokens or defaults.max_tokens,
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        top_k=defaults.top_k if request.top_k is None else request.top_k,
        stop=request.stops(),
        logprobs=logprobs,
    )
    if request.seed is not None:
        params.seed = request.seed
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None:
            setattr(params, name, value)
    if top_logprobs is not None:
        params.top_logprobs = top_logprobs
    for token, bias in request.bias().items():
        params.logit_bias[token] = bias
    proto = constraint(wanted)
    if proto is not None:
        params.constraint.CopyFrom(proto)
    return params


def seeded(message: Any, index: int) -> Any:
    """Choice ``index`` of an n-choice request: a copy whose seed (when the request set one) is seed + index, so
    each choice differs and a seeded request is reproducible choice by choice; without a seed each choice samples
    on its own."""
    if index == 0:
        return message
    copy = type(message)()
    copy.CopyFrom(message)
    if copy.params.HasField("seed"):
        copy.params.seed = (copy.params.seed + index) % 2**64
    if copy.request_id:
        copy.request_id = f"{copy.request_id}-{index}"
    return copy


def history_message(message: ChatMessage, legacy_calls: list[str]) -> chat_pb2.ChatMessage:
    """One earlier message; ``legacy_calls`` collects the ids given to legacy function_calls so that the
    function message after one answers it."""
    entry = chat_pb2.ChatMessage(role=_ROLES[message.role], content=message.text())
    for source in message.sources or ():
        entry.sources.add(id=source.id, title=source.title, text=source.text, source=source.url)
    for call in message.tool_calls or ():
        entry.tool_calls.add(id=call.id, name=call.function.name, arguments=call.function.arguments)
    if message.function_call is not None:
        legacy_calls.append(LEGACY_CALL_ID.format(len(legacy_calls)))
        entry.tool_calls.add(
            id=legacy_calls[-1], name=message.function_call.name, arguments=message.function_call.arguments
        )
    if message.role == "tool":
        entry.tool_call_id = message.tool_call_id or ""
    if message.role == "function":
        entry.tool_call_id = legacy_calls[-1] if legacy_calls else ""
    if message.role in ("tool", "function") and message.name:
        entry.name = message.name
    return entry


def tools(request: ChatCompletionRequest, chat: chat_pb2.ChatRequest) -> None:
    """``tools``/``tool_choice``/``parallel_tool_calls``, or the legacy ``functions``/``function_call`` (one call
    at a time), onto the Chat request."""
    for definition in request.definitions():
        chat.tools.add(
            name=definition.name,
            description=definition.description or "",
            parameters=json.dumps(definition.parameters) if definition.parameters is not None else "",
            strict=bool(definition.strict),
        )
    choice = request.function_call if request.legacy() else request.tool_choice
    if isinstance(choice, NamedToolChoice):
        chat.tool_choice.function = choice.function.name
    elif isinstance(choice, NamedFunction):
        chat.tool_choice.function = choice.name
    elif choice is not None:
        chat.tool_choice.mode = _TOOL_MODES[choice]
    if request.legacy():
        chat.parallel_tool_calls = False
    elif request.parallel_tool_calls is not None:
        chat.parallel_tool_calls = request.parallel_tool_calls


def chat_request(
    request: ChatCompletionRequest, request_id: str, defaults: SamplingDefaults, retrieval_default: bool
) -> chat_pb2.ChatRequest:
    """The last message is the new user turn; everything before it is history, oldest first. When the last
    message is a tool result (the turn goes on after calls), every message is history and ``message`` is empty."""
    *earlier, last = request.messages
    if last.role != "user":
        earlier, message = request.messages, ""
    else:
        message = last.text()
    legacy_calls: list[str] = []
    history = [history_message(entry, legacy_calls) for entry in earlier]
    retrieval = retrieval_default if request.retrieval is None else request.retrieval
    chat = chat_pb2.ChatRequest(
        request_id=request_id,
        history=history,
        message=message,
        retrieval=retrieval,
        params=sampling_params(
            request,
            request.new_tokens(),
            defaults.for_chat(retrieval),
            bool(request.logprobs),
            request.top_logprobs if request.logprobs else None,
            request.constraint(),
        ),
    )
    if request.retrieval_k is not None:
        chat.retrieval_k = request.retrieval_k
    tools(request, chat)
    return chat


def generate_request(
    request: CompletionRequest, request_id: str, defaults: SamplingDefaults
) -> generation_pb2.GenerateRequest:
    wants_logprobs = request.logprobs is not None
    params = sampling_params(
        request,
        request.max_tokens,
        defaults,
        wants_logprobs,
        request.logprobs if wants_logprobs else None,
        request.constraint(),
    )
    text = request.prompt_text()
    if text is not None:
        # a raw prompt gets the tokenizer's special tokens (BOS), as vLLM and llama.cpp's server add them
        return generation_pb2.GenerateRequest(request_id=request_id, text=text, params=params, add_special_tokens=True)
    ids = generation_pb2.TokenIds(ids=request.prompt_ids())
    return generation_pb2.GenerateRequest(request_id=request_id, token_ids=ids, params=params)


def sources(start: chat_pb2.ChatStart, cited: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """The passages the model was given, numbered as the prompt and the ``[n]`` markers number them; with
    ``cited`` (the ChatEnd's, so only once the answer is whole) each also says whether the answer cites it."""
    found = [source(index, passage) for index, passage in enumerate(start.sources, 1)]
    if cited is not None:
        for entry in found:
            entry["cited"] = entry["index"] in cited
    return found


def source(index: int, passage: retrieval_pb2.Passage) -> dict[str, Any]:
    text = passage.text
    snippet = text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 1].rstrip() + "…"
    return {
        "index": index,
        "id": passage.id,
        "title": passage.title,
        "url": passage.source,
        "page": passage.page,  # from 1 for a page of a PDF; 0 for a source without pages
        "score": round(passage.score, 4),
        "snippet": snippet,
        "text": text,
    }


def index_build(start: chat_pb2.ChatStart) -> dict[str, Any] | None:
    """The index build's progress while the retrieval index is still being filled, else None."""
    if not start.HasField("index_build"):
        return None
    build = from_message(IndexBuild, start.index_build)
    return {**asdict(build), "notice": build.notice}


def start_extras(start: chat_pb2.ChatStart, found: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``nightcap`` fields known when the answer starts (the first stream chunk)."""
    return {
        "sources": found,
        "retrieval_query": start.retrieval_query,
        "history_messages_dropped": start.history_messages_dropped,
        "index_build": index_build(start),
    }


def end_extras(end: chat_pb2.ChatEnd) -> dict[str, Any]:
    """The ``nightcap`` fields known when it ends (the chunk with the finish_reason): ``cited`` is the
    orchestrator's list of the source numbers the answer's ``[n]`` markers name, in the order first cited."""
    return {"context_used": end.context_used, "notice": end.notice, "cited": list(end.cited)}


def sources_markdown(found: list[dict[str, Any]], cited: Sequence[int] = ()) -> str:
    """``--citations markdown``: the sources as a short list after the answer, for clients that drop extra fields;
    those the answer cites are marked."""
    if not found:
        return ""
    lines = [
        f"[{s['index']}] {s['title'] or s['id']}"
        + (f" ({s['url']}" + (f", p. {s['page']}" if s["page"] else "") + ")" if s["url"] else "")
        + (" (cited)" if s["index"] in cited else "")
        for s in found
    ]
    return "\n\nSources:\n" + "\n".join(lines)


def _token(raw: bytes) -> dict[str, Any]:
    return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}


def chat_logprobs(logprobs: list[generation_pb2.TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's ``logprobs.content`` entries: each chosen token and its alternatives."""
    return [
        {
            **_token(entry.token),
            "logprob": entry.logprob,
            "top_logprobs": [{**_token(top.token), "logprob": top.logprob} for top in entry.top],
        }
        for entry in logprobs
    ]


def completion_logprobs(logprobs: list[generation_pb2.TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists of tokens, their logprobs, alternatives and text offsets."""
    tokens, offsets = [], []
    for entry in logprobs:
        tokens.append(entry.token.decode("utf-8", errors="replace"))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [entry.logprob for entry in logprobs],
        "top_logprobs": [
            {top.token.decode("utf-8", errors="replace"): top.logprob for top in entry.top} for entry in logprobs
        ],
        "text_offset": offsets,
    }


# --- backend errors ------------------------------------------------------------------------------------------------

_CONSTRAINT_FIELD = re.compile(r"\b(?:params\.)?constraint(?:\.(json_schema|json_object|regex|lark|gbnf|choice))?\b")
_TOOL_FIELD = re.compile(r"\btools\[(\d+)\](?:\.(name|description|parameters|strict))?")
_HISTORY_FIELD = re.compile(r"\bhistory\[(\d+)\]((?:\.tool_calls\[\d+\])?(?:\.\w+)?)")
_CHOICE_FIELD = re.compile(r"\btool_choice\b")
_BIAS_FIELD = re.compile(r"\b(?:params\.)?logit_bias\b")


def backend_param(message: str, request: _Sampling) -> str | None:
    """The OpenAI field a backend's INVALID_ARGUMENT names: the engine and the orchestrator name their proto fields
    (``tools[1].name``, ``constraint.json_schema``, ``history[2].tool_call_id``); the client sent others."""
    chat = isinstance(request, ChatCompletionRequest)
    legacy = chat and request.legacy()  # type: ignore[union-attr]
    if found := _TOOL_FIELD.search(message):
        index, field = found.group(1), found.group(2)
        where = f"functions[{index}]" if legacy else f"tools[{index}].function" if field else f"tools[{index}]"
        return f"{where}.{field}" if field else where
    if _CHOICE_FIELD.search(message):
        return "function_call" if legacy else "tool_choice"
    if _CONSTRAINT_FIELD.search(message):
        wanted = request.constraint()  # type: ignore[attr-defined]
        if wanted is not None:
            return wanted.param
        if chat and request.definitions():  # type: ignore[union-attr]
            return "functions" if legacy else "tools"  # the grammar the orchestrator made of the tools
        return None
    if _BIAS_FIELD.search(message):
        return "logit_bias"
    if chat and (found := _HISTORY_FIELD.search(message)):
        rest = found.group(2) or ""
        if rest.startswith(".tool_calls[") and rest.count(".") > 1:
            head, field = rest.rsplit(".", 1)
            rest = f"{head}.function.{field}" if field in ("name", "arguments") else rest
        return f"messages[{found.group(1)}]{rest}"
    return None
