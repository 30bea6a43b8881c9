"""The OpenAI wire types: what clients send (pydantic models, checked field by field) and what they get back
(plain dicts, built by one function per object). Nothing here knows gRPC; ``translate.py`` maps both ways.

Fields follow the OpenAI API reference. Three kinds of request field:
- supported: used as OpenAI documents them (and nightcap's own ``top_k``, ``repetition_penalty``,
  ``retrieval``, ``retrieval_k``, sent by SDK users through ``extra_body``);
- harmless: accepted and ignored because they do not change the answer (``user``, ``store``, ``metadata``,
  ``service_tier``);
- refused: ``tools``, ``response_format`` other than text, a non-empty ``logit_bias`` and every field not listed:
  a 400 that names the field, never silence.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from nightcap.records import MAX_K


def _utf8(value: str) -> str:
    # JSON allows lone surrogates ("\ud800"); protobuf strings must be UTF-8, and would fail far from the field.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid UTF-8 (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]


class Unsupported(ValueError):
    """A field we read but cannot honour; ``param`` names it for the error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Request(BaseModel):
    # Unknown fields are refused (a typo must not be silently ignored), except the harmless ones listed.
    model_config = ConfigDict(extra="forbid")


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class TurnSource(BaseModel):
    """nightcap: a passage given with an earlier turn, sent back with that turn so it stays beside it."""

    model_config = ConfigDict(extra="ignore")
    id: Text = ""
    title: Text = ""
    text: Text
    url: Text = ""


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None  # ignored, as most servers do
    sources: list[TurnSource] | None = None  # nightcap: the passages this (user) turn was answered from

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: no obfuscation padding is sent


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str


class _Sampling(_Request):
    """The sampling fields both completion endpoints take."""

    model: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None
    # nightcap's own, through extra_body
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    # harmless OpenAI fields
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None

    def check(self) -> None:
        """Raises Unsupported for a field we parsed but cannot honour (a 400 naming it)."""
        if self.n is not None and self.n > 1:
            raise Unsupported("n", "n > 1 is not supported: ask for one choice (n=1) per request")
        if self.logit_bias:
            raise Unsupported("logit_bias", "logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options is only allowed with stream: true")
        self.stops()

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        if len(stops) > 4:
            raise Unsupported("stop", f"at most 4 stop sequences, as OpenAI allows; got {len(stops)}")
        return [s for s in stops if s]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    retrieval: bool | None = None
    retrieval_k: int | None = Field(default=None, ge=1, le=MAX_K)
    # refused, but parsed so that the error names them rather than calling them unknown
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None

    def check(self) -> None:
        super().check()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise Unsupported(name, f"{name} (function calling) is not supported by this server")
        for name in ("tool_choice", "function_call", "audio", "prediction", "web_search_options"):
            if getattr(self, name) not in (None, "none"):
                raise Unsupported(name, f"{name} is not supported by this server")
        if self.response_format is not None and self.response_format.type != "text":
            raise Unsupported(
                "response_format", f"response_format {self.response_format.type!r} is not supported; only 'text' is"
            )
        if self.modalities is not None and self.modalities != ["text"]:
            raise Unsupported("modalities", "only the 'text' modality is supported")
        if self.reasoning_effort is not None:
            raise Unsupported("reasoning_effort", "reasoning_effort is not supported: the model does not reason")
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        for index, message in enumerate(self.messages):
            if message.sources and message.role != "user":
                raise Unsupported(f"messages[{index}].sources", "sources go with the user turn they answered")
        if self.messages[-1].role != "user":
            raise Unsupported(
                f"messages[{len(self.messages) - 1}].role",
                "the last message must be the user's: this server answers a user turn (no assistant prefill)",
            )
        if not self.messages[-1].text().strip():
            raise Unsupported(f"messages[{len(self.messages) - 1}].content", "the last user message is empty")

    def new_tokens(self) -> int | None:
        # LangChain sends max_completion_tokens, older clients max_tokens; the newer name wins when both are set.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    suffix: Text | None = None
    best_of: int | None = Field(default=None, ge=1)

    def check(self) -> None:
        super().check()
        if self.echo:
            raise Unsupported("echo", "echo is not supported")
        if self.suffix:
            raise Unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of > 1:
            raise Unsupported("best_of", "best_of > 1 is not supported")
        if isinstance(self.prompt, list) and len(self.prompt) > 1 and isinstance(self.prompt[0], str):
            raise Unsupported("prompt", "one prompt per request: send a string (or a list of one)")
        if not self.prompt or (isinstance(self.prompt, list) and self.prompt == [""]):
            raise Unsupported("prompt", "the prompt is empty")

    def prompt_text(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if isinstance(self.prompt[0], str) else None

    def prompt_ids(self) -> list[int]:
        return [int(i) for i in self.prompt]  # type: ignore[arg-type]


class EmbeddingRequest(_Request):
    input: Text | list[Text] | list[int] | list[list[int]]
    model: Text | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: Text | None = None

    def texts(self) -> list[str]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and not isinstance(self.input[0], str):
            raise Unsupported("input", "token arrays are not supported: send the text (a string or a list of them)")
        return list(self.input)  # type: ignore[arg-type]


class UploadedFile(_Request):
    name: Text = Field(min_length=1)
    content: Text


class NewDocument(_Request):
    id: Text = Field(min_length=1)
    text: Text
    title: Text = ""
    source: Text = ""


class DocumentsRequest(_Request):
    """POST /v1/documents: files (parsed as ``chatctl index add`` reads them) and/or documents as they are."""

    files: list[UploadedFile] = []
    documents: list[NewDocument] = []

    def check(self) -> None:
        if not self.files and not self.documents:
            raise Unsupported("files", "send files ([{name, content}]) or documents ([{id, text, title, source}])")


# --- responses ---------------------------------------------------------------------------------------------------


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def chat_chunk(
    completion_id: str, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """``cached_tokens``: prompt tokens the generation service's prefix cache supplied (OpenAI's field)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def usage_chunk(
    chunk: dict[str, Any], prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> dict[str, Any]:
    """The stream's last chunk with ``include_usage``: no choices, only the usage (not glued to content)."""
    return {**chunk, "choices": [], "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


def chat_completion(
    completion_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    usage_body: dict[str, Any],
    logprobs: list[dict[str, Any]] | None,
    nightcap: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_body,
        "nightcap": nightcap,
    }


def completion_chunk(
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def model_card(model_id: str, created: float, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": int(created or time.time()),
        "owned_by": "nightcap",
        "nightcap": {"kind": kind, **extra},
    }
