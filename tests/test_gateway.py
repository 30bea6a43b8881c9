"""The HTTP gateway's contract, spoken in raw HTTP (httpx): shapes, streaming, errors, auth, CORS, limits and
disconnects, against real gRPC services on the tiny model."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import start_gateway, wait_for

from nightcap.v1 import chat_pb2, chat_pb2_grpc, common_pb2
from services.common.server import free_port
from services.generation.engine.speculation import StepCost

ZURICH = {"messages": [{"role": "user", "content": "Where is Zurich?"}], "max_tokens": 8, "temperature": 0}
CHAT_TOKEN, ADMIN_TOKEN = "chat-token-0123456789abcdef", "admin-token-0123456789abcdef"


def events(response: httpx.Response) -> list:
    """The SSE stream as a list: parsed JSON for each data line, "[DONE]", and "ping" for comment lines."""
    found = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            found.append(data if data == "[DONE]" else json.loads(data))
        elif line.startswith(":"):
            found.append("ping")
    return found


@pytest.fixture(scope="module")
def http(gateway_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"chat {CHAT_TOKEN} page\nadmin {ADMIN_TOKEN} operator\n")
    return path


# --- answers --------------------------------------------------------------------------------------------------


def test_a_chat_completion_has_openai_shape_usage_and_the_sources_it_was_grounded_in(http):
    reply = http.post("/v1/chat/completions", json=ZURICH)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert (
        usage["completion_tokens"] >= 1 and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    titles = [source["title"] for source in body["nightcap"]["sources"]]
    assert "Zurich" in titles, titles
    first = body["nightcap"]["sources"][0]
    assert (
        first["index"] == 1 and first["url"].startswith("https://") and first["text"].startswith(first["snippet"][:50])
    )
    assert body["model"] == http.get("/v1/models").json()["data"][0]["id"]


def test_a_stream_starts_with_the_role_ends_with_usage_then_done_and_only_says_stop_or_length(http):
    request = {**ZURICH, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        found = [e for e in events(response) if e != "ping"]
    assert found[-1] == "[DONE]"
    chunks = found[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert any(s["title"] == "Zurich" for s in chunks[0]["nightcap"]["sources"])
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] >= 1
    reasons = [c["choices"][0]["finish_reason"] for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert reasons in (["stop"], ["length"])
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert text and usage_chunk["usage"]["completion_tokens"] <= 8


def test_greedy_chat_is_the_same_streamed_or_not_and_max_completion_tokens_is_honoured(http):
    request = {**ZURICH, "max_tokens": None, "max_completion_tokens": 5, "retrieval": False}
    whole = http.post("/v1/chat/completions", json=request).json()
    assert whole["usage"]["completion_tokens"] == 5 and whole["choices"][0]["finish_reason"] == "length"
    with http.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        chunks = [e for e in events(response) if isinstance(e, dict)]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert whole["nightcap"]["sources"] == [] and whole["nightcap"]["context_used"] is False


def test_chat_logprobs_name_each_token_with_its_alternatives(http):
    reply = http.post("/v1/chat/completions", json={**ZURICH, "logprobs": True, "top_logprobs": 2}).json()
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    assert all(entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2 for entry in content)
    assert all(bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"] for entry in content)


def test_a_raw_completion_goes_straight_to_the_model(http):
    reply = http.post("/v1/completions", json={"prompt": "Zurich is", "max_tokens": 4, "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 4
    with http.stream(
        "POST", "/v1/completions", json={"prompt": "Zurich is", "max_tokens": 4, "stream": True, "temperature": 0}
    ) as response:
        chunks = [e for e in events(response) if isinstance(e, dict)]
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]


def test_a_repeated_prompt_reports_its_cached_tokens_in_usage(http):
    """The generation service's prefix cache, as an OpenAI client sees it."""
    prompt = "Zurich is the largest city of Switzerland and the capital of the canton of Zurich. It is"
    request = {"prompt": prompt, "max_tokens": 3, "temperature": 0}
    first = http.post("/v1/completions", json=request).json()["usage"]
    second = http.post("/v1/completions", json=request).json()["usage"]
    assert second["prompt_tokens"] == first["prompt_tokens"] > 10
    assert second["prompt_tokens_details"]["cached_tokens"] == second["prompt_tokens"] - 1  # all but the last
    chat = {**ZURICH, "stream": True, "stream_options": {"include_usage": True}}
    for _ in range(2):
        with http.stream("POST", "/v1/chat/completions", json=chat) as response:
            usage = [e for e in events(response) if isinstance(e, dict)][-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 1


def test_usage_reports_the_tokens_speculative_decoding_guessed_and_kept(http, monkeypatch: pytest.MonkeyPatch):
    """Drafted from the prompt, as OpenAI reports its predicted outputs: kept guesses and refused ones."""
    # Whether a guess is worth scoring follows the step times the shared engine measured in earlier tests; on a
    # loaded machine they can say no guess is, and this test is about reporting them: every guess is worth it.
    monkeypatch.setattr(StepCost, "position_share", lambda self, rows: 0.0)
    request = {"prompt": "one two three one two three one two", "max_tokens": 40, "temperature": 0}
    body = http.post("/v1/completions", json=request).json()
    details = body["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] >= 0
    assert details["accepted_prediction_tokens"] < body["usage"]["completion_tokens"]  # at least one token a step
    chat = {**ZURICH, "max_tokens": 40, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=chat) as response:
        usage = [e for e in events(response) if isinstance(e, dict)][-1]["usage"]
    assert set(usage["completion_tokens_details"]) == {"accepted_prediction_tokens", "rejected_prediction_tokens"}


def test_models_list_the_served_model_and_the_embedder(http):
    data = http.get("/v1/models").json()["data"]
    kinds = {card["nightcap"]["kind"]: card for card in data}
    assert kinds["chat"]["owned_by"] == "nightcap" and kinds["chat"]["created"] > 0
    assert kinds["embedding"]["nightcap"]["dimension"] == 384
    assert http.get(f"/v1/models/{kinds['chat']['id']}").json()["id"] == kinds["chat"]["id"]


def test_embeddings_come_as_floats_or_base64_of_the_same_vector(http):
    floats = http.post("/v1/embeddings", json={"input": ["Where is Zurich?", "Paris"]}).json()
    assert [d["index"] for d in floats["data"]] == [0, 1] and floats["usage"]["prompt_tokens"] > 2
    vector = np.asarray(floats["data"][0]["embedding"], dtype=np.float32)
    assert vector.shape == (384,) and abs(float(np.linalg.norm(vector)) - 1) < 1e-3
    packed = http.post("/v1/embeddings", json={"input": "Where is Zurich?", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vector, atol=1e-6)


# --- citations and the index build, as the orchestrator reports them -------------------------------------------


def test_the_sources_an_answer_cites_are_named_and_flagged_in_whole_and_streamed_responses():
    """The translation alone, from real ChatStart and ChatEnd messages (the tiny model never cites)."""
    from conftest import cited_turn

    from services.gateway import translate

    turn = cited_turn()
    start, end = turn[0].start, turn[-1].end
    whole = translate.sources(start, end.cited)
    assert [(s["index"], s["title"], s["cited"]) for s in whole] == [(1, "Geneva", False), (2, "Zurich", True)]
    assert translate.end_extras(end)["cited"] == [2]
    assert all("cited" not in s for s in translate.sources(start))  # streamed: they come before the answer
    listed = translate.sources_markdown(whole, end.cited)
    assert listed == (
        "\n\nSources:\n[1] Geneva (https://en.wikipedia.org/wiki/Geneva)"
        "\n[2] Zurich (https://en.wikipedia.org/wiki/Zurich) (cited)"
    )
    assert "(cited)" not in translate.sources_markdown(whole, [])
    build = translate.start_extras(start, whole)["index_build"]
    assert build["state"] == "building" and (build["documents_done"], build["documents_total"]) == (4000, 10033)
    assert build["notice"] == "the index is still building: 4,000 of 10,033 documents indexed"
    assert translate.start_extras(chat_pb2.ChatStart(), [])["index_build"] is None


@pytest.fixture(scope="module")
def cited_gateway(cited_orchestrator_address, generation_address) -> Iterator[str]:
    running = start_gateway(cited_orchestrator_address, generation_address, None, citations="markdown")
    yield running.url
    running.stop()


def test_an_answer_citing_2_says_cited_2_in_the_response_and_in_the_last_chunk_of_a_stream(cited_gateway):
    with httpx.Client(base_url=cited_gateway, timeout=60) as client:
        whole = client.post("/v1/chat/completions", json=ZURICH).json()
        with client.stream("POST", "/v1/chat/completions", json={**ZURICH, "stream": True}) as response:
            chunks = [e for e in events(response) if isinstance(e, dict)]
    extra, content = whole["nightcap"], whole["choices"][0]["message"]["content"]
    assert content.startswith("Zurich is the largest city in Switzerland [2].")
    assert extra["cited"] == [2] and [s["cited"] for s in extra["sources"]] == [False, True]
    assert extra["index_build"]["documents_done"] == 4000
    assert content.endswith("[2] Zurich (https://en.wikipedia.org/wiki/Zurich) (cited)")  # --citations markdown
    first, last = chunks[0]["nightcap"], chunks[-1]
    assert first["index_build"]["notice"].startswith("the index is still building") and first["sources"]
    assert last["choices"][0]["finish_reason"] == "stop" and last["nightcap"]["cited"] == [2]
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert streamed == content


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "messages[0].content"),
        (json.dumps({**ZURICH, "n": 9}).encode(), 400, "n"),
        (
            json.dumps({**ZURICH, "tools": [{"type": "function", "function": {"name": "a b"}}]}).encode(),
            400,
            "tools[0].function.name",
        ),
        (json.dumps({**ZURICH, "response_format": {"type": "yaml"}}).encode(), 400, "response_format.type"),
        (json.dumps({**ZURICH, "logit_bias": {"token": 3}}).encode(), 400, "logit_bias"),
        (json.dumps({**ZURICH, "frobnicate": True}).encode(), 400, "frobnicate"),
        (json.dumps({"messages": []}).encode(), 400, "messages"),
        (json.dumps({**ZURICH, "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({**ZURICH, "model": "gpt-4o"}).encode(), 404, "model"),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}).encode(), 400, "messages[0].role"),
    ],
    ids=[
        "not-json",
        "lone-surrogate",
        "n-beyond-max",
        "tools",
        "unknown-response-format",
        "logit-bias",
        "unknown-field",
        "no-messages",
        "negative-temperature",
        "unknown-model",
        "assistant-last",
    ],
)
def test_bad_chat_input_gets_its_4xx_in_openai_shape_and_the_gateway_keeps_serving(http, body, status, param):
    reply = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param
    assert reply.headers["x-should-retry"] == "false"
    assert http.post("/v1/chat/completions", json=ZURICH).status_code == 200


def test_a_ten_megabyte_body_is_413_and_an_unknown_route_404(http):
    reply = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 10_000_000}]})
    assert reply.status_code == 413 and reply.json()["error"]["code"] == "request_too_large"
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_route"
    assert http.post("/v1/chat/completions", json=ZURICH).status_code == 200


