"""Structured outputs: constraints (JSON schema, regex, Lark, GBNF, choice) compiled by llguidance into a per-row
token mask, and logit_bias; through raw gRPC stubs on the embedded default (both runners) and the tiny model."""

from __future__ import annotations

import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest
from conftest import PREFIX_CACHE, wait_for

from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.generation.engine.constraints import ConstraintCompiler, ConstraintSpec
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.loading import DEFAULT_MODEL, load_model, start_engine
from services.generation.server import start_generation_server

STR = {"type": "string", "maxLength": 12}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": STR, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"first": STR, "last": STR},
     "required": ["first", "last"]}}, "required": ["person"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}}, "required": ["color"]},
    {"type": "object", "properties": {"celsius": {"type": "integer", "minimum": -10, "maximum": 40}},
     "required": ["celsius"]},
    {"type": "object", "properties": {"title": STR, "subtitle": STR}, "required": ["title"],
     "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, STR]}},
     "required": ["value"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {"type": "object",
     "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "done": {"type": "boolean"}},
     "required": ["id", "done"]}}}, "required": ["items"]},
    {"type": "object", "properties": {"kind": {"const": "point"}, "x": {"type": "integer", "minimum": 0,
     "maximum": 9}}, "required": ["kind", "x"]},
    {"type": "string", "enum": ["yes", "no", "maybe"]},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "array", "maxItems": 2, "items": {"type": "array", "maxItems": 2, "items": {"type": "integer",
     "minimum": 0, "maximum": 9}}},
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}, "b": STR,
     "c": {"type": "boolean"}}, "required": ["a", "b", "c"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"nickname": {"type": ["string", "null"], "maxLength": 8}},
     "required": ["nickname"]},
    {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
     "y": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x", "y"]}}, "type": "object",
     "properties": {"start": {"$ref": "#/$defs/pt"}, "end": {"$ref": "#/$defs/pt"}}, "required": ["start", "end"]},
    {"type": "object", "properties": {"count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 5}},
     "required": ["count"]},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 3},
    {"type": "object", "properties": {"outer": {"type": "object", "properties": {"inner": {"type": "object",
     "properties": {"leaf": {"type": "boolean"}}, "required": ["leaf"]}}, "required": ["inner"]}},
     "required": ["outer"]},
]  # fmt: skip
MAX_TOKENS = 64


def _closed(schema):
    """Every object in ``schema`` without additional properties (as OpenAI's strict mode asks): a sampled row
    cannot wander into keys of its own."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if schema.get("type") == "object":
            schema.setdefault("additionalProperties", False)
    elif isinstance(schema, list):
        schema = [_closed(v) for v in schema]
    return schema


SCHEMAS = [_closed(schema) for schema in SCHEMAS]


def chat(text: str) -> str:
    """The default's ChatML prompt for one user turn."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def generate(address: str, text: str, timeout: float | None = None, **params) -> tuple[list[int], str, int]:
    """(tokens, text, finish reason) of one Generate on a raw stub (no deadline unless ``timeout``)."""
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        responses = list(stub.Generate(generation_pb2.GenerateRequest(text=text, params=params), timeout=timeout))
    tokens = [t for r in responses for t in r.token_ids]
    return tokens, "".join(r.text for r in responses), responses[-1].finish.reason


def code_of(address: str, **params) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        generate(address, chat("hi"), **params)
    return caught.value.code(), caught.value.details()


def assert_schemas_hold(address: str, schemas: list[dict], temperatures=(0.0, 0.8)) -> None:
    jobs = [(i, t) for i in range(len(schemas)) for t in temperatures]

    def one(job):
        i, temperature = job
        params = {"max_new_tokens": MAX_TOKENS, "temperature": temperature, "seed": 7 + i}
        params["constraint"] = {"json_schema": json.dumps(schemas[i])}
        return generate(address, chat(f"Answer in JSON: describe example {i}."), **params)

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(one, jobs))
    for (i, temperature), (_, text, reason) in zip(jobs, results, strict=True):
        assert reason == common_pb2.FINISH_REASON_EOS, (i, temperature, text)
        jsonschema.validate(json.loads(text), schemas[i])


def test_twenty_json_schemas_each_give_valid_json_greedy_and_sampled(default_generation_address):
    assert_schemas_hold(default_generation_address, SCHEMAS)


