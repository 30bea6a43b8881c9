"""Function calling: the tools a request offers, how they and earlier calls are shown to the model, the grammar
that makes the model's calls well formed, and the parser that turns the streamed answer back into calls.

The model writes a call as ``<tool_call>`` + ``{"name": ..., "arguments": {...}}`` + ``</tool_call>`` (the
Hermes / Qwen 2.5 format), several in a row (one a line) when parallel calls are allowed. A chat template
that reads a ``tools`` variable gets the tools in OpenAI's shape and lays them out itself; any other template
(SmolLM2's ignores ``tools``) gets them described in the system message, in that same Hermes wording.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import llguidance

from services.common.errors import InvalidArgument

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
ANY_OBJECT: dict[str, Any] = {"type": "object"}

TOOLS_INSTRUCTION = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class Choice(str, enum.Enum):
    AUTO = "auto"  # text or calls, as the model likes
    NONE = "none"  # text; the tools are shown all the same
    REQUIRED = "required"  # one or more calls
    FUNCTION = "function"  # exactly one call of the named tool


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: dict(ANY_OBJECT))

    def openai_shape(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name}
        if self.description:
            function["description"] = self.description
        function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text


@dataclass(frozen=True)
class ToolUse:
    """The tools of one request and how they may be used."""

    tools: tuple[Tool, ...]
    choice: Choice = Choice.AUTO
    function: str = ""  # the tool a Choice.FUNCTION call must use
    parallel: bool = True

    @property
    def calls_allowed(self) -> bool:
        return self.choice is not Choice.NONE

    @property
    def forces_call(self) -> bool:
        return self.choice in (Choice.REQUIRED, Choice.FUNCTION)

    def openai_tools(self) -> list[dict[str, Any]]:
        return [tool.openai_shape() for tool in self.tools]

    def instruction(self) -> str:
        """The tools described for a template that does not lay them out itself."""
        return TOOLS_INSTRUCTION.format(tools="\n".join(json.dumps(t) for t in self.openai_tools()))

    def grammar(self) -> str:
        """The Lark grammar (llguidance's dialect) the answer must belong to; "" for Choice.NONE."""
        if self.choice is Choice.NONE:
            return ""
        offered = [t for t in self.tools if self.choice is not Choice.FUNCTION or t.name == self.function]
        call_schema = {"anyOf": [_call_schema(tool, f"#/anyOf/{i}") for i, tool in enumerate(offered)]}
        call = f'call: "{_lark_escape(CALL_OPEN)}\\n" %json{json.dumps(call_schema)} "\\n{_lark_escape(CALL_CLOSE)}"'
        calls = 'call ("\\n" call)*' if self.parallel and self.choice is not Choice.FUNCTION else "call"
        if self.choice is Choice.AUTO:
            # TEXT never holds the call marker: a call written after some text would escape the schema.
            text = f"TEXT: /(?s:.*)/ & ~/(?s:.*{re.escape(CALL_OPEN)}.*)/"
            return f"start: TEXT | calls\ncalls: {calls}\n{text}\n{call}\n"
        return f"start: {calls}\n{call}\n"


def _call_schema(tool: Tool, pointer: str) -> dict[str, Any]:
    """The schema of a call of ``tool``, placed at ``pointer`` in the grammar's schema."""
    arguments = _rebased(tool.parameters, f"{pointer}/properties/arguments")
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": arguments},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _rebased(schema: Any, root: str) -> Any:
    """``schema`` with its local references ("#/$defs/Item", "#") pointing where it now sits: inside the call
    schema, its own root is no longer the document's."""
    if isinstance(schema, dict):
        return {
            key: root + value[1:]
            if key == "$ref" and isinstance(value, str) and value.startswith("#")
            else _rebased(value, root)
            for key, value in schema.items()
        }
    if isinstance(schema, list):
        return [_rebased(item, root) for item in schema]
    return schema


def _lark_escape(text: str) -> str:
    return json.dumps(text)[1:-1]


class ToolSpec(Protocol):
    name: str
    description: str
    parameters: str


def tool_use_from(
    specs: Sequence[ToolSpec], mode: str, function: str, parallel: bool, constrained: bool
) -> ToolUse | None:
    """The request's tools, checked; None when it offers none. ``mode``: auto, none or required; ``function``:
    a named tool, which overrides the mode; ``constrained``: the request also set params.constraint."""
    if not specs:
        if function or mode == Choice.REQUIRED:
            raise InvalidArgument(f"tool_choice asks for {function or mode!r} but the request offers no tools")
        return None
    if constrained:
        raise InvalidArgument(
            "params.constraint cannot be set together with tools: tool calls are constrained by their schemas"
        )
    tools, seen = [], set()
    for index, spec in enumerate(specs):
        if not spec.name:
            raise InvalidArgument(f"tools[{index}].name is empty: every tool needs a name")
        if not TOOL_NAME.fullmatch(spec.name):
            raise InvalidArgument(f"tools[{index}].name {spec.name!r} must be 1 to 64 of a-z, A-Z, 0-9, _ and -")
        if spec.name in seen:
            raise InvalidArgument(f"tools[{index}].name {spec.name!r} is given twice: tool names must be unique")
        seen.add(spec.name)
        tools.append(Tool(spec.name, spec.description, _parameters(spec.parameters, f"tools[{index}].parameters")))
    if function and function not in seen:
        raise InvalidArgument(f"tool_choice.function {function!r} is not among the tools: {', '.join(sorted(seen))}")
    choice = Choice.FUNCTION if function else Choice(mode)
    return ToolUse(tuple(tools), choice, function, parallel)


def _parameters(text: str, where: str) -> dict[str, Any]:
    if not text.strip():
        return dict(ANY_OBJECT)
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{where} is not valid JSON: {error}") from None
    if not isinstance(schema, dict):
        raise InvalidArgument(f"{where} must be a JSON Schema object, got {type(schema).__name__}")
    return schema


def check_grammar(tool_use: ToolUse) -> None:
    """InvalidArgument naming the tool and the feature when llguidance cannot compile a tool's schema."""
    if not tool_use.calls_allowed or not _grammar_error(tool_use.grammar()):
        return
    for index, tool in enumerate(tool_use.tools):
        if error := _grammar_error(ToolUse((tool,), Choice.REQUIRED).grammar()):
            raise InvalidArgument(f"tools[{index}].parameters cannot be enforced: {error}")
    raise InvalidArgument(f"the tools cannot be enforced together: {_grammar_error(tool_use.grammar())}")


def _grammar_error(grammar: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar))
    return re.sub(r"^at \d+\(\d+\): ", "", error.splitlines()[0]) if error else ""


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def call_text(call: ToolCall) -> str:
    """A call as the model writes it (and as it is shown back to the model in the history)."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(call.name)}, "arguments": {call.arguments}}}\n{CALL_CLOSE}'


def response_text(content: str) -> str:
    """A tool's result, for a template that has no tool role."""
    return f"{RESPONSE_OPEN}\n{content}\n{RESPONSE_CLOSE}"


