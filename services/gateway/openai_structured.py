"""The structured-output and tool fields of OpenAI requests (``response_format``, ``tools``, ``tool_choice``, the
completions' ``structured_outputs`` and ``guided_*``), checked as far as the wire allows: a JSON Schema against its
meta-schema, grammars and regexes compiled by llguidance, tool names."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from services.gateway.openai_base import Text, Unsupported, _Request

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
