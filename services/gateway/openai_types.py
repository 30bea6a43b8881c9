"""The OpenAI request types: what clients send, as pydantic models checked field by field (what they get back is
``openai_responses``; the structured-output and tool fields are ``openai_structured``). Nothing here knows gRPC;
``translate.py`` maps both ways.

Fields follow the OpenAI API reference. Three kinds of request field:
- supported: used as OpenAI documents them (and nightcap's own ``top_k``, ``repetition_penalty``,
  ``retrieval``, ``retrieval_k``, sent by SDK users through ``extra_body``);
- harmless: accepted and ignored because they do not change the answer (``user``, ``store``, ``metadata``,
  ``service_tier``);
- refused: every field not listed (and ``n`` beyond the gateway's ``--max-n``): a 400 that names the field,
  never silence.

Structured output (``response_format``, the completions' ``structured_outputs`` and ``guided_*``), ``tools`` and
``logit_bias`` are checked here as far as the wire allows (JSON Schema against its meta-schema, grammars and regexes
compiled by llguidance, tool names); the engine and the orchestrator check the rest and their errors are mapped
back to these field names (``translate.backend_param``).
"""

from __future__ import annotations

import base64
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from nightcap.records import MAX_K
from services.gateway.openai_base import Text, Unsupported, _Request
from services.gateway.openai_structured import (
    TOOL_NAME,
    Constraint,
    FunctionDefinition,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    check_schema,
)


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


class FunctionCall(_Request):
    name: Text
    arguments: Text = ""
    parsed_arguments: Any = None  # what the SDK's parse and stream helpers add; ignored


