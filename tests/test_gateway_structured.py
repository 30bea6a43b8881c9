"""Structured output, tool calls, n choices and logit_bias through the HTTP gateway.

Three layers: the wire -> proto translation as pure functions; the gateway in front of a scripted orchestrator
(it answers with tool calls, JSON or its seed, and records what it was asked), driven by clients nobody here
wrote (the openai SDK's parse and stream helpers, LangChain's structured output and tools); and the whole stack on
the embedded default model, where the engine's constraints and the orchestrator's tools make real answers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import start_gateway, start_orchestrator
from pydantic import BaseModel

from nightcap.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from services.common.errors import InvalidArgument
from services.common.server import ServiceBinding, start_server
from services.gateway import openai_types as wire
from services.gateway import translate

ROOT = Path(__file__).resolve().parents[1]


class City(BaseModel):
    name: str
    country: str


class GetWeather(BaseModel):
    """The weather in a city now."""

    city: str


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ASK = [{"role": "user", "content": "What is the weather in Zurich?"}]
SUNNY = "It is sunny in Zurich."


# --- the wire into protos, pure -----------------------------------------------------------------------------------


def chat_proto(**body) -> chat_pb2.ChatRequest:
    request = wire.ChatCompletionRequest(**{"messages": ASK, **body})
    request.check(8)
    return translate.chat_request(request, "r1", translate.SamplingDefaults(), False)


def test_response_format_becomes_the_constraint():
    schema = City.model_json_schema()
    strict = chat_proto(response_format={"type": "json_schema", "json_schema": {"name": "City", "schema": schema}})
    assert json.loads(strict.params.constraint.json_schema) == schema
    assert chat_proto(response_format={"type": "json_object"}).params.constraint.json_object
    assert not chat_proto(response_format={"type": "text"}).params.HasField("constraint")


def test_tools_and_each_tool_choice_become_the_chat_requests():
    auto = chat_proto(tools=[WEATHER_TOOL, CLOCK_TOOL])
    assert [t.name for t in auto.tools] == ["get_weather", "get_time"]
    assert json.loads(auto.tools[0].parameters)["required"] == ["city"] and auto.tools[0].description
    assert not auto.HasField("tool_choice") and not auto.HasField("parallel_tool_calls")
    assert (
        chat_proto(tools=[WEATHER_TOOL], tool_choice="required").tool_choice.mode == chat_pb2.ToolChoice.MODE_REQUIRED
    )
    assert chat_proto(tools=[WEATHER_TOOL], tool_choice="none").tool_choice.mode == chat_pb2.ToolChoice.MODE_NONE
    named = chat_proto(
        tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    assert named.tool_choice.function == "get_time" and named.parallel_tool_calls is False
    legacy = chat_proto(functions=[WEATHER_TOOL["function"]], function_call={"name": "get_weather"})
    assert legacy.tools[0].name == "get_weather" and legacy.tool_choice.function == "get_weather"
    assert legacy.parallel_tool_calls is False  # the legacy shape holds one call


def test_a_tool_round_trip_goes_back_as_history_with_the_calls_and_their_results():
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Zurich"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    chat = chat_proto(messages=messages, tools=[WEATHER_TOOL])
    assert chat.message == "" and [m.role for m in chat.history] == [
        chat_pb2.ROLE_USER,
        chat_pb2.ROLE_ASSISTANT,
        chat_pb2.ROLE_TOOL,
    ]
    assert chat.history[1].tool_calls[0] == chat_pb2.ToolCall(
        id="call_1", name="get_weather", arguments='{"city":"Zurich"}'
    )
    assert chat.history[2].tool_call_id == "call_1" and chat.history[2].content == "sunny, 21 C"
    legacy = chat_proto(
        messages=[
            *ASK,
            {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": "{}"}},
            {"role": "function", "name": "get_weather", "content": "sunny"},
        ],
        functions=[WEATHER_TOOL["function"]],
    )
    call_id = legacy.history[1].tool_calls[0].id
    assert call_id and legacy.history[2].tool_call_id == call_id and legacy.history[2].name == "get_weather"


def test_logit_bias_is_clamped_and_n_choices_get_seed_plus_index():
    chat = chat_proto(logit_bias={"42": 250, "7": -300, "9": 1.5}, seed=7, n=3)
    assert dict(chat.params.logit_bias) == {42: 100.0, 7: -100.0, 9: 1.5}
    assert [translate.seeded(chat, i).params.seed for i in range(3)] == [7, 8, 9]
    assert chat.params.seed == 7  # the first choice is the request itself
    unseeded = chat_proto(n=2)
    assert not translate.seeded(unseeded, 1).params.HasField("seed")


@pytest.mark.parametrize(
    ("body", "kind", "value"),
    [
        ({"structured_outputs": {"json": {"type": "object"}}}, "json_schema", {"type": "object"}),
        ({"structured_outputs": {"regex": "[0-9]{3}"}}, "regex", "[0-9]{3}"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ["yes", "no"]),
        ({"structured_outputs": {"grammar": 'root ::= "a" | "b"'}}, "gbnf", 'root ::= "a" | "b"'),
        ({"structured_outputs": {"grammar": 'start: "a" | "b"'}}, "lark", 'start: "a" | "b"'),
        ({"structured_outputs": {"json_object": True}}, "json_object", True),
        ({"response_format": {"type": "json_object"}}, "json_object", True),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array"}}}},
            "json_schema",
            {"type": "array"},
        ),
        ({"guided_json": '{"type": "object"}'}, "json_schema", {"type": "object"}),
        ({"guided_regex": "a+"}, "regex", "a+"),
        ({"guided_choice": ["a", "b"]}, "choice", ["a", "b"]),
        ({"guided_grammar": 'root ::= "x"'}, "gbnf", 'root ::= "x"'),
        ({"guided_grammar": 'start: "x"'}, "lark", 'start: "x"'),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_each_completions_constraint_field_becomes_the_generations_constraint(body, kind, value):
    request = wire.CompletionRequest(prompt="Answer:", **body)
    request.check()
    params = translate.generate_request(request, "r1", translate.SamplingDefaults()).params
    assert params.constraint.WhichOneof("kind") == kind
    found = getattr(params.constraint, kind)
    if kind == "json_schema":
        found = json.loads(found)
    elif kind == "choice":
        found = list(found.options)
    assert found == value


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("tools[1].name: 'a b' is not a function name", "tools[1].function.name"),
        ("tools[0].parameters is not a JSON Schema", "tools[0].function.parameters"),
        ("tool_choice.function 'x' is not among the tools", "tool_choice"),
        ("constraint.json_schema: unsupported keyword 'if'", "response_format.json_schema.schema"),
        ("params.logit_bias: token 99999 is outside the vocabulary", "logit_bias"),
        ("history[1].tool_calls[0].arguments is not a JSON object", "messages[1].tool_calls[0].function.arguments"),
        ("history[2].tool_call_id names no call", "messages[2].tool_call_id"),
        ("max_new_tokens must be at least 1", None),
    ],
)
def test_backend_errors_name_the_clients_field(message, param):
    request = wire.ChatCompletionRequest(
        messages=ASK, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}
    )
    assert translate.backend_param(message, request) == param


def test_a_completions_constraint_error_names_the_field_that_set_it():
    request = wire.CompletionRequest(prompt="x", guided_regex="a+")
    assert translate.backend_param("constraint.regex: too complex", request) == "guided_regex"
    legacy = wire.ChatCompletionRequest(messages=ASK, functions=[WEATHER_TOOL["function"]])
    assert translate.backend_param("tools[0].parameters: bad", legacy) == "functions[0].parameters"
    tools = wire.ChatCompletionRequest(messages=ASK, tools=[WEATHER_TOOL])
    assert translate.backend_param("constraint.lark: llguidance cannot compile it", tools) == "tools"


# --- the gateway in front of a scripted orchestrator ----------------------------------------------------------------


def sample(schema: dict) -> object:
    """A value valid against the simple schemas these tests use."""
    kind = schema.get("type", "object")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        return {name: sample(prop) for name, prop in schema.get("properties", {}).items()}
    return {"string": "Zurich", "integer": 1, "number": 1.5, "boolean": True, "array": []}.get(kind)


def pieces(text: str, size: int = 5) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


class ScriptedChat(chat_pb2_grpc.ChatServicer):
    """Answers as the orchestrator will: tool calls when tools are offered (and not refused), the JSON the
    constraint asks for, the tool results' answer after calls, else its seed. Records every request."""

    def __init__(self) -> None:
        self.requests: list[chat_pb2.ChatRequest] = []

    def Chat(self, request, context):
        self.requests.append(request)
        if request.message == "fail tools":
            raise InvalidArgument("tools[0].parameters uses a keyword the grammar engine lacks: 'if'")
        if request.message == "fail schema":
            raise InvalidArgument("constraint.json_schema uses a keyword the grammar engine lacks: 'if'")
        yield chat_pb2.ChatResponse(start=chat_pb2.ChatStart(model="scripted:1"))
        if request.message == "break off":  # a stream that ends without its end message
            yield chat_pb2.ChatResponse(delta="Zurich is")
            return
        end = chat_pb2.ChatEnd(finish_reason=common_pb2.FINISH_REASON_EOS, prompt_tokens=10)
        choice = request.tool_choice
        calls_tools = request.tools and (choice.function or choice.mode != chat_pb2.ToolChoice.MODE_NONE)
        if calls_tools and request.message:
            tools = {tool.name: tool for tool in request.tools}
            names = [choice.function] if choice.function else list(tools)
            one = request.HasField("parallel_tool_calls") and not request.parallel_tool_calls
            if request.message != "both" or one:
                names = names[:1]
            for index, name in enumerate(names):
                parameters = json.loads(tools[name].parameters or '{"type": "object"}')
                arguments = json.dumps(sample(parameters))
                if request.message == "cut":
                    arguments = arguments[: len(arguments) // 2]
                    end.finish_reason = common_pb2.FINISH_REASON_LENGTH
                else:
                    end.finish_reason = common_pb2.FINISH_REASON_TOOL_CALLS
                first = chat_pb2.ToolCallDelta(index=index, id=f"call_{index}_{name}", name=name)
                yield chat_pb2.ChatResponse(tool_call=first)
                for piece in pieces(arguments):
                    yield chat_pb2.ChatResponse(tool_call=chat_pb2.ToolCallDelta(index=index, arguments=piece))
                end.completion_tokens += len(pieces(arguments))
            yield chat_pb2.ChatResponse(end=end)
            return
        constraint = request.params.constraint
        if constraint.HasField("json_schema"):
            text = json.dumps(sample(json.loads(constraint.json_schema)))
        elif constraint.HasField("json_object"):
            text = '{"city": "Zurich"}'
        elif not request.message:
            text = SUNNY
        elif request.params.HasField("seed"):
            text = f"seed={request.params.seed}"
        else:
            text = "Zurich is in Switzerland."
        for piece in pieces(text):
            yield chat_pb2.ChatResponse(delta=piece)
        end.completion_tokens = len(pieces(text))
        yield chat_pb2.ChatResponse(end=end)


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedChat]:
    yield ScriptedChat()