def test_regex_choice_lark_and_gbnf_are_honoured(default_generation_address):
    address = default_generation_address
    cases = [
        ({"regex": r"(yes|no), [0-9]{2} apples"}, r"(yes|no), [0-9]{2} apples"),
        ({"choice": {"options": ["red", "green", "blue"]}}, r"red|green|blue"),
        ({"lark": 'start: "The answer is " NUM "."\nNUM: /[0-9]{1,3}/'}, r"The answer is [0-9]{1,3}\."),
        ({"gbnf": 'root ::= "color: " ("cyan" | "magenta") "!"'}, r"color: (cyan|magenta)!"),
        ({"json_object": True}, None),
    ]
    for temperature in (0.0, 0.8):
        for constraint, pattern in cases:
            _, text, reason = generate(
                address, chat("Pick one."), max_new_tokens=32, temperature=temperature, seed=3, constraint=constraint
            )
            assert reason == common_pb2.FINISH_REASON_EOS, (constraint, text)
            if pattern is None:
                assert isinstance(json.loads(text), dict)
            else:
                assert re.fullmatch(pattern, text), (constraint, text)


def test_a_constrained_and_a_free_row_share_a_batch_and_the_free_one_is_unchanged(default_generation_address):
    address = default_generation_address
    prompt = chat("Tell me about the sea.")
    alone, _, _ = generate(address, prompt, max_new_tokens=24)
    schema = SCHEMAS[0]
    barrier = threading.Barrier(4)

    def free():
        barrier.wait()
        return generate(address, prompt, max_new_tokens=24)

    def constrained():
        barrier.wait()
        return generate(
            address, chat("A person as JSON."), max_new_tokens=48, constraint={"json_schema": json.dumps(schema)}
        )

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(free), pool.submit(constrained), pool.submit(free), pool.submit(constrained)]
        results = [f.result() for f in futures]
    for tokens, _, _ in results[0::2]:
        assert tokens == alone
    for _, text, reason in results[1::2]:
        assert reason == common_pb2.FINISH_REASON_EOS
        jsonschema.validate(json.loads(text), schema)


def test_max_new_tokens_cutting_a_constrained_answer_finishes_with_length(default_generation_address):
    _, text, reason = generate(
        default_generation_address,
        chat("A person."),
        max_new_tokens=3,
        constraint={"json_schema": json.dumps(SCHEMAS[0])},
    )
    assert reason == common_pb2.FINISH_REASON_LENGTH
    assert text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_logit_bias_minus_100_bans_a_token_and_plus_100_forces_one(default_generation_address):
    address = default_generation_address
    prompt = chat("Say hello.")
    free, _, _ = generate(address, prompt, max_new_tokens=4)
    banned, _, _ = generate(address, prompt, max_new_tokens=4, logit_bias={free[0]: -100.0})
    assert banned[0] != free[0]
    assert free[0] not in banned
    forced_id = 1234
    forced, _, _ = generate(address, prompt, max_new_tokens=4, logit_bias={forced_id: 100.0})
    assert forced == [forced_id] * 4
    # clamped: a bias of 1e9 is +100, and sampling still picks the forced token
    clamped, _, _ = generate(address, prompt, max_new_tokens=2, temperature=0.7, seed=1, logit_bias={forced_id: 1e9})
    assert clamped == [forced_id] * 2


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"constraint": {"json_schema": "{bad"}}, "constraint.json_schema: not valid JSON"),
        ({"constraint": {"json_schema": "[1, 2]"}}, "constraint.json_schema: a schema is a JSON object"),
        (
            {"constraint": {"json_schema": '{"type": "string", "pattern": "(?<=a)b"}'}},
            "constraint.json_schema: llguidance cannot compile it",
        ),
        ({"constraint": {"json_schema": '{"type": "string", "format": "tardis"}'}}, "Unknown format: tardis"),
        ({"constraint": {"regex": "[a-"}}, "constraint.regex: llguidance cannot compile it"),
        ({"constraint": {"gbnf": "root ::= missing"}}, "constraint.gbnf: llguidance cannot read it"),
        ({"constraint": {"lark": "start: x y"}}, "constraint.lark: llguidance cannot compile it"),
        ({"constraint": {"choice": {"options": []}}}, "constraint.choice: give at least one option"),
        ({"constraint": {"choice": {"options": ["a", ""]}}}, "constraint.choice: an option is empty"),
        ({"constraint": {}}, "constraint is set but empty"),
        ({"logit_bias": {99999: 5.0}}, "logit_bias: token id 99999 is outside the vocabulary of 49152"),
        (
            {"ignore_eos": True, "constraint": {"regex": "a+"}},
            "ignore_eos cannot be combined with a constraint",
        ),
    ],
)
def test_bad_constraints_and_biases_are_invalid_argument_naming_the_field(default_generation_address, params, expected):
    code, details = code_of(default_generation_address, max_new_tokens=4, **params)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in details, details


# -- the tiny model: a server of our own with a compiler we can slow down or bound ---------------------------


class SlowBackend:
    """llguidance, but a regex constraint containing "slow" takes ``delay`` s to compile."""

    def __init__(self, delay: float) -> None:
        from services.generation.engine.constraints import _LLGuidance

        self.inner, self.delay = _LLGuidance(), delay

    def tokenizer_for(self, *args):
        return self.inner.tokenizer_for(*args)

    def compile(self, spec: ConstraintSpec, tokenizer, eos_ids):
        if "slow" in spec.text:
            time.sleep(self.delay)
        return self.inner.compile(spec, tokenizer, eos_ids)