class ToolCall(_Request):
    """An assistant message's call, as a response gave it (``index`` is there when a stream was assembled)."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None  # a tool or function message: the function that answered; otherwise ignored
    sources: list[TurnSource] | None = None  # nightcap: the passages this (user) turn was answered from
    tool_calls: list[ToolCall] | None = None  # an assistant message's calls (its content may be null)
    tool_call_id: Text | None = None  # a tool message: the call it answers
    function_call: FunctionCall | None = None  # legacy: an assistant message's one call
    # what a response's message carries back when a client returns it as it came: harmless when empty
    refusal: Text | None = None
    annotations: list[Any] | None = None
    audio: Any = None
    parsed: Any = None  # the SDK's parse and stream helpers add it; ignored

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: no obfuscation padding is sent


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

    def check(self, max_n: int = 1) -> None:
        """Raises Unsupported for a field we parsed but cannot honour (a 400 naming it)."""
        if self.n is not None and self.n > max_n:
            raise Unsupported("n", f"n is at most {max_n} on this server (--max-n), got {self.n}")
        self.bias()
        if self.stream_options is not None and not self.stream:
            raise Unsupported("stream_options", "stream_options is only allowed with stream: true")
        self.stops()

    def bias(self) -> dict[int, float]:
        """``logit_bias`` as token id -> bias clamped to [-100, 100]; a key that is not a token id is a 400."""
        found: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.strip().isdigit() or int(key) >= 2**32:
                raise Unsupported("logit_bias", f"logit_bias keys are token ids (integers >= 0), got {key!r}")
            if value != value:  # NaN
                raise Unsupported("logit_bias", f"the bias of token {key} is not a number")
            found[int(key)] = max(-100.0, min(100.0, value))
        return found

    def choices(self) -> int:
        return self.n or 1

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
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None  # legacy tools: answered as message.function_call
    function_call: Literal["none", "auto"] | NamedFunction | None = None
    response_format: ResponseFormat | None = None
    # refused, but parsed so that the error names them rather than calling them unknown
    modalities: list[str] | None = None
    audio: Any = None
    prediction: Any = None
    reasoning_effort: str | None = None
    web_search_options: Any = None

    def check(self, max_n: int = 1) -> None:
        super().check(max_n)
        for name in ("audio", "prediction", "web_search_options"):
            if getattr(self, name) is not None:
                raise Unsupported(name, f"{name} is not supported by this server")
        if self.modalities is not None and self.modalities != ["text"]:
            raise Unsupported("modalities", "only the 'text' modality is supported")
        if self.reasoning_effort is not None:
            raise Unsupported("reasoning_effort", "reasoning_effort is not supported: the model does not reason")
        if self.top_logprobs is not None and not self.logprobs:
            raise Unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        self._check_tools()
        self._check_response_format()
        self._check_messages()

    def constraint(self) -> Constraint | None:
        """response_format as the answer's constraint (checked by ``check``); None for text."""
        form = self.response_format
        if form is None or form.type == "text":
            return None
        if form.type == "json_schema" and form.json_schema is not None and form.json_schema.json_schema is not None:
            return Constraint.of("response_format.json_schema.schema", "json_schema", form.json_schema.json_schema)
        return Constraint("response_format", "json_object", "")

    def legacy(self) -> bool:
        """The request used ``functions``/``function_call``: its calls come back in that shape."""
        return self.functions is not None or self.function_call is not None

    def definitions(self) -> list[FunctionDefinition]:
        if self.functions is not None:
            return self.functions
        return [tool.function for tool in self.tools or ()]

    def _check_tools(self) -> None:
        if self.tools is not None and self.functions is not None:
            raise Unsupported("functions", "send tools or the legacy functions, not both")
        if self.tool_choice is not None and self.function_call is not None:
            raise Unsupported("function_call", "send tool_choice or the legacy function_call, not both")
        legacy = self.legacy()
        field, choice_field = ("functions", "function_call") if legacy else ("tools", "tool_choice")
        seen: set[str] = set()
        for index, definition in enumerate(self.definitions()):
            where = f"functions[{index}]" if legacy else f"tools[{index}].function"
            if not TOOL_NAME.fullmatch(definition.name):
                raise Unsupported(
                    f"{where}.name", f"a function name is 1 to 64 of a-z, A-Z, 0-9, _ and -, got {definition.name!r}"
                )
            if definition.name in seen:
                raise Unsupported(f"{where}.name", f"two {field} are named {definition.name!r}")
            seen.add(definition.name)
            if definition.parameters is not None:
                check_schema(definition.parameters, f"{where}.parameters")
        choice = self.function_call if legacy else self.tool_choice
        named = choice.name if isinstance(choice, NamedFunction) else None
        if isinstance(choice, NamedToolChoice):
            named = choice.function.name
        if named is not None and named not in seen:
            raise Unsupported(choice_field, f"{choice_field} names {named!r}, which is not among the {field}")
        if choice == "required" and not seen:
            raise Unsupported(choice_field, f"{choice_field} 'required' needs {field}")

    def _check_response_format(self) -> None:
        form = self.response_format
        if form is None or form.type == "text":
            return
        if self.definitions() and (self.tool_choice or self.function_call or "auto") != "none":
            raise Unsupported("response_format", "response_format cannot be combined with tools on this server")
        if form.type == "json_schema":
            if form.json_schema is None:
                raise Unsupported("response_format.json_schema", "type json_schema needs json_schema: {name, schema}")
            if form.json_schema.json_schema is not None:
                check_schema(form.json_schema.json_schema, "response_format.json_schema.schema")

    def _check_messages(self) -> None:
        calls: set[str] = set()
        last_legacy_call = False
        for index, message in enumerate(self.messages):
            where = f"messages[{index}]"
            if message.sources and message.role != "user":
                raise Unsupported(f"{where}.sources", "sources go with the user turn they answered")
            if (message.tool_calls or message.function_call) and message.role != "assistant":
                raise Unsupported(f"{where}.tool_calls", "only an assistant message carries tool calls")
            if message.tool_calls and message.function_call:
                raise Unsupported(f"{where}.function_call", "send tool_calls or the legacy function_call, not both")
            for call in message.tool_calls or ():
                calls.add(call.id)
            if message.function_call is not None:
                last_legacy_call = True
            if message.role == "tool":
                if not message.tool_call_id:
                    raise Unsupported(f"{where}.tool_call_id", "a tool message names the call it answers")
                if message.tool_call_id not in calls:
                    raise Unsupported(
                        f"{where}.tool_call_id",
                        f"no earlier assistant message made the call {message.tool_call_id!r}",
                    )
            if message.role == "function" and not last_legacy_call:
                raise Unsupported(f"{where}.role", "a function message answers an assistant's function_call")
        last = len(self.messages) - 1
        if self.messages[-1].role not in ("user", "tool", "function"):
            raise Unsupported(
                f"messages[{last}].role",
                "the last message must be the user's or a tool result: this server answers a user turn "
                "(no assistant prefill)",
            )
        if self.messages[-1].role == "user" and not self.messages[-1].text().strip():
            raise Unsupported(f"messages[{last}].content", "the last user message is empty")

    def new_tokens(self) -> int | None:
        # LangChain sends max_completion_tokens, older clients max_tokens; the newer name wins when both are set.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool | None = None
    suffix: Text | None = None
    best_of: int | None = Field(default=None, ge=1)
    # the constraint fields vLLM's server takes, and its older guided_* ones
    structured_outputs: StructuredOutputs | None = None
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    guided_decoding_backend: Text | None = None  # ignored: llguidance is the one backend

    def check(self, max_n: int = 1) -> None:
        super().check(max_n)
        self.constraint()
        if self.echo:
            raise Unsupported("echo", "echo is not supported")
        if self.suffix:
            raise Unsupported("suffix", "suffix (insertion) is not supported")
        if self.best_of is not None and self.best_of > 1:
            raise Unsupported("best_of", "best_of > 1 is not supported")
        if self.best_of is not None and self.best_of < self.choices():
            # OpenAI and vLLM: best_of candidates are drawn and the n best returned, so never fewer than n
            raise Unsupported("best_of", f"best_of must be at least n ({self.choices()}), got {self.best_of}")
        if isinstance(self.prompt, list) and len(self.prompt) > 1 and isinstance(self.prompt[0], str):
            raise Unsupported("prompt", "one prompt per request: send a string (or a list of one)")
        if not self.prompt or (isinstance(self.prompt, list) and self.prompt == [""]):
            raise Unsupported("prompt", "the prompt is empty")

    def constraint(self) -> Constraint | None:
        """The one constraint the request sets, checked; two of them is a 400 naming the second."""
        found: list[Constraint] = []
        outputs = self.structured_outputs
        if outputs is not None:
            for name, kind, value in (
                ("json", "json_schema", outputs.json_),
                ("regex", "regex", outputs.regex),
                ("choice", "choice", outputs.choice),
                ("grammar", "grammar", outputs.grammar),
                ("json_object", "json_object", outputs.json_object or None),
            ):
                if value is not None:
                    found.append(Constraint.of(f"structured_outputs.{name}", kind, value))
        form = self.response_format
        if form is not None and form.type == "json_object":
            found.append(Constraint("response_format", "json_object", ""))
        elif form is not None and form.type == "json_schema":
            if form.json_schema is None:
                raise Unsupported("response_format.json_schema", "type json_schema needs json_schema: {name, schema}")
            schema = form.json_schema.json_schema
            found.append(
                Constraint.of("response_format.json_schema.schema", "json_schema", schema)
                if schema is not None
                else Constraint("response_format", "json_object", "")
            )
        for name, kind in (
            ("guided_json", "json_schema"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, name)
            if value is not None:
                found.append(Constraint.of(name, kind, value))
        if len(found) > 1:
            raise Unsupported(found[1].param, f"one constraint per request: {found[0].param} is already set")
        return found[0] if found else None

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


class RerankDocument(_Request):
    text: Text


class RerankRequest(_Request):
    """POST /v1/rerank as llama.cpp's server and vLLM take it (Cohere's and Jina's shape)."""

    query: Text = Field(min_length=1)
    documents: list[Text | RerankDocument] = Field(min_length=1)
    model: Text | None = None
    top_n: int | None = Field(default=None, ge=1)
    return_documents: bool = False
    user: Text | None = None

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class UploadedFile(_Request):
    """A file by its name (the suffix says its type) and content: text as it is, or with ``encoding: "base64"``
    any file's bytes (what a PDF or Word file needs, and what the web page sends)."""

    name: Text = Field(min_length=1)
    content: Text
    encoding: Literal["text", "base64"] = "text"

    def data(self) -> bytes:
        """The file's bytes; a ValueError when base64 content is not base64."""
        if self.encoding == "text":
            return self.content.encode("utf-8")
        return base64.b64decode(self.content, validate=True)


class NewDocument(_Request):
    id: Text = Field(min_length=1)
    text: Text
    title: Text = ""
    source: Text = ""


class DocumentsRequest(_Request):
    """POST /v1/documents: files (parsed as ``chatctl index add`` reads them) and/or documents as they are."""

    files: list[UploadedFile] = Field(default_factory=list)
    documents: list[NewDocument] = Field(default_factory=list)

    def check(self) -> None:
        if not self.files and not self.documents:
            raise Unsupported(
                "files", "send files ([{name, content, encoding}]) or documents ([{id, text, title, source}])"
            )
