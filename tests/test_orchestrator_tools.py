"""Function calling through the orchestrator: how tools and a tool round trip are rendered, the grammar that
forces a call, the parser that reads calls back from the streamed answer, and bad requests."""

from __future__ import annotations

import json
import random

import grpc
import jsonschema
import llguidance
import pytest
from conftest import start_orchestrator
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nightcap.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from services.orchestrator.backends import GenerationBackend
from services.orchestrator.prompts import ChatTemplatePrompt, Turn, with_tools_described
from services.orchestrator.tokenizer import NO_TOKENIZER
from services.orchestrator.tools import (
    CALL_OPEN,
    CallPiece,
    Choice,
    TextPiece,
    Tool,
    ToolCall,
    ToolCallParser,
    ToolUse,
    call_text,
)

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"timezone": {"type": "string"}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS = (
    Tool("get_weather", "The current weather in a city", WEATHER),
    Tool("get_time", "The current time in a time zone", TIME),
)
PROTO_TOOLS = [
    chat_pb2.Tool(name=t.name, description=t.description, parameters=json.dumps(t.parameters)) for t in TOOLS
]
SCHEMAS = {t.name: t.parameters for t in TOOLS}

# A template in Qwen 2.5's manner: it lays out `tools` and writes an assistant's tool_calls itself.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n"
    "{% endif %}{% for message in messages %}"
    "{% if message.role == 'assistant' and message.tool_calls is defined %}<|im_start|>assistant\n"
    "{% for call in message.tool_calls %}<tool_call>\n"
    "{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response>"
    "<|im_end|>\n{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
ROUND_TRIP = [
    Turn("user", "What is the weather in Paris?"),
    Turn("assistant", "", tool_calls=(CALL,)),
    Turn("tool", '{"temperature": 21}', tool_call_id="call_1", name="get_weather"),
]
PLAIN_HISTORY = [Turn("user", "Hello"), Turn("assistant", "Hi! How can I help?"), Turn("user", "Tell me a joke")]


@pytest.fixture(scope="module")
def default_info(default_generation_address: str):
    """The embedded default's ModelInfo, as the orchestrator receives it (template and tokenizer)."""
    return GenerationBackend(default_generation_address).model_info(30, NO_TOKENIZER)


@pytest.fixture(scope="module")
def default_tokenizer(default_info) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(default_info.tokenizer_json.decode())


@pytest.fixture(scope="module")
def default_chat(default_generation_address: str):
    running = start_orchestrator(default_generation_address, None, max_new_tokens=64)
    with grpc.insecure_channel(running.address) as channel:
        yield chat_pb2_grpc.ChatStub(channel)
    running.stop(grace=1)


@pytest.fixture(scope="module")
def tiny_chat(orchestrator_address: str):
    with grpc.insecure_channel(orchestrator_address) as channel:
        yield chat_pb2_grpc.ChatStub(channel)


def smollm2(info, tool_use: ToolUse | None = None) -> ChatTemplatePrompt:
    return ChatTemplatePrompt(info.chat_template, info.bos_token, info.eos_token, tool_use=tool_use)


def chat(stub, message: str = "", history=(), tools=PROTO_TOOLS, max_new_tokens: int = 64, **fields):
    """The turn's responses, collected: (start, text, calls by index as [id, name, arguments], end)."""
    params = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    request = chat_pb2.ChatRequest(message=message, history=history, tools=tools, params=params, **fields)
    start, text, calls, end = None, [], {}, None
    for response in stub.Chat(request, timeout=120):
        event = response.WhichOneof("event")
        if event == "start":
            start = response.start
        elif event == "delta":
            text.append(response.delta)
        elif event == "tool_call":
            piece = response.tool_call
            if piece.index not in calls:
                assert piece.id.startswith("call_") and piece.name, "the first piece names the call"
                calls[piece.index] = [piece.id, piece.name, ""]
            else:
                assert not piece.id and not piece.name, "only the first piece carries id and name"
            calls[piece.index][2] += piece.arguments
        elif event == "end":
            end = response.end
    return start, "".join(text), [calls[i] for i in sorted(calls)], end


# -- rendering ---------------------------------------------------------------------------------------


def test_smollm2_template_ignores_tools(default_info):
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    template = default_info.chat_template
    assert "tools" not in meta.find_undeclared_variables(environment.parse(template))
    messages = [{"role": t.role, "content": t.content} for t in PLAIN_HISTORY]
    without = environment.from_string(template).render(messages=messages, add_generation_prompt=True)
    with_tools = environment.from_string(template).render(
        messages=messages, add_generation_prompt=True, tools=ToolUse(TOOLS).openai_tools()
    )
    assert with_tools == without
    assert not smollm2(default_info, ToolUse(TOOLS)).describes_tools  # so the generic format describes them
    assert smollm2(default_info, ToolUse(TOOLS)).render(PLAIN_HISTORY) == smollm2(default_info).render(PLAIN_HISTORY)


