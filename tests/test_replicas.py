"""Generation replicas behind one orchestrator: gRPC round_robin with health checks spreads the chats,
and a replica killed with SIGKILL costs only the requests it was running."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import wait_for
from test_orchestrator import CountedGeneration, GenerationCalls, chat_server

from clients import SamplingParams
from clients.client import NightcapError, check_health
from nightcap.v1 import chat_pb2, chat_pb2_grpc
from services.common.channels import channel_target
from services.common.server import free_port

REPO_ROOT = Path(__file__).resolve().parents[1]


def _health(address: str) -> str:
    try:
        return check_health(address, timeout=1)
    except NightcapError as error:
        return error.code.name


@pytest.fixture
def two_replicas(tiny_model_dir: Path, tmp_path: Path) -> Iterator[list[tuple[str, subprocess.Popen]]]:
    """Two generation processes serving the tiny model: [(address, process), ...]."""
    replicas = []
    for n in range(2):
        address = f"127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "services.generation", "serve", "--model", str(tiny_model_dir)]
        command += ["--address", address, "--metrics-address", "", "--var-dir", str(tmp_path / "var")]
        log = open(tmp_path / f"generation-{n}.log", "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=os.environ)
        replicas.append((address, process))
    try:
        for n, (address, _) in enumerate(replicas):
            serving = wait_for(lambda a=address: _health(a) == "SERVING", timeout=120)
            assert serving, (tmp_path / f"generation-{n}.log").read_text()[-2000:]
        yield replicas
    finally:
        for _, process in replicas:
            process.kill()
            process.wait(10)


def _chat(stub: chat_pb2_grpc.ChatStub, max_new_tokens: int, on_delta=None) -> list[chat_pb2.ChatResponse]:
    request = chat_pb2.ChatRequest(
        message="Tell me about Zurich.", params={"max_new_tokens": max_new_tokens, "ignore_eos": True}
    )
    responses = []
    for response in stub.Chat(request, timeout=120):
        responses.append(response)
        if on_delta is not None and response.HasField("delta"):
            on_delta()
            on_delta = None
    return responses


def test_a_list_of_ips_is_one_round_robin_target_and_names_are_refused():
    assert channel_target("127.0.0.1:1") == "127.0.0.1:1"
    assert channel_target("127.0.0.1:1, 127.0.0.1:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("[::1]:1,[::1]:2") == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="one DNS name that resolves to every replica"):
        channel_target("gen-a:1,gen-b:2")


def test_two_replicas_share_the_chats_and_a_killed_one_costs_only_its_running_requests(two_replicas, log_lines):
    from services.orchestrator.server import start_chat_server

    addresses = [address for address, _ in two_replicas]
    orchestrator = start_chat_server(",".join(addresses), None, "127.0.0.1:0", backend_timeout=10)
    try:
        with grpc.insecure_channel(orchestrator.address) as channel:
            stub = chat_pb2_grpc.ChatStub(channel)
            for _ in range(6):
                assert _chat(stub, 2)[-1].HasField("end")
            # each replica logs one line per request it served (with the request id)
            served = {a: sum(f"replica {a}" in line for line in log_lines) for a in addresses}

            # long chats on both replicas, then SIGKILL the first while they stream
            started = threading.Semaphore(0)
            outcomes: list[tuple[str, str]] = []

            def long_chat() -> None:
                try:
                    _chat(stub, 900, on_delta=started.release)
                    outcomes.append(("OK", ""))
                except grpc.RpcError as error:
                    started.release()
                    outcomes.append((error.code().name, error.details()))

            threads = [threading.Thread(target=long_chat) for _ in range(6)]
            for thread in threads:
                thread.start()
            for _ in threads:
                assert started.acquire(timeout=60)
            killed_address, killed = two_replicas[0]
            killed.kill()
            for thread in threads:
                thread.join(120)
            later = [_chat(stub, 2) for _ in range(8)]
    finally:
        orchestrator.stop(grace=0)
    assert all(count > 0 for count in served.values()), served
    failed = [details for code, details in outcomes if code != "OK"]
    assert len(outcomes) == 6 and 0 < len(failed) < 6, outcomes
    assert all(code in ("OK", "UNAVAILABLE") for code, _ in outcomes), outcomes
    assert all(f"the generation service at {killed_address} failed" in details for details in failed), failed
    assert all(responses[-1].HasField("end") for responses in later)


def test_chat_turns_make_no_tokenize_call_and_generate_spreads_over_both_replicas(two_replicas):
    """With one ModelInfo in all and no Tokenize, nothing alternates with Generate on the round-robin channel (a
    lookup per turn did, and sent every Generate to the same replica)."""
    from services.orchestrator.conversation import ChatOrchestrator

    addresses = [address for address, _ in two_replicas]
    calls = GenerationCalls()
    orchestrator = ChatOrchestrator(CountedGeneration(",".join(addresses), calls), None, backend_timeout=10)
    with chat_server(orchestrator) as client:
        for n in range(8):
            reply = client.ask(f"Where is Zurich? ({n})", params=SamplingParams(max_new_tokens=2, temperature=0.0))
            assert reply.finished.completion_tokens > 0
    assert calls.count("Tokenize") == 0
    assert calls.count("ModelInfo") == 1
    assert calls.count("Generate") == 8
    served = {address: calls.replicas.count(address) for address in addresses}
    assert sum(served.values()) == 8 and all(count >= 2 for count in served.values()), served
