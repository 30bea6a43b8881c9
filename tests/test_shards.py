"""Tensor parallelism for real: `serve --num-shard 2` on two CPU processes over gloo, against one rank.

Each 2-rank service is a real subprocess tree (rank 0 serves gRPC and starts rank 1), talked to through
raw generated stubs, as outsiders use it.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import build_tiny_llama
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoConfig

from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.common.errors import FailedPrecondition
from services.common.registry import ModelRegistry
from services.common.server import free_port
from services.generation.engine.request import Request, TokenChunk
from services.generation.engine.sampling import SamplingConfig
from services.generation.loading import load_model, start_engine
from services.generation.shards import check_shardable

SHARD_TIMEOUT = 10

# (prompt, new tokens, extra sampling params): mixed lengths, two seeded samplers among greedy rows
CASES = [
    ([5, 6, 7, 8], 24, {}),
    (list(range(30, 70)), 6, {}),
    ([9], 40, {"temperature": 0.9, "top_k": 40, "seed": 11}),
    (list(range(100, 117)), 15, {}),
    ([3, 1, 4, 1, 5, 9, 2, 6], 30, {"temperature": 1.2, "top_p": 0.9, "seed": 5}),
    ([200, 201, 420], 12, {}),  # ids past half the vocabulary: rank 0 holds only half the embedding rows
]


class ShardedServer:
    """`python -m services.generation serve --num-shard 2` on a free port, with its log."""

    def __init__(self, model: Path, log: Path, num_shard: int = 2, *extra: str) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log_path = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.generation", "serve", "--model", str(model), "--address", self.address,
             "--metrics-address", "", "--num-shard", str(num_shard), "--shard-timeout", str(SHARD_TIMEOUT),
             "--threads", "1", "--grace", "2", *extra],
            stdout=log.open("w"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.channel = grpc.insecure_channel(self.address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def wait_ready(self) -> ShardedServer:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=180)
        except grpc.FutureTimeoutError:
            raise AssertionError(f"the sharded service did not start:\n{self.log()}") from None
        return self

    def ranks(self) -> list[psutil.Process]:
        return psutil.Process(self.process.pid).children()

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        self.channel.close()
        children = self.ranks() if self.process.poll() is None else []
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for child in children:
            if child.is_running():
                child.kill()


def generate(stub, prompt: list[int], new_tokens: int, **params):
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt),
        params=common_pb2.SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **params),
    )
    return stub.Generate(request, timeout=120)


def one_rank_tokens(folder: Path, registry: Path) -> list[list[int]]:
    """Each case alone on an ordinary single-process engine."""
    engine = start_engine(load_model(str(folder), ModelRegistry(registry)))
    try:
        results = []
        for prompt, new_tokens, extra in CASES:
            request = engine.submit(
                Request(prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True, **extra))
            )
            results.append([i for e in request.events(timeout=60) if isinstance(e, TokenChunk) for i in e.token_ids])
        return results
    finally:
        engine.shutdown(grace=1)


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(params=["gpt_neox", "llama"])
def model_dir(request, tiny_model_dir, tiny_llama_dir) -> Path:
    return tiny_model_dir if request.param == "gpt_neox" else tiny_llama_dir


def test_two_ranks_give_one_ranks_tokens_through_joins_leaves_and_a_cancel(model_dir, tmp_path):
    expected = one_rank_tokens(model_dir, tmp_path / "registry")
    server = ShardedServer(model_dir, tmp_path / "serve.log").wait_ready()
    try:
        results: list[list[int] | None] = [None] * len(CASES)

        def client(row: int) -> None:
            prompt, new_tokens, extra = CASES[row]
            results[row] = [i for r in generate(server.stub, prompt, new_tokens, **extra) for i in r.token_ids]

        threads = [threading.Thread(target=client, args=(row,)) for row in range(len(CASES))]
        cancelled = generate(server.stub, [7, 7, 7], 500)
        next(cancelled)  # decoding before the others arrive
        for thread in threads:
            thread.start()
            time.sleep(0.05)  # they arrive while others run: joins at different steps
        time.sleep(0.2)
        cancelled.cancel()  # leaves mid-batch; everyone else must be unaffected
        for thread in threads:
            thread.join(120)
        # again, one by one: every prompt is now in the prefix cache, which both ranks hold alike
        # one at a time, the rows also draft from their prompts (serve's default): drafts scored on both ranks
        again, cached, kept = [], [], 0
        for prompt, new_tokens, extra in CASES:
            messages = list(generate(server.stub, prompt, new_tokens, **extra))
            again.append([i for m in messages for i in m.token_ids])
            cached.append(messages[0].cached_prompt_tokens)
            kept += messages[-1].finish.accepted_draft_tokens
        (rank1,) = server.ranks()
        # each rank holds its own copy of its shard, not a map of the whole checkpoint file
        mapped = [m.path for rank in (psutil.Process(server.process.pid), rank1) for m in rank.memory_maps()]
        server.process.terminate()  # SIGTERM: rank 0 drains, tells rank 1 to stop, both exit cleanly
        assert server.process.wait(60) == 0
        rank1.wait(30)  # raises if rank 1 outlives rank 0 (psutil cannot read a grandchild's exit code)
        log = server.log()
    finally:
        server.stop()
    assert results == expected, log
    assert again == expected, log
    assert kept > 0
    assert cached == [len(prompt) - 1 for prompt, _, _ in CASES]
    assert not [path for path in mapped if path.endswith(".safetensors")]
    assert "rank 1/2 joined the gloo group" in log
    assert "rank 1 stops after" in log  # it left its loop when told to, not by an error


def test_a_killed_rank_ends_the_service_within_its_timeout(tiny_model_dir, tmp_path):
    server = ShardedServer(tiny_model_dir, tmp_path / "serve.log").wait_ready()
    try:
        (rank1,) = server.ranks()
        stream = generate(server.stub, [1, 2, 3], 900)
        next(stream)
        health = health_pb2_grpc.HealthStub(server.channel)
        killed = time.monotonic()
        rank1.kill()
        with pytest.raises(grpc.RpcError) as caught:
            list(stream)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shard" in caught.value.details()
        try:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        except grpc.RpcError as error:  # or the server is already gone, or stopping: grpc.aio's stop cancels
            assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        exit_code = server.process.wait(SHARD_TIMEOUT + 15)
        assert time.monotonic() - killed < SHARD_TIMEOUT + 15
        assert exit_code != 0
    finally:
        server.stop()


def test_an_idle_service_notices_a_dead_rank_and_a_rank_notices_a_dead_rank0(tiny_model_dir, tmp_path):
    server = ShardedServer(tiny_model_dir, tmp_path / "serve.log").wait_ready()
    try:
        (rank1,) = server.ranks()
        server.process.kill()  # rank 0 vanishes without a word: rank 1 must not wait forever
        rank1.wait(SHARD_TIMEOUT + 15)  # raises psutil.TimeoutExpired if it hangs on
    finally:
        server.stop()
    assert "rank 1 stops:" in server.log()  # it failed its broadcast (and exits 1), it did not wait forever


def test_a_model_the_ranks_cannot_split_is_refused_at_start_naming_it(tiny_model_dir, tmp_path):
    server = ShardedServer(tiny_model_dir, tmp_path / "serve.log", num_shard=3)  # 4 heads
    try:
        assert server.process.wait(180) == 2
        log = server.log()
    finally:
        server.stop()
    assert "GPTNeoXForCausalLM has num_attention_heads=4, which --num-shard 3 does not divide" in log
    assert "started rank" not in log  # refused before any rank was started


def test_external_ranks_without_a_port_to_tell_them_are_refused_at_start(tiny_model_dir, tmp_path):
    server = ShardedServer(tiny_model_dir, tmp_path / "serve.log", 2, "--shard-launch", "external")
    try:
        assert server.process.wait(180) == 2
        log = server.log()
    finally:
        server.stop()
    assert "--shard-launch external needs --shard-master-port" in log
    assert "started rank" not in log


def test_an_architecture_without_a_plan_is_named_in_the_error():
    config = AutoConfig.for_model("gpt2")
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(FailedPrecondition, match=r"GPT2LMHeadModel has no tensor-parallel plan.*--num-shard 2"):
        check_shardable(config, 2)
