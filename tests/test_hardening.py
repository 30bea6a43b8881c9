"""The faults an outside client found, each pinned down: raw stubs without a deadline, invalid UTF-8,
oversized input, floods of calls, backends that restart, and errors that name the service that failed."""

from __future__ import annotations

import contextlib
import time

import grpc
import pytest
from conftest import start_orchestrator, wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients import ChatClient, NightcapError, SamplingParams
from clients.client import check_health
from nightcap.v1 import chat_pb2, chat_pb2_grpc, generation_pb2, retrieval_pb2
from services.common.server import ServerLimits, free_port

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
# A lone UTF-16 surrogate as a JavaScript protobuf encoder writes it: three bytes that are not UTF-8.
LONE_SURROGATE = b"\xed\xa0\x80"
PLACEHOLDER = "@@@"  # as long as LONE_SURROGATE, so every length prefix stays right when it is swapped in


def test_a_raw_stub_chat_without_a_deadline_answers(orchestrator_address):
    with grpc.insecure_channel(orchestrator_address) as channel:
        responses = list(
            chat_pb2_grpc.ChatStub(channel).Chat(
                chat_pb2.ChatRequest(message="Where is Zurich?", params={"max_new_tokens": 8, "temperature": 0})
            )
        )
    assert responses[0].HasField("start")
    assert responses[-1].HasField("end") and responses[-1].end.completion_tokens > 0


def test_cancelling_a_chat_without_a_deadline_is_logged_as_cancelled(orchestrator_address, log_lines):
    with grpc.insecure_channel(orchestrator_address) as channel:
        call = chat_pb2_grpc.ChatStub(channel).Chat(
            chat_pb2.ChatRequest(message="Tell me about Zurich.", params={"max_new_tokens": 400})
        )
        next(call)  # start
        next(call)  # a first delta: generation is running
        call.cancel()
        assert wait_for(lambda: any("CANCELLED by its client" in line for line in log_lines))
    assert not any("DEADLINE_EXCEEDED" in line for line in log_lines)


def _with_lone_surrogate(message) -> bytes:
    data = message.SerializeToString()
    assert data.count(PLACEHOLDER.encode()) == 1
    return data.replace(PLACEHOLDER.encode(), LONE_SURROGATE)


def _raw_call(address: str, method: str, data: bytes, streaming: bool) -> grpc.RpcError:
    """Sends ``data`` as it is (no serializer), as a client in another language would."""
    with grpc.insecure_channel(address) as channel:
        if streaming:
            call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                list(call(data, timeout=30))
        else:
            call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as caught:
                call(data, timeout=30)
    return caught.value


@pytest.mark.parametrize(
    ("service", "method", "message", "field", "streaming"),
    [
        ("orchestrator", "/nightcap.v1.Chat/Chat", chat_pb2.ChatRequest(message=PLACEHOLDER), "message", True),
        (
            "orchestrator",
            "/nightcap.v1.Chat/Chat",
            chat_pb2.ChatRequest(
                message="Hi",
                history=[
                    chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content="Hello"),
                    chat_pb2.ChatMessage(role=chat_pb2.ROLE_ASSISTANT, content=PLACEHOLDER),
                ],
            ),
            "history[1].content",
            True,
        ),
        (
            "generation",
            "/nightcap.v1.Generation/Generate",
            generation_pb2.GenerateRequest(text=PLACEHOLDER),
            "text",
            True,
        ),
        (
            "generation",
            "/nightcap.v1.Generation/Tokenize",
            generation_pb2.TokenizeRequest(text=PLACEHOLDER),
            "text",
            False,
        ),
        (
            "retrieval",
            "/nightcap.v1.Retrieval/Search",
            retrieval_pb2.SearchRequest(query=PLACEHOLDER, k=2),
            "query",
            False,
        ),
    ],
)
def test_invalid_utf8_is_invalid_argument_naming_the_field_on_every_service(
    orchestrator_address, generation_address, retrieval_address, service, method, message, field, streaming
):
    address = {"orchestrator": orchestrator_address, "generation": generation_address}.get(service, retrieval_address)
    error = _raw_call(address, method, _with_lone_surrogate(message), streaming)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"field {field} is not valid UTF-8" in error.details()
    assert check_health(address) == "SERVING"


def test_an_oversized_message_is_refused_by_its_bytes_before_it_is_read(orchestrator_address, log_lines):
    with ChatClient(orchestrator_address, timeout=60) as client, pytest.raises(NightcapError) as caught:
        client.ask("Zurich " * 300_000, params=GREEDY)  # 2.1 MB: 300k tokens if it were tokenized
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "--max-input-bytes" in caught.value.message and "2,100,0" in caught.value.message
    assert not any("Tokenize" in line for line in log_lines)