def test_a_prompt_beyond_the_context_window_is_400_from_the_engine(http):
    reply = http.post("/v1/completions", json={"prompt": "Zurich " * 3000, "max_tokens": 4})
    assert reply.status_code == 400, reply.text
    assert "context" in reply.json()["error"]["message"]


# --- auth and CORS --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(orchestrator_address, generation_address, retrieval_address, tokens_file) -> Iterator[str]:
    running = start_gateway(
        orchestrator_address,
        generation_address,
        retrieval_address,
        tokens_file=tokens_file,
        cors_origins=("http://app.example",),
    )
    yield running.url
    running.stop()


def test_tokens_are_checked_by_role_and_health_stays_open(guarded):
    with httpx.Client(base_url=guarded, timeout=60) as client:
        missing = client.post("/v1/chat/completions", json=ZURICH)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
        wrong = client.post("/v1/chat/completions", json=ZURICH, headers={"Authorization": "Bearer x" * 3})
        assert wrong.status_code == 401
        chat = {"Authorization": f"Bearer {CHAT_TOKEN}"}
        assert client.post("/v1/chat/completions", json=ZURICH, headers=chat).status_code == 200
        denied = client.get("/v1/documents", headers=chat)
        assert denied.status_code == 403 and "admin" in denied.json()["error"]["message"]
        assert client.get("/v1/documents", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code != 403
        assert client.get("/health").status_code == 200
        assert client.get("/v1/nightcap/config").json()["auth_required"] is True


def test_a_cors_preflight_is_answered_before_any_token_is_asked_for(guarded):
    headers = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    reply = httpx.options(f"{guarded}/v1/chat/completions", headers=headers)
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == "http://app.example"
    assert "authorization" in reply.headers["access-control-allow-headers"].lower()
    other = httpx.options(f"{guarded}/v1/chat/completions", headers={**headers, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# --- load, failures and going away ----------------------------------------------------------------------------


def cancelled_requests(engine) -> float:
    return engine.metrics.requests.labels("cancelled")._value.get()


def test_a_client_that_hangs_up_mid_stream_frees_the_engine(gateway_url, generation_server):
    _, engine = generation_server
    before = cancelled_requests(engine)
    request = {**ZURICH, "max_tokens": 900, "stream": True, "retrieval": False}
    with (
        httpx.Client(base_url=gateway_url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=request) as response,
    ):
        lines = response.iter_lines()
        while not next(lines).startswith("data: {"):
            pass
        next(lines)
        assert engine.active_sequences >= 1
    # the sequence left the batch because its client went, not because it ran out of tokens
    assert wait_for(lambda: cancelled_requests(engine) == before + 1, timeout=5)
    assert wait_for(lambda: engine.active_sequences == 0, timeout=5)


def test_a_client_that_hangs_up_on_a_whole_response_frees_the_engine(gateway_url, generation_server):
    _, engine = generation_server
    before = cancelled_requests(engine)
    request = json.dumps({**ZURICH, "max_tokens": 900, "retrieval": False}).encode()
    port = int(gateway_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(request)}\r\n\r\n".encode()
            + request
        )
        assert wait_for(lambda: engine.active_sequences >= 1, timeout=10)
    assert wait_for(lambda: cancelled_requests(engine) == before + 1, timeout=5)
    assert wait_for(lambda: engine.active_sequences == 0, timeout=5)


def test_beyond_the_concurrency_limit_requests_get_429_with_retry_after(
    orchestrator_address, generation_address, retrieval_address
):
    running = start_gateway(orchestrator_address, generation_address, retrieval_address, max_concurrent_requests=1)
    try:
        started = threading.Event()

        def hold() -> None:
            request = {**ZURICH, "max_tokens": 300, "stream": True, "retrieval": False}
            with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=request, timeout=60) as response:
                for _ in response.iter_lines():
                    started.set()

        holder = threading.Thread(target=hold)
        holder.start()
        assert started.wait(30)
        refused = httpx.post(f"{running.url}/v1/chat/completions", json=ZURICH, timeout=60)
        holder.join()
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["type"] == "rate_limit_error"
        assert httpx.post(f"{running.url}/v1/chat/completions", json=ZURICH, timeout=60).status_code == 200
    finally:
        running.stop()


def test_a_backend_that_is_down_is_named_in_503_and_in_health(generation_address, retrieval_address):
    dead = f"127.0.0.1:{free_port()}"
    running = start_gateway(dead, generation_address, retrieval_address, request_timeout=3)
    try:
        reply = httpx.post(f"{running.url}/v1/chat/completions", json=ZURICH, timeout=30)
        assert reply.status_code == 503 and dead in reply.json()["error"]["message"]
        assert "orchestrator" in reply.json()["error"]["message"]
        health = httpx.get(f"{running.url}/health", timeout=30)
        assert health.status_code == 503
        assert health.json()["backends"]["orchestrator"] != "SERVING"
        assert health.json()["backends"]["generation"] == "SERVING"
    finally:
        running.stop()


def test_a_request_past_its_deadline_is_504(orchestrator_address, generation_address, retrieval_address):
    running = start_gateway(orchestrator_address, generation_address, retrieval_address, request_timeout=0.05)
    try:
        request = {**ZURICH, "max_tokens": 900, "retrieval": False}
        reply = httpx.post(f"{running.url}/v1/chat/completions", json=request, timeout=30)
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["type"] == "timeout"
    finally:
        running.stop()


def test_metrics_count_requests_by_route_and_status(http):
    http.post("/v1/chat/completions", json={**ZURICH, "n": 99})
    text = http.get("/metrics").text
    assert 'nightcap_gateway_requests_total{route="/v1/chat/completions",status="400"}' in text
    assert "nightcap_gateway_time_to_first_byte_seconds_bucket" in text
    assert "nightcap_gateway_open_streams" in text


def test_every_response_forbids_inline_script_and_other_origins(http):
    policy = http.get("/health").headers["content-security-policy"]
    assert "script-src 'self'" in policy and "default-src 'self'" in policy


# --- your documents -------------------------------------------------------------------------------------------


@pytest.fixture
def writable_gateway(embedder, generation_address, tmp_path) -> Iterator[str]:
    """A stack whose retrieval service serves an empty index of its own, opened for writing."""
    from conftest import start_orchestrator

    from services.retrieval.index import create_index, load_index
    from services.retrieval.retriever import Retriever
    from services.retrieval.server import start_retrieval_server

    folder = create_index(tmp_path / "indexes" / "mine", embedder.name, embedder.dimension)
    index = load_index(folder, writable=True)
    retrieval = start_retrieval_server(Retriever(embedder, index), "127.0.0.1:0")
    orchestrator = start_orchestrator(generation_address, retrieval.address)
    running = start_gateway(orchestrator.address, generation_address, retrieval.address)
    yield running.url
    running.stop()
    orchestrator.stop(grace=1)
    retrieval.stop(grace=1)
    index.close()


def test_documents_are_added_as_files_listed_searched_and_deleted(writable_gateway):
    with httpx.Client(base_url=writable_gateway, timeout=60) as client:
        files = [
            {
                "name": "notes/otter.md",
                "content": "---\ntags: x\n---\n# Otters\nSea otters hold hands while they sleep.",
            },
            {"name": "facts.jsonl", "content": '{"id": "f1", "title": "Moon", "text": "The Moon orbits the Earth."}\n'},
        ]
        added = client.post("/v1/documents", json={"files": files})
        assert added.status_code == 200, added.text
        assert added.json()["documents_added"] == 2 and sorted(added.json()["ids"]) == ["f1", "notes/otter.md"]
        listed = client.get("/v1/documents").json()
        assert {d["id"]: d["title"] for d in listed["data"]} == {"f1": "Moon", "notes/otter.md": "Otters"}
        assert listed["stats"]["documents"] == 2
        question = {"messages": [{"role": "user", "content": "Do sea otters hold hands?"}], "max_tokens": 4}
        sources = client.post("/v1/chat/completions", json=question).json()["nightcap"]["sources"]
        assert sources[0]["title"] == "Otters" and sources[0]["id"].startswith("notes/otter.md")
        page = client.get("/v1/documents", params={"limit": 1}).json()
        assert page["has_more"] is True and len(page["data"]) == 1
        assert (
            client.get("/v1/documents", params={"limit": 1, "after": page["data"][0]["id"]}).json()["has_more"] is False
        )
        empty = client.post("/v1/documents", json={"files": [{"name": "empty.txt", "content": "  "}]})
        assert empty.status_code == 400 and "empty.txt" in empty.json()["error"]["message"]
        odd = client.post("/v1/documents", json={"files": [{"name": "image.png", "content": "x"}]})
        assert odd.status_code == 400 and odd.json()["error"]["param"] == "files[0]"
        deleted = client.delete("/v1/documents/notes/otter.md")
        assert deleted.status_code == 200 and deleted.json()["documents_deleted"] == 1
        assert client.delete("/v1/documents/notes/otter.md").status_code == 404
        assert [d["id"] for d in client.get("/v1/documents").json()["data"]] == ["f1"]


# --- faults injected on purpose -------------------------------------------------------------------------------


class _SlowChat(chat_pb2_grpc.ChatServicer):
    """A fake orchestrator that takes ``delay`` seconds before its answer starts: a long prefill."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def Chat(self, request, context):
        time.sleep(self.delay)
        yield chat_pb2.ChatResponse(start=chat_pb2.ChatStart(model="slow:1"))
        yield chat_pb2.ChatResponse(delta="late")
        yield chat_pb2.ChatResponse(
            end=chat_pb2.ChatEnd(finish_reason=common_pb2.FINISH_REASON_EOS, completion_tokens=1)
        )


def test_a_long_prefill_streams_pings_until_the_answer_starts(generation_address):
    from services.common.server import ServiceBinding, start_server

    binding = ServiceBinding("nightcap.v1.Chat", chat_pb2_grpc.add_ChatServicer_to_server, _SlowChat(1.5))
    slow = start_server([binding], "127.0.0.1:0")
    running = start_gateway(slow.address, generation_address, None, ping_interval=0.2)
    request = {**ZURICH, "stream": True}
    try:
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=request, timeout=30) as response:
            assert response.status_code == 200, response.read()
            found = events(response)
    finally:
        running.stop()
        slow.stop(grace=0)
    assert any(isinstance(e, dict) for e in found), found
    pings = found.index(next(e for e in found if isinstance(e, dict)))
    assert pings >= 3 and all(e == "ping" for e in found[:pings])
    assert found[-1] == "[DONE]" and any(
        isinstance(e, dict) and e["choices"][0]["delta"].get("content") == "late" for e in found
    )


def test_an_orchestrator_killed_mid_stream_ends_the_stream_with_an_error_and_the_gateway_goes_on(
    generation_address, retrieval_address, tmp_path
):
    address = f"127.0.0.1:{free_port()}"
    orchestrator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.orchestrator",
            "serve",
            "--address",
            address,
            "--generation",
            generation_address,
            "--retrieval",
            retrieval_address,
        ],
        stdout=(tmp_path / "orchestrator.log").open("w"),
        stderr=subprocess.STDOUT,
    )
    running = start_gateway(address, generation_address, retrieval_address)
    try:
        assert wait_for(lambda: httpx.get(f"{running.url}/health").status_code == 200, timeout=60)
        request = {**ZURICH, "max_tokens": 900, "stream": True, "retrieval": False}
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=request, timeout=30) as response:
            found = []
            for line in response.iter_lines():
                found.append(line)
                if len(found) == 6:
                    orchestrator.send_signal(signal.SIGKILL)
        found = [line for line in found if line]
        data = [json.loads(line[6:]) for line in found if line.startswith("data: {")]
        assert "error" in data[-1] and found[-1] == "data: [DONE]"
        assert data[-1]["error"]["type"] == "service_unavailable"
        assert httpx.get(f"{running.url}/health").status_code == 503
        assert httpx.get(f"{running.url}/v1/models").status_code == 200  # generation is still there
    finally:
        running.stop()
        orchestrator.kill()
        orchestrator.wait()


def test_beyond_loopback_the_gateway_refuses_to_start_without_tls_and_tokens():
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway", "serve", "--address", f"0.0.0.0:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "without TLS and tokens" in done.stderr and "--insecure" in done.stderr


def test_over_tls_with_tokens_a_client_that_trusts_the_ca_is_answered(
    orchestrator_address, generation_address, retrieval_address, tmp_path
):
    from deploy.certs import DEFAULT_HOSTS, make_certs
    from services.common.security import TokenTable
    from services.gateway.app import GatewaySettings
    from services.gateway.server import start_gateway as start_tls

    make_certs(tmp_path, DEFAULT_HOSTS)
    chat_token = (tmp_path / "chat.token").read_text().strip()
    settings = GatewaySettings(
        orchestrator_address, generation_address, retrieval_address, tokens=TokenTable(tmp_path / "tokens")
    )
    running = start_tls(settings, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.key")
    try:
        url = running.url.replace("127.0.0.1", "localhost")
        with httpx.Client(base_url=url, verify=str(tmp_path / "ca.pem"), timeout=60) as client:
            reply = client.post("/v1/chat/completions", json=ZURICH, headers={"Authorization": f"Bearer {chat_token}"})
            assert reply.status_code == 200, reply.text
            assert client.post("/v1/chat/completions", json=ZURICH).status_code == 401
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=10)  # the system's CAs do not know ours
    finally:
        running.stop()


def test_every_api_route_has_a_role_and_only_documents_need_admin():
    from fastapi.routing import iter_route_contexts

    from services.common.security import ADMIN, CHAT, required_http_role
    from services.gateway.app import GatewaySettings, create_app

    app = create_app(GatewaySettings("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"))
    # the routes of the included routers too (FastAPI >= 0.137 keeps those behind one entry of app.routes)
    routes = [route.path for route in iter_route_contexts(app.routes) if route.path]
    paths = {path.split("{")[0].rstrip("/") for path in routes if path.startswith("/v1/")}
    roles = {path: required_http_role(path) for path in paths}
    assert roles.pop("/v1/nightcap/config") is None
    assert roles.pop("/v1/documents") == ADMIN
    assert set(roles.values()) == {CHAT}, roles
    assert required_http_role("/v1/documents/notes/a.md") == ADMIN
    assert required_http_role("/v1/anything-new") == ADMIN  # fail closed
    assert required_http_role("/health") is None and required_http_role("/") is None


def test_a_chat_answered_from_the_index_gets_the_grounded_temperature_unless_it_sets_one():
    from services.gateway.openai_types import ChatCompletionRequest
    from services.gateway.translate import SamplingDefaults, chat_request

    defaults = SamplingDefaults(temperature=0.6, grounded_temperature=0.0)
    ask = {"messages": [{"role": "user", "content": "Where is Zurich?"}]}

    def temperature(body: dict, retrieval_default: bool = True) -> float:
        request = ChatCompletionRequest.model_validate(body)
        return round(chat_request(request, "r", defaults, retrieval_default).params.temperature, 3)

    assert temperature(ask) == 0.0  # grounded by default
    assert temperature({**ask, "retrieval": False}) == 0.6  # a plain chat
    assert temperature(ask, retrieval_default=False) == 0.6  # a gateway without retrieval by default
    assert temperature({**ask, "retrieval": True}, retrieval_default=False) == 0.0
    assert temperature({**ask, "temperature": 0.9}) == 0.9  # the request's own wins
    assert temperature({**ask, "temperature": 0}, retrieval_default=False) == 0.0
    assert defaults.as_dict()["grounded_temperature"] == 0.0  # what the page shows
