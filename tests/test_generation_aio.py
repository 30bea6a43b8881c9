"""The generation server on grpc.aio: many raw-stub streams without a deadline, a stream whose client
cancels or hangs up gives its batch row back, the call limit still names its flag, and an open stream
holds no thread of its own."""

from __future__ import annotations

import re
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from conftest import wait_for
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.common.errors import SERVER_KEY
from services.common.server import ServerLimits

STREAMS = 64
LONG = 1000  # tokens a long stream asks for: far more than it makes before its client leaves


@pytest.fixture(scope="module")
def served(tiny_loaded):
    """A generation server of this module's own, with room for every stream: (address, engine)."""
    from services.generation.engine.scheduler import SchedulerConfig
    from services.generation.loading import start_engine
    from services.generation.server import start_generation_server

    engine = start_engine(
        tiny_loaded, SchedulerConfig(max_concurrent_requests=2 * STREAMS, prefix_cache_bytes=64 << 20)
    )
    running = start_generation_server(tiny_loaded, engine, "127.0.0.1:0", default_max_new_tokens=16)
    yield running, engine
    engine.shutdown(grace=1.0)
    running.stop(grace=1.0)


def request(max_new_tokens: int, request_id: str = "", text: str = "Zurich") -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        text=text,
        request_id=request_id,
        params=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def generated_when_cancelled(log_lines: list[str], request_id: str) -> int | None:
    """How many tokens the engine had made when it dropped ``request_id`` as cancelled (None: not yet)."""
    for line in log_lines:
        found = re.match(rf"request {request_id} cancelled: prompt=\d+ generated=(\d+)", line)
        if found:
            return int(found.group(1))
    return None


def test_64_raw_stub_streams_without_a_deadline_all_finish(served):
    running, engine = served
    with grpc.insecure_channel(running.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        # no deadline, as a raw stub sends them
        calls = [stub.Generate(request(8 + n % 8, text=f"Zurich {n}")) for n in range(STREAMS)]
        pool = ThreadPoolExecutor(STREAMS)
        try:
            results = [future.result(timeout=120) for future in [pool.submit(list, call) for call in calls]]
        finally:
            for call in calls:
                call.cancel()  # a stream that hangs fails the test instead of hanging it
            pool.shutdown()
    for n, (call, messages) in enumerate(zip(calls, results, strict=True)):
        finish = messages[-1].finish
        assert finish.reason == common_pb2.FINISH_REASON_LENGTH
        assert len([i for m in messages for i in m.token_ids]) == finish.generated_tokens == 8 + n % 8
        assert (SERVER_KEY, f"127.0.0.1:{running.port}") in call.initial_metadata()
    assert wait_for(lambda: engine.active_sequences == 0)


@pytest.mark.parametrize("leave", ["cancel", "hang_up"])
def test_a_stream_the_client_leaves_frees_its_row_at_the_next_step(served, log_lines, leave):
    """Cancelling the call, or closing the channel mid-stream."""
    running, engine = served
    request_id = f"{leave}-stream"
    channel = grpc.insecure_channel(running.address)
    try:
        call = generation_pb2_grpc.GenerationStub(channel).Generate(request(LONG, request_id))
        next(call)
        assert engine.active_sequences == 1
        if leave == "cancel":
            call.cancel()
        else:
            channel.close()
        assert wait_for(lambda: engine.active_sequences == 0)
    finally:
        channel.close()
    assert wait_for(lambda: generated_when_cancelled(log_lines, request_id) is not None)
    assert generated_when_cancelled(log_lines, request_id) < LONG


def test_open_streams_hold_no_thread_each(tiny_loaded, served):
    from services.generation.server import start_generation_server

    _, engine = served
    fresh = start_generation_server(tiny_loaded, engine, "127.0.0.1:0")  # no threads left from other tests
    try:
        with grpc.insecure_channel(fresh.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            list(stub.Generate(request(2)))  # the channel's and the server's own threads are up
            idle = threading.active_count()
            calls = [stub.Generate(request(LONG)) for _ in range(32)]
            try:
                for call in calls:
                    next(call)
                assert engine.active_sequences == 32
                during = threading.active_count()
            finally:
                for call in calls:
                    call.cancel()
        assert wait_for(lambda: engine.active_sequences == 0)
    finally:
        fresh.stop(grace=0)
    assert during < idle + 8, f"{during - idle} more threads with 32 streams open"


def test_calls_beyond_the_concurrent_limit_are_resource_exhausted_naming_the_flag(tiny_loaded, served):
    from services.generation.server import start_generation_server

    _, engine = served
    limited = start_generation_server(tiny_loaded, engine, "127.0.0.1:0", limits=ServerLimits(max_concurrent_rpcs=2))
    try:
        with grpc.insecure_channel(limited.address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            long_streams = [stub.Generate(request(LONG)) for _ in range(2)]
            for call in long_streams:
                next(call)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(request(1), timeout=30))
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            for call in long_streams:
                call.cancel()
            assert wait_for(lambda: engine.active_sequences == 0)
            after = stub.Tokenize(generation_pb2.TokenizeRequest(text="Zurich"), timeout=30)
    finally:
        limited.stop(grace=0)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 2 concurrent calls (--max-concurrent-rpcs)" in caught.value.details()
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert after.token_count > 0


def test_a_repeated_prompt_reports_its_cached_prompt_tokens(served):
    running, _ = served
    text = "Where is Zurich? " * 8
    with grpc.insecure_channel(running.address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        first = list(stub.Generate(request(4, text=text), timeout=60))
        again = list(stub.Generate(request(4, text=text), timeout=60))
    assert first[0].cached_prompt_tokens == first[-1].finish.cached_prompt_tokens == 0
    cached = again[0].cached_prompt_tokens
    assert 0 < cached < again[-1].finish.prompt_tokens
    assert again[-1].finish.cached_prompt_tokens == cached
    assert all(m.cached_prompt_tokens == 0 for m in again[1:])
