"""The OpenAI wire types: what clients send (pydantic models, checked field by field) and what they get back
(plain dicts, built by one function per object). Nothing here knows gRPC; ``translate.py`` maps both ways.

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
import json
import re
import time
from dataclasses import dataclass
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


TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


class JsonSchemaFormat(_Request):
    name: Text = Field(pattern=TOOL_NAME.pattern)
    description: Text | None = None
    # ``schema`` shadows a BaseModel attribute, hence the alias; unset: any JSON object
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # accepted: the schema is always enforced


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDefinition(_Request):
    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # unset: an object with any properties
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: Text


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


def check_schema(schema: Any, param: str) -> None:
    """A JSON Schema the validators of its draft accept, that llguidance can compile."""
    import jsonschema

    if not isinstance(schema, dict):
        raise Unsupported(param, "the schema must be a JSON object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        raise Unsupported(param, f"not a valid JSON Schema: {error.message}") from None
    except (TypeError, ValueError, LookupError) as error:  # an unknown $schema, a malformed $ref, ...
        raise Unsupported(param, f"not a valid JSON Schema: {error}") from None
    compiles(param, "json_schema", json.dumps(schema))


def compiles(param: str, kind: str, text: str) -> None:
    """The grammar engine's own check (without a tokenizer): a regex, grammar or schema it cannot compile is a
    400 here, before any engine sees it. Skipped where llguidance is not installed (the engine checks again)."""
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a gateway installed without it
        return
    matcher = llguidance.LLMatcher
    try:
        if kind == "json_schema":
            grammar = matcher.grammar_from_json_schema(text)
        elif kind == "regex":
            grammar = matcher.grammar_from_regex(text)
        else:
            grammar = llguidance.grammar_from(kind, text)
        error = matcher.validate_grammar(grammar)
    except (ValueError, TypeError, RuntimeError) as failure:
        error = str(failure)
    if error:
        raise Unsupported(param, f"the {kind.replace('_', ' ')} does not compile: {error.strip()}")


def grammar_kind(text: str) -> str:
    """GBNF (llama.cpp's ``root ::= ...``) or Lark (llguidance's dialect): GBNF rules are defined with ``::=``."""
    return "gbnf" if "::=" in text else "lark"


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


@dataclass(frozen=True)
class Constraint:
    """A request's constraint, checked: ``kind`` is a field of the proto's Constraint oneof, ``value`` its text
    (a schema as JSON text, a choice's options joined by nothing: see ``options``); ``param`` the wire field."""

    param: str
    kind: str
    value: str
    options: tuple[str, ...] = ()

    @classmethod
    def of(cls, param: str, kind: str, value: Any) -> Constraint:
        if kind == "json_schema":
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError as error:
                    raise Unsupported(param, f"the schema is not valid JSON: {error}") from None
            check_schema(value, param)
            return cls(param, kind, json.dumps(value))
        if kind == "json_object":
            return cls(param, kind, "")
        if kind == "choice":
            if not value or any(not option for option in value):
                raise Unsupported(param, "choice needs at least one option, none of them empty")
            return cls(param, kind, "", tuple(value))
        if kind == "grammar":
            kind = grammar_kind(value)
        if not value:
            raise Unsupported(param, f"the {kind} is empty")
        compiles(param, kind, value)
        return cls(param, kind, value)


class StructuredOutputs(_Request):
    """vLLM's ``structured_outputs`` for raw completions: one of these."""

    json_: dict[str, Any] | Text | None = Field(default=None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None


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
        if self.n is not None and self.n > 1:
            raise Unsupported("n", "n > 1 is not supported by /v1/completions: ask for one choice per request")
        super().check(1)
        self.constraint()
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

    files: list[UploadedFile] = []
    documents: list[NewDocument] = []

    def check(self) -> None:
        if not self.files and not self.documents:
            raise Unsupported(
                "files", "send files ([{name, content, encoding}]) or documents ([{id, text, title, source}])"
            )


# --- responses ---------------------------------------------------------------------------------------------------


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