def test_smollm2_renders_a_tool_round_trip(default_info):
    raw = ImmutableSandboxedEnvironment().from_string(default_info.chat_template)
    with pytest.raises(TypeError):  # why the orchestrator writes the calls out: the template adds content
        raw.render(messages=[{"role": "assistant", "content": None, "tool_calls": []}])
    prompt = smollm2(default_info, ToolUse(TOOLS)).render(with_tools_described(ROUND_TRIP, ToolUse(TOOLS)))
    assert prompt.startswith("<|im_start|>system\n# Tools\n")
    assert '{"type": "function", "function": {"name": "get_weather"' in prompt
    assert f"<|im_start|>assistant\n{call_text(CALL)}<|im_end|>" in prompt
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_round_trip_goes_through_the_orchestrator(default_chat):
    history = [
        chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="What is the weather in Paris?"),
        chat_pb2.ChatMessage(
            role=chat_pb2.ROLE_ASSISTANT,
            tool_calls=[chat_pb2.ToolCall(id=CALL.id, name=CALL.name, arguments=CALL.arguments)],
        ),
        chat_pb2.ChatMessage(role=chat_pb2.ROLE_TOOL, content='{"temperature": 21}', tool_call_id=CALL.id),
    ]
    start, text, calls, end = chat(
        default_chat, "", history, tool_choice=chat_pb2.ToolChoice(mode=chat_pb2.ToolChoice.MODE_NONE)
    )
    assert call_text(CALL) in start.prompt and "<tool_response>" in start.prompt
    assert start.prompt.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert text and not calls
    assert end.finish_reason != common_pb2.FINISH_REASON_TOOL_CALLS


def test_a_template_that_reads_tools_gets_them():
    tool_use = ToolUse(TOOLS)
    prompt_format = ChatTemplatePrompt(TOOL_TEMPLATE, tool_use=tool_use)
    assert prompt_format.describes_tools and prompt_format.renders_tool_calls
    prompt = prompt_format.render(ROUND_TRIP)
    assert prompt.startswith("<|im_start|>system\nTools:\n")
    assert json.dumps(tool_use.openai_tools()[0]["function"]["parameters"], sort_keys=True) in prompt
    assert '<tool_call>\n{"arguments": {"city": "Paris"}, "name": "get_weather"}\n</tool_call>' in prompt
    assert "<|im_start|>user\n<tool_response>" in prompt
    assert "# Tools" not in prompt  # not described twice


# -- the grammar ---------------------------------------------------------------------------------------


def accepts(tokenizer: llguidance.LLTokenizer, grammar: str, text: str) -> bool:
    matcher = llguidance.LLMatcher(tokenizer, llguidance.grammar_from("lark", grammar))
    return matcher.consume_tokens(tokenizer.tokenize_str(text)) and matcher.is_accepting()


def written(*calls: tuple[str, dict]) -> str:
    return "\n".join(call_text(ToolCall("", name, json.dumps(arguments))) for name, arguments in calls)


@pytest.mark.parametrize("choice", [Choice.AUTO, Choice.REQUIRED, Choice.FUNCTION])
@pytest.mark.parametrize("parallel", [True, False])
def test_the_grammars_compile(default_tokenizer, choice, parallel):
    grammar = ToolUse(TOOLS, choice, "get_time" if choice is Choice.FUNCTION else "", parallel).grammar()
    assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar), default_tokenizer) == ""


def test_required_accepts_only_calls_valid_against_their_schema(default_tokenizer):
    grammar = ToolUse(TOOLS, Choice.REQUIRED).grammar()
    assert accepts(default_tokenizer, grammar, written(("get_weather", {"city": "Paris"})))
    assert accepts(
        default_tokenizer, grammar, written(("get_weather", {"city": "Bern"}), ("get_time", {"timezone": "UTC"}))
    )
    assert not accepts(default_tokenizer, grammar, written(("get_weather", {"town": "Paris"})))  # not in its schema
    assert not accepts(default_tokenizer, grammar, written(("get_weather", {"city": 3})))
    assert not accepts(default_tokenizer, grammar, written(("get_stock", {"city": "Paris"})))  # not offered
    assert not accepts(default_tokenizer, grammar, "It is sunny in Paris.")
    assert not accepts(default_tokenizer, grammar, written(("get_weather", {"city": "Paris"}))[:-3])  # unfinished
    single = ToolUse(TOOLS, Choice.REQUIRED, parallel=False).grammar()
    assert not accepts(
        default_tokenizer, single, written(("get_weather", {"city": "B"}), ("get_time", {"timezone": "U"}))
    )