@pytest.fixture(scope="module")
def scripted_address(scripted) -> Iterator[str]:
    server = start_server(
        [ServiceBinding("nightcap.v1.Chat", chat_pb2_grpc.add_ChatServicer_to_server, scripted)], "127.0.0.1:0"
    )
    yield f"127.0.0.1:{server.port}"
    server.stop(grace=0)


@pytest.fixture(scope="module")
def scripted_url(scripted_address, generation_address) -> Iterator[str]:
    gateway = start_gateway(scripted_address, generation_address, None, max_n=4)
    yield gateway.url
    gateway.stop()


@pytest.fixture(scope="module")
def sdk(scripted_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{scripted_url}/v1", api_key="unused", max_retries=0)


def test_the_sdks_parse_gets_the_json_schema_answer_as_the_model(sdk, scripted):
    reply = sdk.chat.completions.parse(model="", messages=ASK, response_format=City)
    assert reply.choices[0].message.parsed == City(name="Zurich", country="Zurich")
    sent = scripted.requests[-1].params.constraint
    assert json.loads(sent.json_schema)["required"] == ["name", "country"]


@pytest.mark.parametrize("choice", ["required", "named", "auto"])
def test_a_tool_call_comes_back_with_an_id_and_finish_reason_tool_calls(sdk, choice):
    tool_choice = {"type": "function", "function": {"name": "get_weather"}} if choice == "named" else choice
    reply = sdk.chat.completions.create(model="", messages=ASK, tools=[WEATHER_TOOL], tool_choice=tool_choice)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    (call,) = message.tool_calls
    assert call.id == "call_0_get_weather" and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Zurich"}


def test_the_sdks_stream_helper_assembles_streamed_calls_as_the_unstreamed_ones(sdk):
    tools = [openai.pydantic_function_tool(GetWeather), CLOCK_TOOL]
    with sdk.chat.completions.stream(model="", messages=[{"role": "user", "content": "both"}], tools=tools) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["GetWeather", "get_time"] and final.choices[
        0
    ].finish_reason == "tool_calls"
    assert calls[0].function.parsed_arguments == GetWeather(city="Zurich")  # strict: parsed by the SDK
    whole = sdk.chat.completions.create(model="", messages=[{"role": "user", "content": "both"}], tools=tools)

    def plain(calls):
        return [(c.id, c.type, c.function.name, c.function.arguments) for c in calls]

    assert plain(whole.choices[0].message.tool_calls) == plain(calls)


def test_raw_chunks_carry_index_id_type_and_name_first_then_argument_pieces(scripted_url):
    body = {"messages": ASK, "tools": [WEATHER_TOOL], "tool_choice": "required", "stream": True}
    with httpx.stream("POST", f"{scripted_url}/v1/chat/completions", json=body, timeout=30) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0] == {
        "index": 0,
        "id": "call_0_get_weather",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert all(set(c) == {"index", "function"} and set(c["function"]) == {"arguments"} for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Zurich"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("stream", [False, True], ids=["create", "stream-helper"])
def test_a_full_round_trip_ask_call_result_answer(sdk, scripted, stream):
    messages = list(ASK)
    tools = [openai.pydantic_function_tool(GetWeather, name="get_weather")]
    if stream:  # the helper's message carries parsed and parsed_arguments, sent back as they are
        with sdk.chat.completions.stream(model="", messages=messages, tools=tools) as events:
            reply = events.get_final_completion()
    else:
        reply = sdk.chat.completions.create(model="", messages=messages, tools=tools)
    messages.append(reply.choices[0].message)  # the SDK's own message object, sent back as it came
    call = reply.choices[0].message.tool_calls[0]
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"})
    answer = sdk.chat.completions.create(model="", messages=messages, tools=tools)
    assert answer.choices[0].message.content == SUNNY and answer.choices[0].finish_reason == "stop"
    sent = scripted.requests[-1]
    assert sent.message == "" and sent.history[1].tool_calls[0].id == call.id
    assert sent.history[2].role == chat_pb2.ROLE_TOOL and sent.history[2].tool_call_id == call.id


def test_legacy_functions_answer_in_the_legacy_shape(sdk, scripted_url):
    reply = sdk.chat.completions.create(
        model="", messages=ASK, functions=[WEATHER_TOOL["function"]], function_call={"name": "get_weather"}
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert json.loads(choice.message.function_call.arguments) == {"city": "Zurich"}
    body = {"messages": ASK, "functions": [WEATHER_TOOL["function"]], "stream": True}
    with httpx.stream("POST", f"{scripted_url}/v1/chat/completions", json=body, timeout=30) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    pieces_ = [c["choices"][0]["delta"]["function_call"] for c in chunks if "function_call" in c["choices"][0]["delta"]]
    assert pieces_[0]["name"] == "get_weather" and "name" not in pieces_[1]
    assert json.loads("".join(p["arguments"] for p in pieces_)) == {"city": "Zurich"}


def test_a_call_cut_by_max_tokens_is_finish_reason_length_never_a_broken_call(sdk):
    reply = sdk.chat.completions.create(
        model="", messages=[{"role": "user", "content": "cut"}], tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert reply.choices[0].finish_reason == "length" and not reply.choices[0].message.tool_calls


def test_n_3_with_a_seed_gives_3_choices_seed_plus_index_and_streams_by_index(sdk, scripted):
    def ask(**extra):
        return sdk.chat.completions.create(model="", messages=ASK, n=3, seed=7, **extra)

    first, again = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == ["seed=7", "seed=8", "seed=9"]
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    assert first.usage.completion_tokens == 6 and first.usage.prompt_tokens == 10  # the prompt once, answers summed
    stream = ask(stream=True, stream_options={"include_usage": True})
    texts = ["", "", ""]
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
        if not chunk.choices:
            assert chunk.usage.completion_tokens == 6
    assert texts == ["seed=7", "seed=8", "seed=9"] and finished == {0, 1, 2}


def test_logit_bias_reaches_the_orchestrator_clamped(sdk, scripted):
    sdk.chat.completions.create(model="", messages=ASK, logit_bias={"42": 150, "7": -5})
    assert dict(scripted.requests[-1].params.logit_bias) == {42: 100.0, 7: -5.0}


def test_langchain_structured_output_by_each_method(scripted_url, scripted):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{scripted_url}/v1", api_key="unused", model="tiny-gpt-neox", max_retries=0)
    for method in ("json_schema", "function_calling"):
        assert llm.with_structured_output(City, method=method).invoke("Where is Zurich?") == City(
            name="Zurich", country="Zurich"
        ), method
    sent = scripted.requests[-1]
    assert sent.tool_choice.function == "City"
    answer = llm.with_structured_output(None, method="json_mode").invoke("Where is Zurich? Answer in JSON.")
    assert answer == {"city": "Zurich"} and scripted.requests[-1].params.constraint.json_object


def test_langchain_bind_tools_then_a_tool_message_and_a_final_answer(scripted_url):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The weather in a city now."""
        return "sunny, 21 C"

    llm = ChatOpenAI(base_url=f"{scripted_url}/v1", api_key="unused", model="tiny-gpt-neox", max_retries=0)
    bound = llm.bind_tools([get_weather])
    history = [HumanMessage("What is the weather in Zurich?")]
    asked = bound.invoke(history)
    assert asked.tool_calls[0]["name"] == "get_weather" and asked.tool_calls[0]["args"] == {"city": "Zurich"}
    streamed = None
    for chunk in bound.stream(history):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.tool_calls == asked.tool_calls
    call = asked.tool_calls[0]
    history += [asked, ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])]
    assert bound.invoke(history).content == SUNNY


def chatctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clients.chatctl", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def test_chatctl_ask_json_schema_prints_the_structured_answer(scripted_address, scripted, tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(City.model_json_schema()))
    done = chatctl("ask", "Where is Zurich?", "--json-schema", str(schema), "--address", scripted_address)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"name": "Zurich", "country": "Zurich"}
    assert json.loads(scripted.requests[-1].params.constraint.json_schema) == City.model_json_schema()
    as_json = chatctl("ask", "Where?", "--json-schema", str(schema), "--json", "--address", scripted_address)
    assert json.loads(as_json.stdout)["structured"] == {"name": "Zurich", "country": "Zurich"}
    done = chatctl("ask", "Where is Zurich?", "--regex", "[A-Z][a-z]+", "--address", scripted_address)
    assert done.returncode == 0 and scripted.requests[-1].params.constraint.regex == "[A-Z][a-z]+"
    schema.write_text("{not json")
    bad = chatctl("ask", "Where?", "--json-schema", str(schema), "--address", scripted_address)
    assert bad.returncode == 2 and "not a JSON file" in bad.stderr


def test_the_python_client_sends_constraints_tools_and_assembles_calls(scripted_address, scripted):
    from clients import ChatClient, Message, SamplingParams, Tool, ToolCall

    weather = Tool("get_weather", "The weather", json.dumps(WEATHER_TOOL["function"]["parameters"]))
    with ChatClient(scripted_address) as client:
        reply = client.ask("What is the weather?", tools=[weather], tool_choice="required")
        assert reply.finished.finish_reason == "tool_calls"
        assert reply.tool_calls == [ToolCall("call_0_get_weather", "get_weather", '{"city": "Zurich"}')]
        assert scripted.requests[-1].tool_choice.mode == chat_pb2.ToolChoice.MODE_REQUIRED
        history = [
            Message("user", "What is the weather?"),
            Message("assistant", "", tool_calls=tuple(reply.tool_calls)),
            Message("tool", "sunny", tool_call_id="call_0_get_weather", name="get_weather"),
        ]
        assert client.ask("", history=history, tools=[weather]).text == SUNNY
        assert scripted.requests[-1].history[2].tool_call_id == "call_0_get_weather"
        client.ask("Yes?", params=SamplingParams(choice=["yes", "no"], logit_bias={5: -100.0}))
        sent = scripted.requests[-1].params
        assert list(sent.constraint.choice.options) == ["yes", "no"] and dict(sent.logit_bias) == {5: -100.0}
    with pytest.raises(ValueError, match="one constraint"):
        SamplingParams(regex="a", json_object=True).to_proto()


def test_a_node_client_sends_a_constraint_and_tools_and_reads_the_tool_call_pieces(
    node_client, scripted_address, scripted
):
    def node(scenario: str) -> dict:
        script = node_client
        done = subprocess.run(
            ["node", str(script), scripted_address, scenario], capture_output=True, text=True, timeout=120, check=True
        )
        return json.loads(done.stdout)

    choice = node("choice")
    assert choice["code"] == "OK" and list(scripted.requests[-1].params.constraint.choice.options) == ["yes", "no"]
    tools = node("tools")
    assert (
        tools["code"] == "OK" and tools["events"][0] == "start" and "toolCall" in tools["events"]
    )  # proto-loader camel-cases
    assert scripted.requests[-1].tool_choice.mode == chat_pb2.ToolChoice.MODE_REQUIRED
    first, *rest = tools["toolCalls"]
    assert first["id"] == "call_0_get_weather" and first["name"] == "get_weather"
    assert json.loads("".join(piece.get("arguments", "") for piece in [first, *rest])) == {"city": "Zurich"}


# --- bad input: a 400 naming the field ------------------------------------------------------------------------------


BAD_CHAT = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "x"}}}},
     "response_format.json_schema.schema"),
    # the meta-schema refuses what the grammar engine would let pass: a title that is not a string
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"title": 5}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER_TOOL, {"type": "function", "function": {"name": "a b"}}]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools[0].function.parameters"),
    ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
    ({"n": 5}, "n"),
    ({"logit_bias": {"hello": 3}}, "logit_bias"),
    ({"logit_bias": {"-1": 3}}, "logit_bias"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "?"}]}, "messages[1].tool_call_id"),
    ({"messages": [{"role": "user", "content": "fail tools"}], "tools": [WEATHER_TOOL]},
     "tools[0].function.parameters"),
    ({"messages": [{"role": "user", "content": "fail schema"}],
      "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}},
     "response_format.json_schema.schema"),
]  # fmt: skip
BAD_COMPLETIONS = [
    ({"guided_grammar": "root ::= (("}, "guided_grammar"),
    ({"structured_outputs": {"grammar": "start: (("}}, "structured_outputs.grammar"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"structured_outputs": {"regex": "(x"}}, "structured_outputs.regex"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"structured_outputs": {"json": {"type": "frob"}}}, "structured_outputs.json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"structured_outputs": {"regex": "a", "frobnicate": 1}}, "structured_outputs.frobnicate"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT, ids=[p for _, p in BAD_CHAT])
def test_bad_chat_input_is_400_naming_the_field(scripted_url, body, param):
    reply = httpx.post(f"{scripted_url}/v1/chat/completions", json={"messages": ASK, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text


@pytest.mark.parametrize(("body", "param"), BAD_COMPLETIONS, ids=[p for _, p in BAD_COMPLETIONS])
def test_bad_completions_constraints_are_400_naming_the_field(scripted_url, body, param):
    reply = httpx.post(f"{scripted_url}/v1/completions", json={"prompt": "x", "max_tokens": 2, **body}, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param, reply.text


def test_the_sdk_raises_bad_request_with_the_param(sdk):
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="", messages=ASK, tools=[WEATHER_TOOL], tool_choice={
            "type": "function", "function": {"name": "get_time"}})  # fmt: skip
    assert bad.value.param == "tool_choice"


# --- n raw completions: each its own Generate on the tiny model behind the same gateway ---------------------------

PROMPT = "Zurich is"


def complete(sdk: openai.OpenAI, **extra):
    """A sampled, seeded completion with logprobs (one per generated token, so usage can be checked per choice)."""
    ask = {"prompt": PROMPT, "n": 3, "seed": 11, "temperature": 1.0, "max_tokens": 8, "logprobs": 0, **extra}
    return sdk.completions.create(model="", **ask)


def test_n_3_completions_are_3_generations_each_sampled_with_seed_plus_index(sdk):
    first = complete(sdk)
    texts = [choice.text for choice in first.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert all(texts) and len(set(texts)) == 3, texts
    assert all(choice.finish_reason in ("stop", "length") for choice in first.choices)
    assert [choice.text for choice in complete(sdk).choices] == texts  # a seeded request is reproducible
    alone = [complete(sdk, n=1, seed=11 + index) for index in range(3)]
    assert [reply.choices[0].text for reply in alone] == texts  # choice i is what seed + i gives on its own
    assert first.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt once
    assert first.usage.completion_tokens == sum(reply.usage.completion_tokens for reply in alone)
    assert first.usage.completion_tokens == sum(len(choice.logprobs.tokens) for choice in first.choices)


def test_n_3_completions_stream_each_choice_by_index_and_the_usage_once_at_the_end(sdk):
    whole = complete(sdk)
    texts, reasons, offsets, usages = ["", "", ""], [[], [], []], [[], [], []], []
    for chunk in complete(sdk, stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            assert chunk.choices == []
            usages.append(chunk.usage)
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.logprobs is not None:
                offsets[choice.index] += choice.logprobs.text_offset
            if choice.finish_reason is not None:
                reasons[choice.index].append(choice.finish_reason)
    assert texts == [choice.text for choice in whole.choices]
    assert reasons == [[choice.finish_reason] for choice in whole.choices]
    assert [found[0] for found in offsets] == [0, 0, 0]  # each choice's text_offset counts its own text
    assert len(usages) == 1 and usages[0].completion_tokens == whole.usage.completion_tokens
    assert usages[0].prompt_tokens == whole.usage.prompt_tokens


YES_OR_NO = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}},
    "required": ["ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    "constraint",
    [
        {"structured_outputs": {"json": YES_OR_NO}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": YES_OR_NO}}},
        {"guided_json": YES_OR_NO},
    ],
    ids=["structured_outputs", "response_format", "guided_json"],
)
def test_n_3_completions_under_a_json_schema_each_give_valid_json(sdk, constraint):
    reply = complete(sdk, max_tokens=32, logprobs=None, extra_body=constraint)
    assert len(reply.choices) == 3
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.text
        assert isinstance(json.loads(choice.text)["ok"], bool), choice.text


@pytest.mark.parametrize(
    ("extra", "param"),
    [({"n": 5}, "n"), ({"n": 2, "best_of": 1}, "best_of"), ({"n": 2, "best_of": 2}, "best_of")],
    ids=["beyond-max-n", "best_of-below-n", "best_of"],
)
def test_completions_n_beyond_max_n_and_best_of_are_400_naming_the_field(sdk, extra, param):
    with pytest.raises(openai.BadRequestError) as bad:
        complete(sdk, **extra)  # this gateway runs with --max-n 4
    assert bad.value.param == param


# --- the whole stack on the embedded default ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_url(default_generation_address) -> Iterator[str]:
    orchestrator = start_orchestrator(default_generation_address, None, max_new_tokens=96)
    gateway = start_gateway(orchestrator.address, default_generation_address, None)
    yield gateway.url
    gateway.stop()
    orchestrator.stop(grace=1)


@pytest.fixture(scope="module")
def default_sdk(default_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{default_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_n_3_seeded_on_the_tiny_stack_is_reproducible(gateway_url):
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)

    def ask():
        reply = client.chat.completions.create(
            model="", messages=ASK, n=3, seed=11, temperature=1.0, max_tokens=8, extra_body={"retrieval": False}
        )
        return [c.message.content for c in reply.choices]

    first = ask()
    assert len(first) == 3 and ask() == first and len(set(first)) > 1


def test_default_json_schema_answers_parse_every_time(default_sdk):
    for seed in range(3):
        reply = default_sdk.chat.completions.parse(
            model="", messages=[{"role": "user", "content": "Name a city and its country."}], response_format=City,
            seed=seed, temperature=1.0, max_tokens=96,
        )  # fmt: skip
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(reply.choices[0].message.parsed, City)


def test_default_completions_obey_each_constraint_field(default_sdk):
    cases = [
        ({"guided_regex": "[0-9]{3}"}, lambda t: t.isdigit() and len(t) == 3),
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_json": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}},
         lambda t: isinstance(json.loads(t)["a"], int)),
        ({"guided_grammar": 'root ::= "red" | "blue"'}, lambda t: t in ("red", "blue")),
        ({"structured_outputs": {"grammar": 'start: "up" | "down"'}}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"regex": "[a-z]+"}}, lambda t: t.isalpha() and t.islower()),
        ({"structured_outputs": {"choice": ["A", "B"]}}, lambda t: t in ("A", "B")),
        ({"response_format": {"type": "json_object"}}, lambda t: isinstance(json.loads(t), dict)),
    ]  # fmt: skip
    for body, valid in cases:
        reply = default_sdk.completions.create(model="", prompt="Answer:", max_tokens=48, extra_body=body)
        if reply.choices[0].finish_reason == "stop":
            assert valid(reply.choices[0].text), (body, reply.choices[0].text)


def test_default_logit_bias_bans_and_forces_tokens(default_sdk):
    free = default_sdk.completions.create(model="", prompt="The capital of France is", max_tokens=4, temperature=0)
    forced = default_sdk.completions.create(
        model="", prompt="The capital of France is", max_tokens=4, temperature=0, logit_bias={"28": 100}
    )
    assert forced.choices[0].text != free.choices[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_default_tool_call_round_trip(default_sdk, stream):
    messages = [{"role": "user", "content": "What is the weather in Zurich? Use the tool."}]
    # Greedy and one call: sampled with parallel calls allowed, the small model may go on calling until the
    # token limit, and the round trip below is what this test is about.
    ask = {"tools": [WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0}
    if stream:
        with default_sdk.chat.completions.stream(model="", messages=messages, **ask) as events:
            reply = events.get_final_completion()
    else:
        reply = default_sdk.chat.completions.create(model="", messages=messages, **ask)
    choice = reply.choices[0]
    if choice.finish_reason == "length":
        # Cut off: only calls whose arguments were complete are returned.
        assert all(json.loads(call.function.arguments) is not None for call in choice.message.tool_calls or [])
        return
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.id and call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments), dict)
    messages += [choice.message, {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    answer = default_sdk.chat.completions.create(model="", messages=messages, tools=[WEATHER_TOOL], tool_choice="none")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_default_named_tool_choice_calls_that_tool(default_sdk):
    reply = default_sdk.chat.completions.create(
        model="", messages=ASK, tools=[WEATHER_TOOL, CLOCK_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )  # fmt: skip
    if reply.choices[0].finish_reason != "length":
        assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_time"]


def test_default_langchain_bind_tools_and_structured_output(default_url):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{default_url}/v1",
        api_key="unused",
        model="",
        max_retries=0,
        max_completion_tokens=200,
        temperature=0,
    )
    for method in ("json_schema", "function_calling", "json_mode"):
        target = None if method == "json_mode" else City
        answer = llm.with_structured_output(target, method=method).invoke(
            'Answer in JSON with the keys "name" and "country": which city is the capital of France?'
        )
        assert answer is not None, method
    bound = llm.bind_tools([GetWeather], tool_choice="required")
    asked = bound.invoke([HumanMessage("What is the weather in Zurich?")])
    call = asked.tool_calls[0]
    final = llm.bind_tools([GetWeather]).invoke(
        [HumanMessage("What is the weather in Zurich?"), asked, ToolMessage("sunny", tool_call_id=call["id"])]
    )
    assert final.content or final.tool_calls


@pytest.mark.parametrize("n", [1, 2])
def test_an_orchestrator_stream_that_ends_without_its_end_message_is_a_503_not_half_an_answer(scripted_url, n):
    body = {"messages": [{"role": "user", "content": "break off"}], "n": n}
    whole = httpx.post(f"{scripted_url}/v1/chat/completions", json=body, timeout=30)
    assert whole.status_code == 503
    assert whole.json()["error"]["message"] == "the orchestrator ended the stream without its end message"
    with httpx.stream(
        "POST", f"{scripted_url}/v1/chat/completions", json={**body, "stream": True}, timeout=30
    ) as reply:
        events = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["message"] == "the orchestrator ended the stream without its end message"
    assert not any("finish_reason" in event and '"stop"' in event for event in events)
