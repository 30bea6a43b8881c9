"""OpenAI requests into nightcap messages, nightcap messages into OpenAI fields. Pure functions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from nightcap.records import IndexBuild, from_message
from nightcap.v1 import chat_pb2, common_pb2, generation_pb2, retrieval_pb2
from services.gateway.openai_types import ChatCompletionRequest, CompletionRequest, _Sampling

_ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "developer": chat_pb2.ROLE_SYSTEM,  # OpenAI's newer name for the system turn
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
}
# Only OpenAI's two reasons: an end-of-sequence token and a stop sequence are both "stop".
FINISH_REASONS = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_EOS: "stop",
    common_pb2.FINISH_REASON_STOP_SEQUENCE: "stop",
}
SNIPPET_CHARS = 200


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request that leaves a field unset gets (the OpenChatKit shell's defaults)."""

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 40
    max_tokens: int = 256

    def as_dict(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "max_tokens": self.max_tokens,
        }


def sampling_params(
    request: _Sampling, new_tokens: int | None, defaults: SamplingDefaults, logprobs: bool, top_logprobs: int | None
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
    return params


def chat_request(
    request: ChatCompletionRequest, request_id: str, defaults: SamplingDefaults, retrieval_default: bool
) -> chat_pb2.ChatRequest:
    """The last message is the new user turn; everything before it is history, oldest first."""
    *earlier, last = request.messages
    history = []
    for message in earlier:
        entry = chat_pb2.ChatMessage(role=_ROLES[message.role], content=message.text())
        for source in message.sources or ():
            entry.sources.add(id=source.id, title=source.title, text=source.text, source=source.url)
        history.append(entry)
    chat = chat_pb2.ChatRequest(
        request_id=request_id,
        history=history,
        message=last.text(),
        retrieval=retrieval_default if request.retrieval is None else request.retrieval,
        params=sampling_params(
            request,
            request.new_tokens(),
            defaults,
            bool(request.logprobs),
            request.top_logprobs if request.logprobs else None,
        ),
    )
    if request.retrieval_k is not None:
        chat.retrieval_k = request.retrieval_k
    return chat


def generate_request(
    request: CompletionRequest, request_id: str, defaults: SamplingDefaults
) -> generation_pb2.GenerateRequest:
    wants_logprobs = request.logprobs is not None
    params = sampling_params(
        request, request.max_tokens, defaults, wants_logprobs, request.logprobs if wants_logprobs else None
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
        + (f" ({s['url']})" if s["url"] else "")
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