def test_a_named_function_accepts_only_its_calls(default_tokenizer):
    grammar = ToolUse(TOOLS, Choice.FUNCTION, "get_time").grammar()
    assert accepts(default_tokenizer, grammar, written(("get_time", {"timezone": "Europe/Paris"})))
    assert not accepts(default_tokenizer, grammar, written(("get_weather", {"city": "Paris"})))
    assert not accepts(
        default_tokenizer, grammar, written(("get_time", {"timezone": "A"}), ("get_time", {"timezone": "B"}))
    )


def test_schemas_with_local_references_are_enforced(default_tokenizer):
    """Pydantic writes nested models as "$ref": "#/$defs/...": the reference must still resolve once the schema
    sits inside the call's."""
    item = {
        "type": "object",
        "properties": {"sku": {"type": "string"}, "parts": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
        "required": ["sku"],
        "additionalProperties": False,
    }
    order = {
        "$defs": {"Item": item},
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
        "required": ["items"],
        "additionalProperties": False,
    }
    count = {"definitions": {"N": {"type": "integer"}}, "properties": {"n": {"$ref": "#/definitions/N"}}}
    grammar = ToolUse((Tool("order", "", order), Tool("count", "", count)), Choice.REQUIRED).grammar()
    assert accepts(default_tokenizer, grammar, written(("order", {"items": [{"sku": "a", "parts": [{"sku": "b"}]}]})))
    assert not accepts(default_tokenizer, grammar, written(("order", {"items": [{"sku": 1}]})))
    assert accepts(default_tokenizer, grammar, written(("count", {"n": 3})))
    assert not accepts(default_tokenizer, grammar, written(("count", {"n": "3"})))


def test_auto_allows_text_or_calls_but_no_call_inside_text(default_tokenizer):
    grammar = ToolUse(TOOLS, Choice.AUTO).grammar()
    assert accepts(default_tokenizer, grammar, "Paris is the capital of France.")
    assert accepts(default_tokenizer, grammar, written(("get_weather", {"city": "Paris"})))
    # a call after text would escape the schema, so text never holds the call marker
    assert not accepts(default_tokenizer, grammar, "Let me see. " + written(("get_weather", {"town": 1})))
    assert ToolUse(TOOLS, Choice.NONE).grammar() == ""


# -- reading calls back ----------------------------------------------------------------------------------

ANSWER_CALLS = [
    ToolCall("", "get_weather", '{"city": "São Paulo", "unit": "celsius"}'),
    ToolCall("", "get_time", '{"timezone": "America/Sao_Paulo \\" {[odd]}"}'),
    ToolCall("", "get_weather", '{"city": "Bern"}'),
]


def parse_in_chunks(text: str, cuts: list[int]):
    parser = ToolCallParser()
    pieces = []
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        pieces.extend(parser.feed(text[start:end]))
    pieces.extend(parser.finish())
    return parser, pieces


@pytest.mark.parametrize("seed", range(200))
def test_the_parser_reads_the_same_calls_however_the_text_is_cut(seed):
    rng = random.Random(seed)
    lead = rng.choice(["", "Sure, let me check. "])
    text = lead + "\n".join(call_text(call) for call in ANSWER_CALLS)
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, min(40, len(text) - 1))))
    parser, pieces = parse_in_chunks(text, cuts)
    assert "".join(p.text for p in pieces if isinstance(p, TextPiece)) == lead.rstrip()
    calls: dict[int, list[str]] = {}
    for piece in pieces:
        if isinstance(piece, CallPiece):
            if piece.id:
                assert piece.index not in calls and piece.name and not piece.arguments
                calls[piece.index] = [piece.id, piece.name, ""]
            calls[piece.index][2] += piece.arguments
    assert [(name, arguments) for _, name, arguments in calls.values()] == [(c.name, c.arguments) for c in ANSWER_CALLS]
    assert [(c.name, c.arguments) for c in parser.calls] == [(c.name, c.arguments) for c in ANSWER_CALLS]
    assert len({id_ for id_, _, _ in calls.values()}) == len(ANSWER_CALLS)
    assert not parser.inside_call


@pytest.mark.parametrize("seed", range(50))
def test_the_parser_passes_plain_text_through_unchanged(seed):
    rng = random.Random(seed)
    text = "An answer with <tool markup> and <tool_c words, ending in <tool_ca"
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, 20)))
    parser, pieces = parse_in_chunks(text, cuts)
    assert all(isinstance(p, TextPiece) for p in pieces) and "".join(p.text for p in pieces) == text
    assert not parser.calls


