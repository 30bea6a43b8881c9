"""Publishing to a running generation server (nightcap.v1.ModelAdmin): a swap under load fails no request and
never mixes versions in a stream; a bad version is refused and the old one keeps answering; rollback."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nightcap.v1 import admin_pb2, admin_pb2_grpc, common_pb2, generation_pb2, generation_pb2_grpc
from services.common.registry import ModelRegistry
from services.generation.engine.request import Request, TokenChunk
from services.generation.engine.sampling import SamplingConfig
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.host import ModelHost
from services.generation.loading import load_model, start_engine
from services.generation.server import serve_model_host

STREAMS = 16
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def registry(tiny_model_dir: Path, tmp_path_factory) -> ModelRegistry:
    """tiny:1 (the tiny model), tiny:2 (different weights), tiny:3 (its weights altered after publishing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("var") / "models"
    registry = ModelRegistry(root)
    registry.publish_version("tiny", tiny_model_dir, "openchatkit", "test:a")
    other = tmp_path_factory.mktemp("other")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(7)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(other)
    registry.publish_version("tiny", other, "openchatkit", "test:b")
    corrupt = registry.publish_version("tiny", other, "openchatkit", "test:c")
    weights = corrupt.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight: loadable, but not what was published
    weights.write_bytes(bytes(data))
    return registry


class Served:
    def __init__(self, registry: ModelRegistry, load=None) -> None:
        loaded = load_model("tiny:1", registry)
        engine = start_engine(loaded, SchedulerConfig(max_concurrent_requests=64))
        self.host = ModelHost(loaded, engine, registry, load=load or (lambda spec: load_model(spec, registry)))
        self.running = serve_model_host(self.host, "127.0.0.1:0")
        self.channel = grpc.insecure_channel(self.running.address)
        self.generation = generation_pb2_grpc.GenerationStub(self.channel)
        self.admin = admin_pb2_grpc.ModelAdminStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.host.shutdown(1.0)
        self.running.stop(1.0)


@pytest.fixture
def served(registry):
    server = Served(registry)
    yield server
    server.close()


def prompts() -> list[list[int]]:
    return [[(7 * i + j) % 300 + 1 for j in range(3 + i % 5)] for i in range(STREAMS)]


def greedy_alone(spec: str, registry: ModelRegistry, prompt_ids: list[list[int]]) -> list[list[int]]:
    """What ``spec`` alone produces for each prompt: its own engine, no swap (greedy tokens do not depend on the
    batch, as test_engine checks, so the prompts run together)."""
    engine = start_engine(load_model(spec, registry))
    try:
        config = SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
        requests = [engine.submit(Request(ids, config)) for ids in prompt_ids]
        return [[t for e in r.events() if isinstance(e, TokenChunk) for t in e.token_ids] for r in requests]
    finally:
        engine.shutdown(1.0)


def generate(stub, ids: list[int], on_token=None) -> tuple[str, list[int], float]:
    """(the model named on the first message, every token, when the last one arrived); raw stub, no deadline."""
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids),
        params=common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
    )
    model, tokens, last = "", [], 0.0
    for message in stub.Generate(request):
        model = model or message.model
        tokens.extend(message.token_ids)
        if message.token_ids:
            last = time.monotonic()
            if on_token:
                on_token()
    return model, tokens, last


def load(served: Served, spec: str, mode=admin_pb2.SWAP_MODE_BESIDE) -> list[admin_pb2.LoadProgress]:
    return list(served.admin.LoadVersion(admin_pb2.LoadVersionRequest(model=spec, mode=mode)))


@pytest.mark.parametrize("mode", [admin_pb2.SWAP_MODE_BESIDE, admin_pb2.SWAP_MODE_IN_PLACE], ids=["beside", "in-place"])
def test_a_swap_under_16_streams_fails_none_and_never_mixes_versions(served, registry, mode):
    ids = prompts()
    old_alone, new_alone = greedy_alone("tiny:1", registry, ids), greedy_alone("tiny:2", registry, ids)
    assert old_alone != new_alone
    results: dict[int, tuple[str, list[int], float]] = {}
    errors: list[BaseException] = []
    started = threading.Semaphore(0)

    def stream(i: int) -> None:
        first = threading.Event()

        def on_token() -> None:
            if not first.is_set():
                first.set()
                started.release()

        try:
            results[i] = generate(served.generation, ids[i], on_token)
        except grpc.RpcError as error:
            errors.append(error)
            started.release()

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    for _ in range(STREAMS):
        assert started.acquire(timeout=60)  # every stream is running before the load starts

    progress = load(served, "tiny:2", mode)
    switched = time.monotonic()
    with ThreadPoolExecutor(4) as pool:  # requests after the switch
        after = list(pool.map(lambda i: generate(served.generation, ids[i]), range(4)))
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert [p.stage for p in progress][-1] == "done" and progress[-1].model == "tiny:2"
    for i in range(STREAMS):
        model, tokens, _ = results[i]
        assert (model, tokens) == ("tiny:1", old_alone[i]), f"stream {i} mixed versions or changed"
    if mode == admin_pb2.SWAP_MODE_BESIDE:  # in place, the old streams finish before the new version loads
        assert max(last for _, _, last in results.values()) > switched - progress[-1].swap_seconds
    assert [(m, t) for m, t, _ in after] == [("tiny:2", new_alone[i]) for i in range(4)]
    info = served.generation.ModelInfo(generation_pb2.ModelInfoRequest())
    assert (info.name, info.version) == ("tiny", "2")