@pytest.fixture(scope="module")
def tiny_server(tiny_loaded):
    """(address, engine, compiler) for the tiny GPT-NeoX, its compiler bounded at 1.5 s, slow on "slow" regexes."""
    engine = start_engine(tiny_loaded, SchedulerConfig(max_concurrent_requests=8, prefix_cache_bytes=PREFIX_CACHE))
    compiler = ConstraintCompiler(timeout_s=1.5, backend=SlowBackend(1.0))
    running = start_generation_server(tiny_loaded, engine, "127.0.0.1:0", default_max_new_tokens=16, compiler=compiler)
    yield running.address, engine, compiler
    engine.shutdown(grace=1.0)
    running.stop(grace=1.0)
    compiler.close()


def test_the_tiny_model_honours_a_regex_and_the_compile_is_cached(tiny_server):
    address, _, compiler = tiny_server
    before = compiler.compiles
    for seed in range(3):
        _, text, reason = generate(
            address, "hello", max_new_tokens=24, temperature=1.0, seed=seed, constraint={"regex": "(ab|cd){2,4}x"}
        )
        assert reason == common_pb2.FINISH_REASON_EOS
        assert re.fullmatch("(ab|cd){2,4}x", text), text
    assert compiler.compiles == before + 1


def test_a_slow_compile_delays_only_its_own_request(tiny_server):
    address, _, _ = tiny_server
    done: dict[str, float] = {}
    started = time.monotonic()

    def slow():
        _, text, _ = generate(address, "hello", max_new_tokens=8, constraint={"regex": "slow [a-z]{3}"})
        done["slow"] = time.monotonic() - started
        assert re.fullmatch("slow [a-z]{3}", text)

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.2)  # the slow compile is under way
    generate(address, "hello", max_new_tokens=4)
    done["free"] = time.monotonic() - started
    thread.join()
    assert done["free"] < 0.9 < done["slow"], done


def test_a_compile_beyond_the_time_bound_is_refused(tiny_loaded):
    engine = start_engine(tiny_loaded, SchedulerConfig(max_concurrent_requests=4))
    compiler = ConstraintCompiler(timeout_s=1e-6)
    running = start_generation_server(tiny_loaded, engine, "127.0.0.1:0", compiler=compiler)
    try:
        code, details = code_of(running.address, constraint={"json_schema": json.dumps(SCHEMAS[8])})
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "constraint.json_schema: compiling it took longer than the server's bound" in details
    finally:
        engine.shutdown(grace=1.0)
        running.stop(grace=1.0)
        compiler.close()


def test_a_cancelled_constrained_request_frees_its_slot(tiny_server):
    address, engine, _ = tiny_server
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        call = stub.Generate(
            generation_pb2.GenerateRequest(
                text="hello", params={"max_new_tokens": 200, "constraint": {"regex": "[a-z ]{300}"}}
            )
        )
        first = next(call)
        assert first.token_ids
        assert wait_for(lambda: engine.active_sequences == 1)
        call.cancel()
    assert wait_for(lambda: engine.active_sequences == 0)


def test_a_compiled_grammar_belongs_to_one_tokenizer(tiny_loaded, tiny_llama):
    """After a hot swap the new model's tokenizer gets its own compile; the old one's stays cached."""
    compiler = ConstraintCompiler()
    spec = ConstraintSpec("regex", "[ab]{3}")
    first = compiler.compile(spec, tiny_loaded)
    second = compiler.compile(spec, tiny_llama)
    assert first is not second
    assert compiler.compile(spec, tiny_loaded) is first
    assert compiler.compiles == 2
    compiler.close()


# -- llama.cpp on the default GGUF ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llamacpp_default_address(default_registry):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make llamacpp`")
    loaded = load_model(DEFAULT_MODEL, default_registry, runner="llamacpp", threads=2)
    engine = start_engine(loaded, SchedulerConfig(max_concurrent_requests=16, prefix_cache_bytes=64 << 20))
    running = start_generation_server(loaded, engine, "127.0.0.1:0")
    yield running.address
    engine.shutdown(grace=1.0)
    running.stop(grace=1.0)


def test_llama_cpp_honours_json_schemas_and_a_regex(llamacpp_default_address):
    assert_schemas_hold(llamacpp_default_address, [SCHEMAS[0], SCHEMAS[6], SCHEMAS[8], SCHEMAS[16]])
    _, text, reason = generate(
        llamacpp_default_address, chat("Pick."), max_new_tokens=16, constraint={"choice": {"options": ["up", "down"]}}
    )
    assert reason == common_pb2.FINISH_REASON_EOS
    assert text in ("up", "down")