def test_a_call_cut_short_is_not_complete():
    parser, pieces = parse_in_chunks(call_text(ANSWER_CALLS[0])[:-20], [])
    assert parser.inside_call and not parser.calls
    parser, pieces = parse_in_chunks(f'{CALL_OPEN}\n{{"na', [])
    assert parser.inside_call and pieces == []  # cut before the name: nothing is announced


# -- end to end -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "choice",
    [
        chat_pb2.ToolChoice(mode=chat_pb2.ToolChoice.MODE_REQUIRED),
        chat_pb2.ToolChoice(function="get_time"),
    ],
    ids=["required", "named"],
)
def test_a_forced_call_streams_back_as_tool_calls(default_chat, choice):
    """Needs the generation service to enforce params.constraint (the grammar)."""
    start, text, calls, end = chat(
        default_chat, "What is the weather in Paris, and what time is it there?", tool_choice=choice, max_new_tokens=120
    )
    assert text == "" and calls, text
    for _, name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    if choice.function:
        assert [name for _, name, _ in calls] == ["get_time"]
    assert end.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert "# Tools" in start.prompt and "get_weather" in start.prompt


def test_auto_answers_an_unrelated_question_in_text(default_chat):
    _, text, calls, end = chat(default_chat, "What is the capital of France?")
    assert text.strip() and not calls
    assert end.finish_reason != common_pb2.FINISH_REASON_TOOL_CALLS


def test_a_call_cut_by_max_tokens_ends_with_length(default_chat):
    _, _, _, end = chat(
        default_chat, "Weather in Paris?", tool_choice=chat_pb2.ToolChoice(function="get_weather"), max_new_tokens=12
    )
    assert end.finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_tools_and_retrieval_together_still_give_sources(tiny_chat):
    start, _, _, end = chat(tiny_chat, "What is the largest city in Switzerland?", retrieval=True, max_new_tokens=8)
    assert start.sources and end.context_used
    assert "# Tools" in start.prompt and "Zurich" in start.prompt


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"tools": [chat_pb2.Tool(name="a"), chat_pb2.Tool(description="no name")]}, "tools[1].name is empty"),
        ({"tools": [chat_pb2.Tool(name="a b")]}, "tools[0].name 'a b' must be"),
        ({"tools": [chat_pb2.Tool(name="a"), chat_pb2.Tool(name="a")]}, "tools[1].name 'a' is given twice"),
        ({"tools": [chat_pb2.Tool(name="a", parameters="{not json")]}, "tools[0].parameters is not valid JSON"),
        ({"tools": [chat_pb2.Tool(name="a", parameters="[]")]}, "tools[0].parameters must be a JSON Schema object"),
        (
            {"tools": [chat_pb2.Tool(name="a"), chat_pb2.Tool(name="b", parameters='{"type": "strng"}')]},
            "tools[1].parameters cannot be enforced: failed to compile JSON schema: Invalid type: strng",
        ),
        (
            {"tools": [chat_pb2.Tool(name="a")], "tool_choice": chat_pb2.ToolChoice(function="b")},
            "tool_choice.function 'b' is not among the tools",
        ),
        (
            {"tools": [], "tool_choice": chat_pb2.ToolChoice(mode=chat_pb2.ToolChoice.MODE_REQUIRED)},
            "tool_choice asks for 'required' but the request offers no tools",
        ),
        (
            {"tools": [chat_pb2.Tool(name="a")], "params": common_pb2.SamplingParams(constraint={"json_object": True})},
            "params.constraint cannot be set together with tools",
        ),
        (
            {
                "history": [
                    chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="hi"),
                    chat_pb2.ChatMessage(role=chat_pb2.ROLE_TOOL, content="21", tool_call_id="call_x"),
                ]
            },
            "history[1].tool_call_id 'call_x' answers no earlier assistant tool call",
        ),
        (
            {
                "history": [
                    chat_pb2.ChatMessage(
                        role=chat_pb2.ROLE_ASSISTANT, tool_calls=[chat_pb2.ToolCall(id="c", name="a", arguments="{")]
                    ),
                ]
            },
            "history[0].tool_calls[0].arguments is not valid JSON",
        ),
    ],
)
def test_bad_tool_requests_are_invalid_argument(tiny_chat, fields, message):
    request = chat_pb2.ChatRequest(message="hello", **fields)
    with pytest.raises(grpc.RpcError) as raised:
        list(tiny_chat.Chat(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in raised.value.details()