def test_a_corrupted_version_is_refused_and_the_served_one_keeps_answering(served):
    with pytest.raises(grpc.RpcError) as refused:
        load(served, "tiny:3")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "changed since publishing" in refused.value.details()

    assert served.admin.ActiveVersion(admin_pb2.ActiveVersionRequest()).model == "tiny:1"
    assert generate(served.generation, [1, 2, 3])[0] == "tiny:1"
    check = served.health.Check(health_pb2.HealthCheckRequest(service="nightcap.v1.Generation"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as unknown:
        load(served, "nope:1")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_rollback_restores_the_previous_version_and_the_history_records_both(served):
    with pytest.raises(grpc.RpcError) as nothing:
        list(served.admin.Rollback(admin_pb2.RollbackRequest()))
    assert nothing.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nothing to roll back to" in nothing.value.details()

    load(served, "tiny:2")
    assert generate(served.generation, [1, 2, 3])[0] == "tiny:2"
    list(served.admin.Rollback(admin_pb2.RollbackRequest()))

    assert served.generation.ModelInfo(generation_pb2.ModelInfoRequest()).version == "1"
    assert generate(served.generation, [1, 2, 3])[0] == "tiny:1"
    listing = served.admin.ListVersions(admin_pb2.ListVersionsRequest(name="tiny"))
    assert [(v.version, v.active) for v in listing.versions] == [("2", False), ("1", True)]  # 3 is damaged
    tail = [(p.action, p.model, p.previous) for p in listing.promotions][-2:]
    assert tail == [("promote", "tiny:2", "tiny:1"), ("rollback", "tiny:1", "tiny:2")]
    metrics = served.host.metrics.registry
    assert metrics.get_sample_value("nightcap_generation_active_version", {"model": "tiny:1"}) == 1
    assert metrics.get_sample_value("nightcap_generation_active_version", {"model": "tiny:2"}) == 0
    assert metrics.get_sample_value("nightcap_generation_swap_duration_seconds_count") == 2


def test_a_second_load_while_one_runs_is_refused(registry):
    entered, release = threading.Event(), threading.Event()

    def slow_load(spec: str):  # the fault injected: a load that takes until the test says so
        entered.set()
        release.wait(30)
        return load_model(spec, registry)

    server = Served(registry, load=slow_load)
    try:
        first = threading.Thread(target=load, args=(server, "tiny:2"))
        first.start()
        assert entered.wait(30)
        with pytest.raises(grpc.RpcError) as busy:
            load(server, "tiny:1")
        assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "in progress" in busy.value.details()
        assert server.admin.ActiveVersion(admin_pb2.ActiveVersionRequest()).loading == "tiny:2"
        release.set()
        first.join(30)
        assert server.admin.ActiveVersion(admin_pb2.ActiveVersionRequest()).model == "tiny:2"
    finally:
        release.set()
        server.close()


def test_chatctl_model_publishes_lists_and_rolls_back(served):
    from test_chatctl import chatctl

    address = ["--address", served.running.address]
    published = chatctl("model", "publish", "tiny:2", *address)
    assert published.returncode == 0, published.stderr
    assert "tiny:2 serves new requests (was tiny:1" in published.stdout

    listing = chatctl("model", "list", *address)
    assert "* tiny:2" in listing.stdout and "promote  tiny:1 -> tiny:2" in listing.stdout

    assert chatctl("model", "rollback", *address).returncode == 0
    status = chatctl("model", "status", *address)
    assert "serving   tiny:1" in status.stdout and "previous  tiny:2" in status.stdout
    again = chatctl("model", "rollback", *address)
    assert again.returncode == 1 and "nothing to roll back to" in again.stderr


def test_the_orchestrator_reports_the_new_version_after_a_switch(served):
    from conftest import start_orchestrator

    from clients import ChatClient, ChatStarted, SamplingParams

    orchestrator = start_orchestrator(served.running.address, None)
    try:
        with ChatClient(orchestrator.address, timeout=60) as client:

            def model_of_a_turn() -> str:
                events = client.chat("Where is Zurich?", params=SamplingParams(max_new_tokens=4, temperature=0.0))
                return next(e for e in events if isinstance(e, ChatStarted)).model

            assert model_of_a_turn() == "tiny:1"
            load(served, "tiny:2")
            assert model_of_a_turn() == "tiny:2"
            assert client.status().model["version"] == "2"
    finally:
        orchestrator.stop(grace=1.0)