def test_calls_beyond_the_concurrent_limit_are_resource_exhausted_and_health_still_answers(
    generation_address, retrieval_address
):
    from services.orchestrator.server import start_chat_server

    running = start_chat_server(
        generation_address, None, "127.0.0.1:0", limits=ServerLimits(max_concurrent_rpcs=2), backend_timeout=5
    )
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = chat_pb2_grpc.ChatStub(channel)
            long_chats = [
                stub.Chat(chat_pb2.ChatRequest(message="Tell me about Zurich.", params={"max_new_tokens": 400}))
                for _ in range(2)
            ]
            for call in long_chats:
                next(call)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Chat(chat_pb2.ChatRequest(message="Hi", params={"max_new_tokens": 1}), timeout=30))
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            for call in long_chats:
                call.cancel()
            time.sleep(0.5)
            after = list(stub.Chat(chat_pb2.ChatRequest(message="Hi", params={"max_new_tokens": 1}), timeout=30))
    finally:
        running.stop(grace=0)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 2 concurrent calls (--max-concurrent-rpcs)" in caught.value.details()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert after[-1].HasField("end")


def test_generation_down_names_generation_not_the_orchestrator(retrieval_address):
    dead = f"127.0.0.1:{free_port()}"
    running = start_orchestrator(dead, retrieval_address)
    try:
        with ChatClient(running.address, timeout=30) as client, pytest.raises(NightcapError) as caught:
            client.ask("Where is Zurich?")
    finally:
        running.stop(grace=1)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.message.startswith(f"the generation service at {dead} failed")
    assert "cannot reach the nightcap orchestrator" not in caught.value.message


def _fail_for(seconds: float, call) -> None:
    """Keeps calling while the backend is down, so the orchestrator's channel backs off as it would."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(NightcapError, grpc.RpcError):
            call()
        time.sleep(0.2)


def _chat_once(address: str, retrieval: bool = False) -> list[chat_pb2.ChatResponse]:
    with grpc.insecure_channel(address) as channel:
        request = chat_pb2.ChatRequest(
            message="Where is Zurich?", retrieval=retrieval, params={"max_new_tokens": 4, "temperature": 0}
        )
        return list(chat_pb2_grpc.ChatStub(channel).Chat(request, timeout=30))


def test_a_restarted_generation_is_used_as_soon_as_it_reports_serving(tiny_loaded):
    from services.generation.engine.scheduler import SchedulerConfig
    from services.generation.loading import start_engine
    from services.generation.server import start_generation_server

    address = f"127.0.0.1:{free_port()}"

    def start():
        engine = start_engine(tiny_loaded, SchedulerConfig(max_concurrent_requests=8))
        return engine, start_generation_server(tiny_loaded, engine, address)

    engine, generation = start()
    orchestrator = start_chat_server_quick(address, None)
    try:
        assert _chat_once(orchestrator.address)[-1].HasField("end")
        generation.stop(grace=0)
        engine.shutdown(grace=0)
        _fail_for(8.0, lambda: _chat_once(orchestrator.address))
        engine, generation = start()
        assert wait_for(lambda: check_health(address) == "SERVING")
        responses = _chat_once(orchestrator.address)
    finally:
        orchestrator.stop(grace=0)
        generation.stop(grace=0)
        engine.shutdown(grace=0)
    assert responses[-1].HasField("end") and responses[-1].end.completion_tokens > 0


def test_a_restarted_retrieval_gives_sources_as_soon_as_it_reports_serving(generation_address, small_index, embedder):
    from services.retrieval.index import load_index
    from services.retrieval.retriever import Retriever
    from services.retrieval.server import start_retrieval_server

    var_dir, name = small_index
    address = f"127.0.0.1:{free_port()}"
    index = load_index(var_dir / "indexes" / name)
    retrieval = start_retrieval_server(Retriever(embedder, index), address)
    orchestrator = start_chat_server_quick(generation_address, address)
    try:
        assert len(_chat_once(orchestrator.address, retrieval=True)[0].start.sources) > 0
        retrieval.stop(grace=0)
        _fail_for(8.0, lambda: _chat_once(orchestrator.address, retrieval=True))
        retrieval = start_retrieval_server(Retriever(embedder, index), address)
        assert wait_for(lambda: check_health(address) == "SERVING")
        responses = _chat_once(orchestrator.address, retrieval=True)
    finally:
        orchestrator.stop(grace=0)
        retrieval.stop(grace=0)
        index.close()
    assert [p.title for p in responses[0].start.sources][:1] == ["Zurich"]
    assert responses[-1].end.context_used


def start_chat_server_quick(generation: str, retrieval: str | None):
    from services.orchestrator.server import start_chat_server

    return start_chat_server(generation, retrieval, "127.0.0.1:0", default_max_new_tokens=8, backend_timeout=5)


def test_a_service_started_on_a_taken_port_exits_2_naming_the_address(tiny_model_dir, tmp_path):
    """grpcio raises RuntimeError for a port it cannot bind: each service turns it into one line and exit 2,
    never a traceback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        commands = {
            "orchestrator": ["-m", "services.orchestrator", "serve", "--address", address],
            "generation": [
                "-m",
                "services.generation",
                "serve",
                "--address",
                address,
                "--model",
                str(tiny_model_dir),
                "--metrics-address",
                "",
                "--var-dir",
                str(tmp_path),
            ],
        }
        for name, args in commands.items():
            done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180)
            assert done.returncode == 2, (name, done.stderr[-2000:])
            assert f"could not bind {address}" in done.stderr, (name, done.stderr[-2000:])
            assert "Traceback" not in done.stderr, name
