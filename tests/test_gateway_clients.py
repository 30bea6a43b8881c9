"""Clients nobody here wrote, against the gateway on the tiny stack: the official openai SDK (sync and async),
LangChain's ChatOpenAI, LlamaIndex's OpenAILike, curl; and 64 streaming clients at once."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time

import openai
import pytest
from conftest import start_gateway

from services.common.server import free_port

QUESTION = [{"role": "user", "content": "Where is Zurich?"}]
CHAT_TOKEN = "chat-token-0123456789abcdef"


@pytest.fixture(scope="module")
def sdk(gateway_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)


def test_the_openai_sdk_answers_with_usage_and_a_finish_reason(sdk):
    reply = sdk.chat.completions.create(model="", messages=QUESTION, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 6 and reply.usage.total_tokens > reply.usage.completion_tokens
    assert any(s["title"] == "Zurich" for s in reply.model_extra["nightcap"]["sources"])


def test_the_openai_sdk_streams_and_gets_usage_in_a_last_chunk_without_choices(sdk):
    stream = sdk.chat.completions.create(
        model="", messages=QUESTION, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = sdk.chat.completions.create(model="", messages=QUESTION, max_tokens=6, temperature=0)
    assert text == whole.choices[0].message.content


def test_a_seed_reproduces_a_sampled_answer_and_stop_cuts_it(sdk):
    def ask(**extra):
        return sdk.chat.completions.create(
            model="",
            messages=QUESTION,
            max_tokens=12,
            temperature=1.0,
            seed=7,
            extra_body={"retrieval": False},
            **extra,
        )

    first, again = ask(), ask()
    assert first.choices[0].message.content == again.choices[0].message.content
    text = first.choices[0].message.content
    cut_at = next((text[i : i + 2] for i in range(2, len(text) - 2) if text[i : i + 2].strip()), None)
    if cut_at is None:
        pytest.skip(f"the sampled answer {text!r} has no text to stop at")
    stopped = ask(stop=[cut_at])
    assert stopped.choices[0].message.content == text[: text.index(cut_at)]
    assert stopped.choices[0].finish_reason == "stop"


def test_each_error_status_arrives_as_the_sdks_own_exception(
    sdk, gateway_url, orchestrator_address, generation_address, retrieval_address, tmp_path
):
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="", messages=QUESTION, n=9)  # beyond --max-n (8)
    assert bad.value.param == "n"
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as unnamed:
        sdk.chat.completions.create(
            model="", messages=QUESTION, tools=[{"type": "function", "function": {"name": "no spaces"}}]
        )
    assert unnamed.value.param == "tools[0].function.name"
    with pytest.raises(openai.APIStatusError) as too_large:
        sdk.chat.completions.create(model="", messages=[{"role": "user", "content": "x" * 5_000_000}])
    assert too_large.value.status_code == 413

    tokens = tmp_path / "tokens"
    tokens.write_text(f"chat {CHAT_TOKEN}\n")
    guarded = start_gateway(
        orchestrator_address, generation_address, retrieval_address, tokens_file=tokens, max_concurrent_requests=1
    )
    dead = start_gateway(f"127.0.0.1:{free_port()}", generation_address, retrieval_address, request_timeout=2)
    slow = start_gateway(orchestrator_address, generation_address, retrieval_address, request_timeout=0.05)
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong-token", max_retries=0).models.list()
        admin_only = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=CHAT_TOKEN, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError):
            admin_only.get("/documents", cast_to=object)
        with pytest.raises(openai.InternalServerError) as down:
            openai.OpenAI(base_url=f"{dead.url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model="", messages=QUESTION
            )
        assert down.value.status_code == 503
        with pytest.raises(openai.InternalServerError) as late:
            openai.OpenAI(base_url=f"{slow.url}/v1", api_key="x", max_retries=0).chat.completions.create(
                model="", messages=QUESTION, max_tokens=900, extra_body={"retrieval": False}
            )
        assert late.value.status_code == 504
        # Greedy with end-of-text (token 0) banned, so the holder cannot finish before the second call: sampled,
        # it once drew end-of-text first and freed its slot.
        holder = admin_only.chat.completions.create(
            model="",
            messages=QUESTION,
            max_tokens=200,
            stream=True,
            temperature=0,
            logit_bias={"0": -100},
            extra_body={"retrieval": False},
        )
        next(iter(holder))
        with pytest.raises(openai.RateLimitError):
            admin_only.chat.completions.create(model="", messages=QUESTION)
        holder.close()
    finally:
        for running in (guarded, dead, slow):
            running.stop()


def test_the_async_sdk_streams_several_chats_at_once(gateway_url):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)

        async def one() -> str:
            stream = await client.chat.completions.create(
                model="", messages=QUESTION, max_tokens=6, temperature=0, stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        try:
            return await asyncio.gather(*(one() for _ in range(4)))
        finally:
            await client.close()

    answers = asyncio.run(main())
    assert len(set(answers)) == 1 and answers[0]


def test_raw_completions_and_embeddings_through_the_sdk(sdk):
    completion = sdk.completions.create(model="", prompt="Zurich is", max_tokens=3, temperature=0)
    assert completion.usage.completion_tokens == 3 and completion.choices[0].finish_reason == "length"
    vectors = sdk.embeddings.create(model="all-MiniLM-L6-v2", input=["Zurich", "Geneva"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) == 384
    packed = sdk.embeddings.create(model="all-MiniLM-L6-v2", input="Zurich")  # the SDK asks for base64 itself
    assert packed.data[0].embedding == pytest.approx(vectors.data[0].embedding, abs=1e-6)


def test_langchain_chat_openai_answers_and_streams(gateway_url):
    from langchain_openai import ChatOpenAI

    unknown = ChatOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", model="gpt-4o", max_retries=0)
    with pytest.raises(openai.NotFoundError, match="not served"):
        unknown.invoke("Where is Zurich?")
    served = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="unused").models.list().data[0].id
    llm = ChatOpenAI(
        base_url=f"{gateway_url}/v1",
        api_key="unused",
        model=served,
        max_completion_tokens=6,
        temperature=0,
        max_retries=0,
    )
    answer = llm.invoke("Where is Zurich?")
    assert answer.content and answer.usage_metadata["output_tokens"] <= 6
    streamed = "".join(chunk.content for chunk in llm.stream("Where is Zurich?"))
    assert streamed == answer.content


def test_llamaindex_openai_like_answers_and_streams(gateway_url):
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        api_base=f"{gateway_url}/v1",
        api_key="unused",
        model="",
        is_chat_model=True,
        max_tokens=6,
        temperature=0,
        max_retries=0,
        context_window=1024,
    )
    reply = llm.chat([ChatMessage(role="user", content="Where is Zurich?")])
    assert reply.message.content
    streamed = "".join(
        part.delta or "" for part in llm.stream_chat([ChatMessage(role="user", content="Where is Zurich?")])
    )
    assert streamed == reply.message.content


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_n_streams_server_sent_events(gateway_url):
    done = subprocess.run(
        [
            "curl",
            "-sN",
            f"{gateway_url}/v1/chat/completions",
            "-H",
            "Content-Type: application/json",
            "-d",
            '{"messages": [{"role": "user", "content": "Where is Zurich?"}], "stream": true, "max_tokens": 4}',
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and '"chat.completion.chunk"' in lines[0]


@pytest.fixture
def roomy_gateway(tiny_loaded, retrieval_address):
    """A stack whose engine admits 128 requests (the default), so 64 callers never meet its limit."""
    from conftest import start_orchestrator

    from services.generation.loading import start_engine
    from services.generation.server import start_generation_server

    engine = start_engine(tiny_loaded)
    generation = start_generation_server(tiny_loaded, engine, "127.0.0.1:0", default_max_new_tokens=16)
    orchestrator = start_orchestrator(generation.address, retrieval_address)
    gateway = start_gateway(orchestrator.address, generation.address, retrieval_address)
    yield gateway.url
    gateway.stop()
    orchestrator.stop(grace=1)
    engine.shutdown(grace=1)
    generation.stop(grace=1)


def test_64_streaming_clients_for_a_minute_see_no_unexpected_error(roomy_gateway):
    gateway_url = roomy_gateway
    seconds = float(os.environ.get("NIGHTCAP_GATEWAY_LOAD_SECONDS", "60"))

    async def main() -> tuple[int, list[str]]:
        client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)
        deadline = time.monotonic() + seconds
        errors: list[str] = []
        done = 0

        async def caller(number: int) -> None:
            nonlocal done
            while time.monotonic() < deadline:
                try:
                    stream = await client.chat.completions.create(
                        model="",
                        messages=[{"role": "user", "content": f"Where is Zurich? ({number})"}],
                        max_tokens=16,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    chunks = [c async for c in stream]
                    if not chunks or chunks[-1].usage is None:
                        errors.append(f"caller {number}: a stream without its usage chunk")
                    done += 1
                except Exception as error:  # every failure is counted and shown, none expected
                    errors.append(f"caller {number}: {type(error).__name__}: {error}")

        try:
            await asyncio.gather(*(caller(n) for n in range(64)))
        finally:
            await client.close()
        return done, errors

    done, errors = asyncio.run(main())
    assert not errors, errors[:5]
    assert done >= 64
