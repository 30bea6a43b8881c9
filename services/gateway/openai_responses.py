"""The OpenAI wire types clients get back: plain dicts, built by one function per object (``openai_types`` holds
what they send). Nothing here knows gRPC; ``translate.py`` maps both ways."""

from __future__ import annotations

import time
from typing import Any


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def chat_chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    index: int = 0,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def tool_call_delta(index: int, call_id: str, name: str, arguments: str, legacy: bool) -> dict[str, Any]:
    """A chunk's delta for a piece of a tool call: the first piece (``call_id`` set) carries id, type and name,
    later ones only more of the arguments, as the SDK and LangChain accumulate them by ``index``."""
    if legacy:
        function: dict[str, Any] = {"name": name, "arguments": arguments} if call_id else {"arguments": arguments}
        return {"function_call": function}
    if call_id:
        entry = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    else:
        entry = {"index": index, "function": {"arguments": arguments}}
    return {"tool_calls": [entry]}


def assistant_message(content: str | None, calls: list[tuple[str, str, str]], legacy: bool) -> dict[str, Any]:
    """A response's message: the text, or null beside tool calls ``(id, name, arguments)``."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls and legacy:
        _, name, arguments = calls[0]
        message["function_call"] = {"name": name, "arguments": arguments}
    elif calls:
        message["tool_calls"] = [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            for call_id, name, arguments in calls
        ]
    return message


def chat_choice(
    index: int, message: dict[str, Any], finish_reason: str, logprobs: list[dict[str, Any]] | None
) -> dict[str, Any]:
    return {
        "index": index,
        "message": message,
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
        "finish_reason": finish_reason,
    }


def usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, drafted: int = 0, accepted: int = 0
) -> dict[str, Any]:
    """``cached_tokens``: prompt tokens the generation service's prefix cache supplied (OpenAI's field).
    ``drafted``/``accepted``: completion tokens speculative decoding guessed from the prompt, and those kept; they
    go where OpenAI reports its predicted outputs (accepted_prediction_tokens, rejected_prediction_tokens)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {
            "accepted_prediction_tokens": accepted,
            "rejected_prediction_tokens": drafted - accepted,
        },
    }


def usage_chunk(chunk: dict[str, Any], usage_: dict[str, Any]) -> dict[str, Any]:
    """The stream's last chunk with ``include_usage``: no choices, only the usage (not glued to content)."""
    return {**chunk, "choices": [], "usage": usage_}


def chat_completion(
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    usage_body: dict[str, Any],
    nightcap: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage_body,
        "nightcap": nightcap,
    }


def completion_choice(
    index: int, text: str, finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def text_completion(completion_id: str, created: int, model: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
    """A text completion or one of its stream's chunks (the same object, as OpenAI sends it)."""
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
    }


def completion_chunk(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    index: int = 0,
) -> dict[str, Any]:
    return text_completion(completion_id, created, model, [completion_choice(index, text, finish_reason, logprobs)])


def model_card(model_id: str, created: float, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(created or time.time()),
        "owned_by": "nightcap",
        "nightcap": {"kind": kind, **extra},
    }