def parsed_arguments(text: str, where: str) -> Any:
    """A history call's arguments as JSON (a template that renders calls itself expects an object)."""
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{where} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


# -- the answer, read back as calls --------------------------------------------------------------------


@dataclass(frozen=True)
class TextPiece:
    text: str


@dataclass(frozen=True)
class CallPiece:
    index: int
    id: str = ""  # the first piece of a call only, with the name
    name: str = ""
    arguments: str = ""


# How a call's JSON opens, up to the first character of its arguments (the grammar puts name first).
CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([a-zA-Z0-9_-]*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
MAX_CALL_HEAD = 1024  # more text than this after <tool_call> without a readable head: it was not a call


class _State(enum.Enum):
    TEXT = enum.auto()
    HEAD = enum.auto()  # after <tool_call>, before the arguments
    ARGUMENTS = enum.auto()
    CLOSING = enum.auto()  # after the arguments, before </tool_call>


class ToolCallParser:
    """Splits a streamed answer into text and calls, whatever the chunking: ``feed`` each piece of text as it
    comes and send what it returns; ``finish`` once at the end.

    Text is held back while it may be the start of ``<tool_call>``, and whitespace around calls is dropped. A
    call is announced (id and name) once its name is read, and its arguments are passed on as they come."""

    def __init__(self) -> None:
        self.calls: list[ToolCall] = []  # the complete calls, in order
        self._state = _State.TEXT
        self._buffer = ""
        self._call_id, self._name, self._arguments = "", "", ""
        self._depth, self._in_string, self._escaped = 0, False, False

    @property
    def inside_call(self) -> bool:
        """A call was begun and not finished (the answer was cut)."""
        return self._state is not _State.TEXT

    def feed(self, text: str) -> list[TextPiece | CallPiece]:
        self._buffer += text
        pieces: list[TextPiece | CallPiece] = []
        while True:
            step = {
                _State.TEXT: self._read_text,
                _State.HEAD: self._read_head,
                _State.ARGUMENTS: self._read_arguments,
                _State.CLOSING: self._read_closing,
            }[self._state]
            before = (self._state, len(self._buffer))
            pieces.extend(step())
            if (self._state, len(self._buffer)) == before:
                return [p for p in pieces if not isinstance(p, TextPiece) or p.text]

    def finish(self) -> list[TextPiece]:
        """The text still held back; a call cut before its name was read is dropped."""
        held, self._buffer = self._buffer, ""
        if self._state is not _State.TEXT or not held or (self.calls and not held.strip()):
            return []
        return [TextPiece(held)]

    def _read_text(self) -> list[TextPiece]:
        start = self._buffer.find(CALL_OPEN)
        if start >= 0:
            before, self._buffer = self._buffer[:start], self._buffer[start + len(CALL_OPEN) :]
            self._state = _State.HEAD
            return [TextPiece(before.rstrip())]
        held = _partial_suffix(self._buffer, CALL_OPEN)
        sure = self._buffer[: len(self._buffer) - held]
        sent = sure.rstrip()
        self._buffer = self._buffer[len(sent) :]
        return [TextPiece(sent)]

    def _read_head(self) -> list[TextPiece | CallPiece]:
        head = CALL_HEAD.match(self._buffer)
        if head is None:
            if CALL_CLOSE in self._buffer or len(self._buffer) > MAX_CALL_HEAD:
                # not a call after all (an unconstrained model): pass the text on as it was written
                end = self._buffer.find(CALL_CLOSE)
                end = end + len(CALL_CLOSE) if end >= 0 else len(self._buffer)
                text, self._buffer = CALL_OPEN + self._buffer[:end], self._buffer[end:]
                self._state = _State.TEXT
                return [TextPiece(text)]
            return []
        self._buffer = self._buffer[head.end() :]
        self._call_id, self._name, self._arguments = new_call_id(), head.group(1), ""
        self._depth, self._in_string, self._escaped = 0, False, False
        self._state = _State.ARGUMENTS
        return [CallPiece(len(self.calls), self._call_id, self._name)]

    def _read_arguments(self) -> list[CallPiece]:
        end = self._end_of_arguments()
        piece = self._buffer[:end] if end >= 0 else self._buffer
        self._buffer = self._buffer[len(piece) :]
        self._arguments += piece
        if end >= 0:
            self._state = _State.CLOSING
        return [CallPiece(len(self.calls), arguments=piece)] if piece else []

    def _end_of_arguments(self) -> int:
        """Where in the buffer the arguments' JSON value ends (-1: not yet), carrying the scan's state over."""
        for position, char in enumerate(self._buffer):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]" or (char == "," and self._depth == 0):
                if self._depth == 0:
                    return position
                self._depth -= 1
                if self._depth == 0:
                    return position + 1
        return -1

    def _read_closing(self) -> list[TextPiece]:
        end = self._buffer.find(CALL_CLOSE)
        if end < 0:
            return []
        self._buffer = self._buffer[end + len(CALL_CLOSE) :]
        self.calls.append(ToolCall(self._call_id, self._name, self._arguments.strip()))
        self._state = _State.TEXT
        return []


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker`` (text that may still become it)."""
    for length in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-length:]):
            return length
    return 0
