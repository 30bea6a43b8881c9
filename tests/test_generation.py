"""The generation service, alone: a real gRPC server over a tiny random GPT-NeoX."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch

from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.generation.engine.text import IncrementalDetokenizer, StopSequenceMatcher

PROMPT = "<human>: Where is Zurich?\n<bot>:"


@pytest.fixture(scope="module")
def stub(generation_address: str):
    with grpc.insecure_channel(generation_address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def generate(stub, text: str = PROMPT, **params) -> tuple[str, list[int], generation_pb2.Finish]:
    request = generation_pb2.GenerateRequest(text=text, params=common_pb2.SamplingParams(**params))
    pieces, ids, finish = [], [], None
    for response in stub.Generate(request, timeout=60):
        pieces.append(response.text)
        ids.extend(response.token_ids)
        if response.HasField("finish"):
            finish = response.finish
    return "".join(pieces), ids, finish


def test_greedy_stream_matches_transformers_generate(stub, tiny_loaded):
    text, ids, finish = generate(stub, max_new_tokens=12, temperature=0.0)
    prompt_ids = tiny_loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    # our own eos handling is checked elsewhere; here the reference must run the full 12 tokens
    reference = tiny_loaded.model.generate(
        prompt_ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0
    )[0, prompt_ids.shape[1] :].tolist()
    assert ids == reference
    assert text == tiny_loaded.tokenizer.decode(reference, skip_special_tokens=True)
    assert finish.reason == common_pb2.FINISH_REASON_LENGTH
    assert (finish.prompt_tokens, finish.generated_tokens) == (prompt_ids.shape[1], 12)


def test_default_max_new_tokens_applies_when_unset(stub):
    _, ids, finish = generate(stub)
    assert len(ids) == 16 and finish.generated_tokens == 16


def test_seeded_sampling_is_reproducible_and_seed_dependent(stub):
    first = generate(stub, max_new_tokens=20, temperature=1.0, top_k=50, seed=7)[1]
    again = generate(stub, max_new_tokens=20, temperature=1.0, top_k=50, seed=7)[1]
    other = generate(stub, max_new_tokens=20, temperature=1.0, top_k=50, seed=8)[1]
    assert first == again
    assert first != other


def test_stop_sequence_cuts_the_answer_and_is_not_streamed(stub):
    full, _, _ = generate(stub, max_new_tokens=24)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), f"pick a visible stop sequence from {full!r}"
    text, _, finish = generate(stub, max_new_tokens=24, stop=[stop])
    assert text == full[: full.index(stop)]
    assert finish.reason == common_pb2.FINISH_REASON_STOP_SEQUENCE
    assert finish.stop_sequence == stop


def test_concurrent_requests_each_get_their_own_correct_answer(stub):
    expected = {n: generate(stub, max_new_tokens=n)[1] for n in (3, 7, 11)}
    results: dict[int, list[int]] = {}

    def run(n: int) -> None:
        results[n] = generate(stub, max_new_tokens=n)[1]

    threads = [threading.Thread(target=run, args=(n,)) for n in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == expected


def test_model_info_and_tokenize(stub, tiny_loaded):
    info = stub.ModelInfo(generation_pb2.ModelInfoRequest())
    assert info.architecture == "GPTNeoXForCausalLM"
    assert info.context_length == 1024
    assert info.prompt_format == "openchatkit"
    assert list(info.stop) == ["<human>:"]
    assert (info.dtype, info.device) == ("float32", "cpu")
    counted = stub.Tokenize(generation_pb2.TokenizeRequest(text=PROMPT, return_ids=True))
    assert list(counted.token_ids) == tiny_loaded.tokenizer(PROMPT)["input_ids"]
    assert counted.token_count == len(counted.token_ids)


def test_token_id_prompt_gives_the_same_answer_as_its_text(stub, tiny_loaded):
    ids = tiny_loaded.tokenizer(PROMPT)["input_ids"]
    by_text = generate(stub, max_new_tokens=6)[1]
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids), params=common_pb2.SamplingParams(max_new_tokens=6)
    )
    by_ids = [i for response in stub.Generate(request, timeout=60) for i in response.token_ids]
    assert by_ids == by_text


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1"),
        ({"max_new_tokens": -5}, "max_new_tokens must be at least 1"),
        ({"max_new_tokens": 10_000}, "exceeds the model's context window of 1024"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be a number, got NaN"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p must be in (0, 1]"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"stop": [""]}, "each stop sequence must be 1 to"),
        ({"typical_p": 0.0}, "typical_p must be in (0, 1]"),
        ({"typical_p": 1.01}, "typical_p must be in (0, 1]"),
        ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2]"),
        ({"presence_penalty": -3.0}, "presence_penalty must be in [-2, 2]"),
        ({"do_sample": True, "temperature": 0.0}, "do_sample=true needs a temperature above 0"),
        ({"stop_token_ids": [99_999]}, "stop_token_ids [99999] are outside the model's vocabulary"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs=true"),
    ],
)
def test_bad_sampling_parameters_are_invalid_argument_and_the_server_keeps_serving(stub, params, message):
    with pytest.raises(grpc.RpcError) as caught:
        generate(stub, **params)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert generate(stub, max_new_tokens=2)[2].generated_tokens == 2


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"text": ""}, "the prompt is empty"),
        ({}, "the request has no prompt"),
        ({"text": "Zurich " * 1500}, "context window is 1024 tokens"),
        ({"token_ids": generation_pb2.TokenIds(ids=[1, 99_999])}, "outside the model's vocabulary"),
    ],
)
def test_bad_prompts_are_invalid_argument(stub, request_fields, message):
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(generation_pb2.GenerateRequest(**request_fields), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_detokenizer_streams_whole_characters(tiny_loaded):
    text = "Grüße aus Zürich 🙂 café"
    detokenizer = IncrementalDetokenizer(tiny_loaded.tokenizer)
    pieces = [detokenizer.add(i) for i in tiny_loaded.tokenizer(text)["input_ids"]]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(text.encode()) > len(text)  # the example does exercise multi-byte characters


def test_stop_matcher_holds_back_a_stop_sequence_split_across_tokens():
    matcher = StopSequenceMatcher(("<human>:",))
    assert matcher.push("Zurich is in Switzerland.\n<hu") == ("Zurich is in Switzerland.\n", None)
    assert matcher.push("man") == ("", None)
    assert matcher.push(">: next") == ("", "<human>:")


def test_stop_matcher_releases_text_that_turns_out_not_to_stop():
    matcher = StopSequenceMatcher(("<human>:",))
    assert matcher.push("a <h") == ("a ", None)
    assert matcher.push("ello") == ("<hello", None)
    assert matcher.push(" <hum") == (" ", None)
    assert matcher.flush() == "<hum"


def test_top_p_keeps_only_the_nucleus():
    from services.generation.engine.sampling import logits_to_probs

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    probs = logits_to_probs(logits, temperature=1.0, top_k=0, top_p=0.7)
    assert probs[2:].sum() == 0
    assert torch.allclose(probs[:2], torch.tensor([0.625, 0.375]))
    assert logits_to_probs(logits, 1.0, top_k=1, top_p=1.0).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_typical_p_keeps_the_tokens_nearest_the_entropy_not_the_likeliest():
    from services.generation.engine.sampling import logits_to_probs

    # entropy 1.28 nats; surprisals 0.92, 1.20, 1.61, 2.30: tokens 1 and 2 are the most typical
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    probs = logits_to_probs(logits, temperature=1.0, top_k=0, top_p=1.0, typical_p=0.45)
    assert probs.nonzero().flatten().tolist() == [1, 2]
    assert torch.allclose(probs[1:3], torch.tensor([0.6, 0.4]))


def test_frequency_and_presence_penalties_follow_the_openai_formula():
    from services.generation.engine.sampling import RowSampling, SamplingConfig, apply_penalties

    logits = torch.zeros(1, 4)
    config = SamplingConfig(max_new_tokens=4, frequency_penalty=0.5, presence_penalty=0.25)
    penalised = apply_penalties(logits, [RowSampling(config, [3, 1, 1, 2], [1, 1, 2], torch.Generator())])
    assert penalised.tolist() == [[0.0, -1.25, -0.75, 0.0]]
