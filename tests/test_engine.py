"""The continuous batching engine: batch invariance, joining and leaving, cancellation, backpressure,
faults, metrics and draining, on tiny random GPT-NeoX and Llama models."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch

from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.common.errors import ResourceExhausted, Unavailable
from services.common.server import free_port
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.request import Finished, Request, RequestStatus, TokenChunk
from services.generation.engine.runner import Runner, execute_step
from services.generation.engine.sampling import SamplingConfig, typical_filter
from services.generation.engine.scheduler import DecodeRow, ModelStep, PrefillChunk, SchedulerConfig
from services.generation.loading import make_runner, start_engine
from services.generation.server import start_generation_server


def tokens_of(request: Request) -> list[int]:
    return [i for e in request.events(timeout=60) if isinstance(e, TokenChunk) for i in e.token_ids]


def run(engine: ContinuousBatchingEngine, prompt: list[int], **config) -> tuple[list[int], Finished]:
    request = engine.submit(Request(prompt, SamplingConfig(**config)))
    events = list(request.events(timeout=60))
    return [i for e in events if isinstance(e, TokenChunk) for i in e.token_ids], events[-1]


def random_prompts(count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, 400) for _ in range(rng.randrange(3, 40))], rng.randrange(5, 30)) for _ in range(count)]


def assert_greedy_tokens_ignore_the_batch(engine: ContinuousBatchingEngine) -> None:
    """16 prompts alone, then all at once: the same greedy tokens, every one asked for (shuts ``engine`` down)."""
    try:
        cases = random_prompts(16)
        alone = [run(engine, prompt, max_new_tokens=n, ignore_eos=True)[0] for prompt, n in cases]
        requests = [engine.submit(Request(p, SamplingConfig(max_new_tokens=n, ignore_eos=True))) for p, n in cases]
        together = [tokens_of(r) for r in requests]
    finally:
        engine.shutdown(grace=1)
    assert together == alone
    assert [len(tokens) for tokens in together] == [n for _, n in cases]


def assert_seeded_sampling_ignores_the_batch(engine: ContinuousBatchingEngine) -> None:
    """A seeded sampled request alone and beside 8 others: the same tokens (shuts ``engine`` down)."""
    sampled = {"max_new_tokens": 20, "temperature": 0.9, "top_k": 50, "seed": 1234, "ignore_eos": True}
    try:
        alone = run(engine, [5, 6, 7, 8], **sampled)[0]
        others = [
            engine.submit(Request(p, SamplingConfig(max_new_tokens=n, temperature=1.0, ignore_eos=True)))
            for p, n in random_prompts(8, seed=3)
        ]
        crowded = run(engine, [5, 6, 7, 8], **sampled)[0]
        for other in others:
            list(other.events(timeout=60))
    finally:
        engine.shutdown(grace=1)
    assert crowded == alone


def assert_a_draft_scores_as_if_fed_token_by_token(new_runner: Callable[[], Runner]) -> None:
    """The runner's side of speculative decoding: a row fed its token and a draft gets each position's logits
    as one step per token would give them, and the draft tokens the sampler turns down leave no trace."""

    def steps(*fed: tuple[DecodeRow, ...]) -> list[torch.Tensor]:
        runner = new_runner()
        execute_step(runner, ModelStep(0, prefill=PrefillChunk(0, 4, True, ((5, 6, 7, 8), (9, 10, 11)))))
        return [execute_step(runner, ModelStep(i, decode=rows)) for i, rows in enumerate(fed, 1)]

    def plain(*tokens: int) -> tuple[DecodeRow, ...]:
        return tuple(DecodeRow(token) for token in tokens)

    one_by_one = steps(plain(20, 30), plain(21, 31), plain(22, 32))
    after_a_turned_down_token = steps(plain(20, 30), plain(21, 31), plain(40, 32))[-1]
    # row 0 guesses 21, 22 after 20, row 1 guesses 31 after 30; then row 0's 22 is turned down for 40
    drafted, corrected = steps(
        (DecodeRow(20, (21, 22)), DecodeRow(30, (31,))), (DecodeRow(40, rejected=1), DecodeRow(32))
    )
    expected = torch.stack([one_by_one[0][0], one_by_one[1][0], one_by_one[2][0], one_by_one[0][1], one_by_one[1][1]])
    torch.testing.assert_close(drafted, expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(corrected, after_a_turned_down_token, rtol=1e-3, atol=1e-3)


def test_a_draft_scores_as_if_fed_token_by_token(model):
    assert_a_draft_scores_as_if_fed_token_by_token(lambda: make_runner(model))


@pytest.mark.parametrize("prefill_chunk", [2048, 16])
def test_greedy_tokens_are_the_same_alone_or_in_a_batch_of_16(model, prefill_chunk):
    assert_greedy_tokens_ignore_the_batch(start_engine(model, SchedulerConfig(max_prefill_tokens=prefill_chunk)))


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    assert_seeded_sampling_ignores_the_batch(start_engine(model))


def test_a_request_joins_a_running_batch_and_leaves_it_first(tiny_loaded):
    engine = start_engine(tiny_loaded)
    try:
        long_alone = run(engine, [9, 8, 7], max_new_tokens=120, ignore_eos=True)[0]
        short_alone = run(engine, [1, 2, 3, 4, 5, 6], max_new_tokens=5, ignore_eos=True)[0]
        long = engine.submit(Request([9, 8, 7], SamplingConfig(max_new_tokens=120, ignore_eos=True)))
        long_events = long.events(timeout=60)
        first = [next(long_events) for _ in range(10)]  # the long request is decoding
        short_tokens, short_finish = run(engine, [1, 2, 3, 4, 5, 6], max_new_tokens=5, ignore_eos=True)
        assert long.status is RequestStatus.RUNNING  # the short one joined and left while it ran
        rest = list(long_events)
    finally:
        engine.shutdown(grace=1)
    assert short_tokens == short_alone and short_finish.status is RequestStatus.FINISHED_LENGTH
    assert [i for e in [*first, *rest] if isinstance(e, TokenChunk) for i in e.token_ids] == long_alone


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return False


def test_a_cancelled_request_leaves_the_batch_and_frees_its_slot(tiny_loaded):
    engine = start_engine(tiny_loaded)
    try:
        keep = engine.submit(Request([1, 2, 3], SamplingConfig(max_new_tokens=400, ignore_eos=True)))
        drop = engine.submit(Request([4, 5, 6], SamplingConfig(max_new_tokens=400, ignore_eos=True)))
        next(drop.events(timeout=30))
        assert wait_until(lambda: engine.active_sequences == 2)
        drop.cancel()
        events = list(drop.events(timeout=30))
        assert events[-1].status is RequestStatus.FINISHED_CANCELLED
        assert events[-1].generated_tokens < 400
        assert wait_until(lambda: engine.active_sequences == 1)
        assert keep.status is RequestStatus.RUNNING
        keep.cancel()
        assert wait_until(lambda: engine.active_sequences == 0)
    finally:
        engine.shutdown(grace=1)


def test_overload_is_refused_with_the_limit_it_hit(tiny_loaded):
    engine = start_engine(
        tiny_loaded, SchedulerConfig(max_batch_size=1, max_concurrent_requests=2, max_batch_total_tokens=100)
    )
    try:
        running = [engine.submit(Request([1, 2], SamplingConfig(max_new_tokens=50, ignore_eos=True))) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match=r"--max-concurrent-requests\) is 2"):
            engine.submit(Request([1, 2], SamplingConfig(max_new_tokens=5)))
        for request in running:
            request.cancel()
        assert wait_until(lambda: engine.active_sequences == 0 and engine.waiting == 0)
        with pytest.raises(ResourceExhausted, match="--max-batch-total-tokens 100"):
            engine.submit(Request([1] * 60, SamplingConfig(max_new_tokens=50)))
    finally:
        engine.shutdown(grace=1)


def test_queued_requests_report_their_wait(tiny_loaded):
    engine = start_engine(tiny_loaded, SchedulerConfig(max_batch_size=1))
    try:
        first = engine.submit(Request([1, 2], SamplingConfig(max_new_tokens=40, ignore_eos=True)))
        second = engine.submit(Request([3, 4], SamplingConfig(max_new_tokens=2, ignore_eos=True)))
        first_finish = list(first.events(timeout=30))[-1]
        second_finish = list(second.events(timeout=30))[-1]
    finally:
        engine.shutdown(grace=1)
    assert second_finish.queue_ms > first_finish.queue_ms
    assert second.scheduled_at >= first.finished_at


def test_one_request_with_broken_logits_fails_alone(tiny_loaded):
    poison = 77
    head = tiny_loaded.model.get_output_embeddings()

    def corrupt_rows_that_saw_the_poison(_module, _inputs, output):
        rows = [r for r, ids in enumerate(seen_inputs[-1]) if poison in ids.tolist()]
        if rows:
            output[rows] = float("nan")
        return output

    seen_inputs: list = []
    hooks = [
        tiny_loaded.model.register_forward_pre_hook(
            lambda _m, _a, kwargs: seen_inputs.append(kwargs["input_ids"]), with_kwargs=True
        ),
        head.register_forward_hook(corrupt_rows_that_saw_the_poison),
    ]
    engine = start_engine(tiny_loaded)
    try:
        healthy_alone = run(engine, [3, 4, 5], max_new_tokens=12, ignore_eos=True)[0]
        broken = engine.submit(Request([3, poison, 5], SamplingConfig(max_new_tokens=12, ignore_eos=True)))
        healthy = engine.submit(Request([3, 4, 5], SamplingConfig(max_new_tokens=12, ignore_eos=True)))
        broken_events = list(broken.events(timeout=30))
        healthy_events = list(healthy.events(timeout=30))
    finally:
        engine.shutdown(grace=1)
        for hook in hooks:
            hook.remove()
    assert broken_events[-1].status is RequestStatus.FINISHED_ERROR
    assert "NaN" in broken_events[-1].error
    assert healthy_events[-1].status is RequestStatus.FINISHED_LENGTH
    assert [i for e in healthy_events if isinstance(e, TokenChunk) for i in e.token_ids] == healthy_alone


def test_shutdown_finishes_running_requests_and_refuses_new_ones(tiny_loaded):
    engine = start_engine(tiny_loaded)
    request = engine.submit(Request([1, 2, 3], SamplingConfig(max_new_tokens=60, ignore_eos=True)))
    closer = threading.Thread(target=engine.shutdown, kwargs={"grace": 30})
    closer.start()
    assert wait_until(lambda: not engine.accepting)
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit(Request([1], SamplingConfig(max_new_tokens=1)))
    closer.join(30)
    finished = list(request.events(timeout=5))[-1]
    assert finished.status is RequestStatus.FINISHED_LENGTH and finished.generated_tokens == 60


@pytest.fixture
def served(tiny_loaded):
    engine = start_engine(tiny_loaded, SchedulerConfig(max_concurrent_requests=4))
    metrics_port = engine.metrics.serve("127.0.0.1:0")
    running = start_generation_server(tiny_loaded, engine, "127.0.0.1:0")
    with grpc.insecure_channel(running.address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel), engine, metrics_port
    engine.shutdown(grace=1)
    running.stop(grace=1)


def stream(stub, timeout: float = 60, **params):
    request = generation_pb2.GenerateRequest(text="Zurich", params=common_pb2.SamplingParams(**params))
    return stub.Generate(request, timeout=timeout)


def streamed_ids(stub, **params) -> list[int]:
    return [i for response in stream(stub, **params) for i in response.token_ids]


def test_a_client_that_closes_its_stream_stops_costing_compute(served):
    stub, engine, _ = served
    call = stream(stub, max_new_tokens=500, ignore_eos=True)
    next(call)
    assert engine.active_sequences == 1
    call.cancel()
    assert wait_until(lambda: engine.active_sequences == 0)


def test_a_passed_deadline_is_deadline_exceeded_and_frees_the_slot(served):
    stub, engine, _ = served
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(stub, timeout=0.3, max_new_tokens=900, ignore_eos=True))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: engine.active_sequences == 0)


def test_overload_over_grpc_is_resource_exhausted(served):
    stub, _, _ = served
    calls = [stream(stub, max_new_tokens=900, ignore_eos=True) for _ in range(4)]
    for call in calls:
        next(call)
    with pytest.raises(grpc.RpcError) as caught:
        list(stream(stub, max_new_tokens=5))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-concurrent-requests" in caught.value.details()
    for call in calls:
        call.cancel()


def test_logprobs_come_with_each_token(served):
    stub, _, _ = served
    responses = list(stream(stub, max_new_tokens=6, logprobs=True, top_logprobs=3, ignore_eos=True))
    ids = [i for r in responses for i in r.token_ids]
    logprobs = [lp for r in responses for lp in r.logprobs]
    assert [lp.token_id for lp in logprobs] == ids
    for lp in logprobs:
        assert len(lp.top) == 3
        assert lp.top[0].token_id == lp.token_id  # greedy picks the most likely token
        assert lp.logprob == pytest.approx(lp.top[0].logprob) and lp.logprob <= 0


def test_stop_token_ids_and_ignore_eos(served):
    stub, _, _ = served
    free = streamed_ids(stub, max_new_tokens=4, ignore_eos=True)
    stopped = list(stream(stub, max_new_tokens=4, stop_token_ids=[free[2]]))
    assert [i for r in stopped for i in r.token_ids] == free[:2]
    assert stopped[-1].finish.reason == common_pb2.FINISH_REASON_EOS


def test_frequency_penalty_discourages_repeats(served):
    stub, _, _ = served
    plain = [i for r in stream(stub, max_new_tokens=40, ignore_eos=True) for i in r.token_ids]
    penalised = [
        i for r in stream(stub, max_new_tokens=40, frequency_penalty=2.0, ignore_eos=True) for i in r.token_ids
    ]
    assert len(set(plain)) < 40, "the random model repeats itself without a penalty"
    assert len(set(penalised)) > len(set(plain))


def test_typical_sampling_through_the_engine_keeps_every_token_in_the_typical_set(served, tiny_loaded):
    stub, _, _ = served
    first = streamed_ids(stub, max_new_tokens=20, temperature=1.0, typical_p=0.2, seed=5, ignore_eos=True)
    again = streamed_ids(stub, max_new_tokens=20, temperature=1.0, typical_p=0.2, seed=5, ignore_eos=True)
    assert first == again and len(first) == 20
    # The tiny random model spreads its mass over hundreds of tokens, so a sampler that ignored typical_p
    # would land outside the typical set (a fifth of the mass) at almost every step. The set is rebuilt
    # here from a plain forward pass, a little wider (0.3) so float noise on its edge cannot flip a token.
    ids = tiny_loaded.tokenizer("Zurich", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = tiny_loaded.model(torch.tensor([ids + first])).logits[0, len(ids) - 1 : -1].float()
    for step, token in enumerate(first):
        kept = typical_filter(logits[step], 0.3).isfinite()
        assert kept[token], f"token {step} ({token}) lies outside the typical set"


def test_metrics_endpoint_counts_requests_and_latencies(served):
    stub, _, metrics_port = served
    list(stream(stub, max_new_tokens=3, ignore_eos=True))
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'nightcap_generation_requests_total{outcome="length"} 1.0' in body
    for name in (
        "nightcap_generation_time_to_first_token_seconds_count 1.0",
        "nightcap_generation_inter_token_latency_seconds_count 2.0",
        "nightcap_generation_request_duration_seconds_count 1.0",
        "nightcap_generation_prompt_tokens_count 1.0",
        "nightcap_generation_generated_tokens_sum 3.0",
        "nightcap_generation_queue_size 0.0",
        "nightcap_generation_batch_size_count",
    ):
        assert name in body, name


def test_sigterm_lets_a_running_request_finish_then_exits(tiny_model_dir: Path, tmp_path: Path):
    port = free_port()
    # the log goes to a file: a pipe nobody reads until the end can fill and block the server's last writes
    log_file = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "services.generation", "serve", "--model", str(tiny_model_dir),
         "--address", f"127.0.0.1:{port}", "--metrics-address", "", "--grace", "300"],
        stderr=log_file, text=True,
    )  # fmt: skip
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=60)
            call = stream(generation_pb2_grpc.GenerationStub(channel), max_new_tokens=300, ignore_eos=True)
            first = next(call)
            server.send_signal(signal.SIGTERM)
            rest = list(call)
        try:
            code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:  # seen once in CI: the log says how far the drain got
            log_file.flush()
            pytest.fail("no exit 120 s after SIGTERM; the server's log:\n" + (tmp_path / "serve.log").read_text())
        assert code == 0
    finally:
        server.kill()
        log_file.close()
        log = (tmp_path / "serve.log").read_text()
    generated = len(first.token_ids) + sum(len(r.token_ids) for r in rest)
    assert rest[-1].finish.reason == common_pb2.FINISH_REASON_LENGTH and generated == 300
    assert "draining" in log
