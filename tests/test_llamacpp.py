"""The llama.cpp runner under our scheduler, on a tiny random Llama written as GGUF: the engine's guarantees
(batch invariance, joins and leaves, chunked prefills, cancels, seeded sampling, stop sequences, prefix
reuse), bad GGUF files refused at start-up, and the served model through outside clients."""

from __future__ import annotations

import dataclasses
import hashlib
import random
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import torch
from conftest import build_tiny_llama, start_orchestrator, wait_for
from test_convert import loguru_follows_pytest_capture  # noqa: F401  (convert.main re-points loguru)
from test_engine import (
    assert_a_draft_scores_as_if_fed_token_by_token,
    assert_greedy_tokens_ignore_the_batch,
    assert_seeded_sampling_ignores_the_batch,
    random_prompts,
    run,
    tokens_of,
)
from test_node_client import NODE, NODE_DIR, run_node
from test_prefix_cache import assert_n_answers_to_one_prompt_prefill_it_once

from nightcap.v1 import chat_pb2, chat_pb2_grpc, generation_pb2, generation_pb2_grpc
from services.common.errors import FailedPrecondition
from services.common.registry import ModelRegistry
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.prefix_cache import StoreKV
from services.generation.engine.request import Request, RequestStatus
from services.generation.engine.runner import execute_step
from services.generation.engine.sampling import SamplingConfig
from services.generation.engine.scheduler import ModelStep, PrefillChunk, SchedulerConfig
from services.generation.loading import check_flash_attn, load_model, make_runner, start_engine
from services.generation.server import start_generation_server
from training.gguf import hf_to_gguf

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: run `make llamacpp`")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama in float32 GGUF, with its Hugging Face tokenizer saved beside it."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-gguf"))
    return hf_to_gguf(folder, folder / "model.gguf", "f32", pre_tokenizer="gpt-2")


@pytest.fixture(scope="session")
def gguf_loaded(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    registry = ModelRegistry(tmp_path_factory.mktemp("registry"))
    return load_model(str(tiny_gguf), registry, runner="llamacpp", threads=2)


@pytest.fixture(scope="session")
def hf_loaded(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory):
    """The same weights in transformers, for comparing the runners."""
    return load_model(str(tiny_gguf.parent), ModelRegistry(tmp_path_factory.mktemp("registry-hf")))


def engine_for(loaded, **config) -> ContinuousBatchingEngine:
    return start_engine(loaded, SchedulerConfig(**{"max_batch_total_tokens": 8192, **config}))


def test_the_gguf_is_served_by_llama_cpp_with_its_own_description(gguf_loaded):
    assert gguf_loaded.runner == "llamacpp"
    assert gguf_loaded.architecture == "llama"
    assert gguf_loaded.dtype.upper() == "F32"
    assert gguf_loaded.vocab_size == gguf_loaded.tokenizer.vocab_size


def test_greedy_tokens_match_the_transformers_runner_on_the_same_weights(gguf_loaded, hf_loaded):
    ours, theirs = engine_for(gguf_loaded), engine_for(hf_loaded)
    try:
        for prompt, n in random_prompts(4, seed=7):
            assert (
                run(ours, prompt, max_new_tokens=n, ignore_eos=True)[0]
                == run(theirs, prompt, max_new_tokens=n, ignore_eos=True)[0]
            )
    finally:
        ours.shutdown(grace=1)
        theirs.shutdown(grace=1)


@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_flash_attention_on_or_off_gives_the_transformers_runners_tokens_and_reuses_prefixes(
    gguf_loaded, hf_loaded, flash_attn
):
    """--flash-attn reaches llama.cpp: without flash attention it stores values transposed (the saved prefixes'
    layout says so), and a conversation's later turns come back from the cache with the same greedy tokens."""
    warm = engine_for(dataclasses.replace(gguf_loaded, flash_attn=flash_attn), prefix_cache_bytes=64 << 20)
    theirs = engine_for(hf_loaded)
    rng = random.Random(29)
    conversation = [rng.randrange(1, 400) for _ in range(40)]
    try:
        for turn in range(3):
            conversation += [rng.randrange(1, 400) for _ in range(6)]
            request = warm.submit(Request(list(conversation), SamplingConfig(max_new_tokens=8, ignore_eos=True)))
            answer = tokens_of(request)
            assert answer == run(theirs, list(conversation), max_new_tokens=8, ignore_eos=True)[0]
            if turn:
                assert request.cached_tokens >= len(conversation) - 6 - 1
            conversation += answer
        assert warm.runner.layout is not None and warm.runner.layout.values_transposed == (flash_attn == "off")
    finally:
        warm.shutdown(grace=1)
        theirs.shutdown(grace=1)


def test_flash_attention_takes_llama_cpps_three_settings_on_the_llama_cpp_runner_only():
    for setting in ("auto", "on", "off"):
        check_flash_attn(setting, "llamacpp")
    check_flash_attn("auto", "transformers")
    with pytest.raises(FailedPrecondition, match="--flash-attn must be one of auto, off, on, got 'sometimes'"):
        check_flash_attn("sometimes", "llamacpp")
    with pytest.raises(FailedPrecondition, match="the transformers runner uses torch's"):
        check_flash_attn("off", "transformers")


@pytest.mark.parametrize("prefill_chunk", [2048, 16])
def test_greedy_tokens_are_the_same_alone_or_in_a_batch_of_16(gguf_loaded, prefill_chunk):
    assert_greedy_tokens_ignore_the_batch(engine_for(gguf_loaded, max_prefill_tokens=prefill_chunk))


def test_a_draft_scores_as_if_fed_token_by_token(gguf_loaded):
    assert_a_draft_scores_as_if_fed_token_by_token(
        lambda: make_runner(gguf_loaded, SchedulerConfig(max_batch_total_tokens=8192))
    )


def test_requests_join_and_leave_a_running_batch_without_changing_its_tokens(gguf_loaded):
    engine = engine_for(gguf_loaded, max_prefill_tokens=16)
    try:
        long_prompt, short_prompt = [5, 6, 7, 8, 9], [11, 12, 13]
        expected_long = run(engine, long_prompt, max_new_tokens=900, ignore_eos=True)[0]
        expected_short = run(engine, short_prompt, max_new_tokens=4, ignore_eos=True)[0]
        long = engine.submit(Request(long_prompt, SamplingConfig(max_new_tokens=900, ignore_eos=True)))
        assert wait_for(lambda: len(long.output_ids) >= 5)
        short = engine.submit(Request(short_prompt, SamplingConfig(max_new_tokens=4, ignore_eos=True)))
        assert tokens_of(short) == expected_short
        assert long.status is not RequestStatus.FINISHED_LENGTH  # the short one left first
        assert tokens_of(long) == expected_long
    finally:
        engine.shutdown(grace=1)
    assert engine.runner.rows == [] and len(engine.runner.slots.free) == 255  # every row's sequence id given back


def test_a_cancelled_request_leaves_at_the_next_step_and_frees_its_sequence(gguf_loaded):
    engine = engine_for(gguf_loaded, prefix_cache_bytes=0)
    try:
        request = engine.submit(Request([3, 4, 5], SamplingConfig(max_new_tokens=4000, ignore_eos=True)))
        assert wait_for(lambda: len(request.output_ids) >= 3)
        request.cancel()
        events = list(request.events(timeout=30))
        assert events[-1].status is RequestStatus.FINISHED_CANCELLED
        assert wait_for(lambda: engine.active_sequences == 0 and engine.runner.rows == [])
        assert run(engine, [3, 4, 5], max_new_tokens=3, ignore_eos=True)[1].status is RequestStatus.FINISHED_LENGTH
    finally:
        engine.shutdown(grace=1)


def test_seeded_sampling_does_not_depend_on_the_batch(gguf_loaded):
    assert_seeded_sampling_ignores_the_batch(engine_for(gguf_loaded))


def test_a_stop_sequence_ends_the_answer_before_it(gguf_loaded):
    engine = engine_for(gguf_loaded)
    tokenizer = gguf_loaded.tokenizer
    try:
        free = run(engine, [20, 21, 22], max_new_tokens=24, ignore_eos=True)[0]
        text = tokenizer.decode(free)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop.strip(), f"no text to stop on in {text!r}"
        stopped, finished = run(engine, [20, 21, 22], max_new_tokens=24, ignore_eos=True, stop=[stop])
    finally:
        engine.shutdown(grace=1)
    assert finished.status is RequestStatus.FINISHED_STOP_SEQUENCE and finished.stop_sequence == stop
    assert len(stopped) < len(free) and free[: len(stopped)] == stopped


def test_a_prefix_reused_from_the_cache_gives_the_tokens_of_a_cold_prefill(gguf_loaded):
    warm, cold = engine_for(gguf_loaded, prefix_cache_bytes=64 << 20), engine_for(gguf_loaded, prefix_cache_bytes=0)
    rng = random.Random(5)
    system = [rng.randrange(1, 400) for _ in range(30)]
    try:
        conversation = list(system)
        for turn in range(4):
            conversation += [rng.randrange(1, 400) for _ in range(6)]
            request = warm.submit(Request(list(conversation), SamplingConfig(max_new_tokens=8, ignore_eos=True)))
            answer = tokens_of(request)
            if turn:  # the earlier turns' prompt and answer (less the last sampled token) come from the cache
                assert request.cached_tokens >= len(conversation) - 6 - 1
            assert answer == run(cold, list(conversation), max_new_tokens=8, ignore_eos=True)[0]
            conversation += answer
        # 16 requests sharing the system prompt, at once: one prefill of it, the same tokens as cold ones
        prompts = [system + [rng.randrange(1, 400) for _ in range(5)] for _ in range(16)]
        shared = [warm.submit(Request(p, SamplingConfig(max_new_tokens=6, ignore_eos=True))) for p in prompts]
        assert [tokens_of(r) for r in shared] == [run(cold, p, max_new_tokens=6, ignore_eos=True)[0] for p in prompts]
        assert all(r.cached_tokens >= len(system) for r in shared)
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)


def test_n_answers_to_one_prompt_prefill_it_once_and_answer_as_without_the_cache(gguf_loaded):
    assert_n_answers_to_one_prompt_prefill_it_once(
        engine_for(gguf_loaded, prefix_cache_bytes=64 << 20), engine_for(gguf_loaded, prefix_cache_bytes=0)
    )


def pool_cells(runner) -> int:
    """Cells of llama.cpp's KV pool that some sequence holds."""
    llama = runner._llama
    return sum(
        llama.llama_memory_seq_pos_max(runner.kv, seq) - llama.llama_memory_seq_pos_min(runner.kv, seq) + 1
        for seq in range(256)
        if llama.llama_memory_seq_pos_max(runner.kv, seq) >= 0
    )


def test_cached_prefixes_wait_in_host_memory_and_leave_the_pool_empty_between_requests(gguf_loaded):
    """The pool holds the running rows only (what llama.cpp's attention walks each step); a hit comes back
    from host memory after its row and every trace of it left the pool."""
    warm, cold = engine_for(gguf_loaded, prefix_cache_bytes=64 << 20), engine_for(gguf_loaded, prefix_cache_bytes=0)
    rng = random.Random(17)
    prompt = [rng.randrange(1, 400) for _ in range(50)]
    try:
        first = run(warm, prompt, max_new_tokens=6, ignore_eos=True)[0]
        assert wait_for(lambda: warm.runner.rows == [] and warm.runner.nodes)
        assert pool_cells(warm.runner) == 0 and warm.runner.cached_bytes > 0
        follow_up = [*prompt, *first, 7, 8, 9]
        request = warm.submit(Request(follow_up, SamplingConfig(max_new_tokens=8, ignore_eos=True)))
        answer = tokens_of(request)
        assert answer == run(cold, follow_up, max_new_tokens=8, ignore_eos=True)[0]
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    assert request.cached_tokens == len(prompt) + len(first) - 1


def test_turn_10_of_a_conversation_past_4096_tokens_reuses_every_earlier_turn(gguf_loaded):
    warm, cold = engine_for(gguf_loaded, prefix_cache_bytes=64 << 20), engine_for(gguf_loaded, prefix_cache_bytes=0)
    rng = random.Random(23)
    conversation: list[int] = []
    buffers: list = []  # the arrays restores were joined in (held here, so no two share an id)
    try:
        for _ in range(10):
            conversation += [rng.randrange(1, 400) for _ in range(460)]
            request = warm.submit(Request(list(conversation), SamplingConfig(max_new_tokens=4, ignore_eos=True)))
            answer = tokens_of(request)
            conversation += answer
            if not any(b is warm.runner._joined for b in buffers):
                buffers.append(warm.runner._joined)
        expected = run(cold, conversation[: -len(answer)], max_new_tokens=4, ignore_eos=True)[0]
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    assert len(conversation) > 4096 and answer == expected
    assert request.cached_tokens == len(conversation) - 460 - 4 - 1  # every earlier turn, less the last token sampled
    # one join buffer, doubled as the conversation grew (the empty one and five sizes), not one per turn
    assert len(buffers) <= 6


def test_a_prefix_that_ends_inside_a_cached_node_is_reused_in_part(gguf_loaded):
    warm, cold = engine_for(gguf_loaded, prefix_cache_bytes=64 << 20), engine_for(gguf_loaded, prefix_cache_bytes=0)
    rng = random.Random(19)
    prompt = [rng.randrange(1, 400) for _ in range(40)]
    branch = [*prompt[:25], *[rng.randrange(1, 400) for _ in range(7)]]
    try:
        run(warm, prompt, max_new_tokens=4, ignore_eos=True)
        request = warm.submit(Request(branch, SamplingConfig(max_new_tokens=10, ignore_eos=True)))
        answer = tokens_of(request)
        assert answer == run(cold, branch, max_new_tokens=10, ignore_eos=True)[0]
        # the branch split the node at 25: the first prompt now reads two nodes, the whole of both
        again = warm.submit(Request([*prompt, 3], SamplingConfig(max_new_tokens=10, ignore_eos=True)))
        assert tokens_of(again) == run(cold, [*prompt, 3], max_new_tokens=10, ignore_eos=True)[0]
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    assert request.cached_tokens == 25 and again.cached_tokens >= len(prompt)


def test_the_host_cache_stays_within_its_bytes_and_counts_what_it_holds(gguf_loaded):
    per_token = gguf_loaded.model.kv_bytes_per_token
    budget = 120 * per_token
    warm = engine_for(gguf_loaded, prefix_cache_bytes=budget, max_batch_size=8)
    cold = engine_for(gguf_loaded, prefix_cache_bytes=0)
    rng = random.Random(9)
    cases = [[rng.randrange(1, 400) for _ in range(30)] for _ in range(12)]
    try:
        got = [run(warm, p, max_new_tokens=4, ignore_eos=True)[0] for p in [*cases, cases[-1]]]
        expected = [run(cold, p, max_new_tokens=4, ignore_eos=True)[0] for p in [*cases, cases[-1]]]
    finally:
        # the last answer's store and evictions run in the worker's next step: compare once it has stopped
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    index, metrics = warm.scheduler.prefix, warm.metrics
    assert got == expected
    assert index.stats.evictions > 0 and index.stats.hits >= 1  # the repeated last prompt
    assert len(warm.runner.nodes) == index.nodes
    assert 0 < warm.runner.cached_bytes == index.held * per_token <= budget  # what host memory holds is what is counted
    assert metrics.prefix_cache_bytes._value.get() == warm.runner.cached_bytes


def test_more_cached_prompts_than_llama_cpp_has_sequence_ids(gguf_loaded):
    """Nodes live in host memory, not in sequence ids: the tree is bounded by bytes only."""
    engine = engine_for(gguf_loaded, prefix_cache_bytes=64 << 20, max_batch_size=8)
    rng = random.Random(9)
    try:
        for _ in range(300):
            run(engine, [rng.randrange(1, 400) for _ in range(4)], max_new_tokens=1, ignore_eos=True)
    finally:
        engine.shutdown(grace=1)
    assert engine.scheduler.prefix.nodes > 256 and engine.scheduler.prefix.stats.evictions == 0
    assert len(engine.runner.nodes) == engine.scheduler.prefix.nodes


def test_a_prefix_restored_into_a_fragmented_pool_scores_as_one_restored_whole(gguf_loaded):
    """A saved prefix goes back into whatever cells are free, scattered between other rows' cells."""
    from services.generation.engine.runners.llamacpp_state import join_state

    config = SchedulerConfig(max_batch_total_tokens=512, max_batch_size=32)
    runner = make_runner(gguf_loaded, config)
    prompt = list(range(10, 70))
    execute_step(runner, ModelStep(0, prefill=PrefillChunk(0, len(prompt), True, (tuple(prompt),))))
    runner.apply_cache_ops([StoreKV(1, 0, 0, len(prompt))])
    saved = runner.nodes[1]
    whole = runner.slots.take()
    runner._restore(whole, join_state(runner.layout, [saved]))
    # fill the rest of the pool from 200 rows in turn, then free every other row: no free run of 60 cells is left
    fillers = [runner.slots.take() for _ in range(200)]
    free = runner.kv_cells - pool_cells(runner)
    for index in range(free):
        seq = fillers[index % len(fillers)]
        runner.lengths[seq] = runner.lengths.get(seq, 0)
        runner._add(0, 1, seq, logits=False)
        runner._decode(1)
    for seq in fillers[::2]:
        runner._llama.llama_memory_seq_rm(runner.kv, seq, -1, -1)
    pieces = runner.slots.take()
    runner._restore(pieces, join_state(runner.layout, [saved]))
    llama = runner._llama
    assert llama.llama_memory_seq_pos_min(runner.kv, pieces) == 0
    assert llama.llama_memory_seq_pos_max(runner.kv, pieces) == len(prompt) - 1
    scores = []
    for seq in (whole, pieces):
        runner.lengths[seq] = len(prompt)
        runner._add(0, 77, seq, logits=True)
        runner._decode(1)
        scores.append(runner._logits(1))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)


def test_a_saved_sequence_in_a_layout_we_do_not_read_is_refused():
    import numpy as np

    from services.generation.engine.runners.llamacpp_state import StateFormatError, parse_state

    with pytest.raises(StateFormatError):
        parse_state(np.zeros(40, np.uint8))
    with pytest.raises(StateFormatError):
        parse_state(np.frombuffer(bytes(8) + (2).to_bytes(4, "little") + (1).to_bytes(4, "little"), np.uint8))


# -- bad GGUF files: refused at start-up, naming the file ----------------------------------------------


def serve_exit(model: Path, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "services.generation", "serve", "--runner", "llamacpp", "--model", str(model)]
    command += ["--address", "127.0.0.1:0", "--metrics-address", "", "--var-dir", str(tmp_path), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_truncated_gguf_is_refused_at_start_up_naming_the_file(tiny_gguf: Path, tmp_path: Path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    with pytest.raises(FailedPrecondition, match=r"truncated\.gguf"):
        load_model(str(truncated), ModelRegistry(tmp_path / "models"), runner="llamacpp")
    done = serve_exit(truncated, tmp_path)
    assert done.returncode == 2 and "truncated.gguf" in done.stderr


def test_a_gguf_of_an_architecture_llama_cpp_does_not_know_is_refused(tmp_path: Path):
    import gguf

    path = tmp_path / "strange.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-architecture")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FailedPrecondition, match=r"strange\.gguf.*no-such-architecture|no-such-architecture"):
        load_model(str(path), ModelRegistry(tmp_path / "models"), runner="llamacpp")


def test_a_file_that_is_not_gguf_and_a_folder_without_one_are_refused(tmp_path: Path, tiny_gguf: Path):
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(FailedPrecondition, match=r"needs a \.gguf file"):
        load_model(str(tiny_gguf.parent / "config.json"), registry, runner="llamacpp")
    empty = tmp_path / "no-gguf"
    empty.mkdir()
    with pytest.raises(FailedPrecondition, match=r"holds no \.gguf file"):
        load_model(str(empty), registry, runner="llamacpp")


def test_a_kv_cache_larger_than_memory_is_refused_at_start_up(tiny_gguf: Path, tmp_path: Path):
    done = serve_exit(tiny_gguf, tmp_path, "--max-batch-total-tokens", str(2**31))
    assert done.returncode == 2 and "llama.cpp could not make a context" in done.stderr and "model.gguf" in done.stderr


def test_llamacpp_refuses_placements_it_cannot_honour(tiny_gguf: Path, tmp_path: Path):
    done = serve_exit(tiny_gguf, tmp_path, "--quantize", "int8")
    assert done.returncode == 2 and "drop --num-shard, --device-map and --quantize" in done.stderr


# -- served: gRPC, outside clients, 64 callers -----------------------------------------------------------


@pytest.fixture(scope="module")
def llamacpp_server(gguf_loaded):
    engine = start_engine(
        gguf_loaded,
        SchedulerConfig(max_concurrent_requests=128, max_batch_total_tokens=16384, prefix_cache_bytes=64 << 20),
    )
    running = start_generation_server(gguf_loaded, engine, "127.0.0.1:0", default_max_new_tokens=16)
    orchestrator = start_orchestrator(running.address, None, max_new_tokens=8)
    yield running.address, orchestrator.address
    orchestrator.stop(grace=1.0)
    engine.shutdown(grace=1.0)
    running.stop(grace=1.0)


def test_a_raw_stub_without_a_deadline_streams_from_llama_cpp(llamacpp_server):
    generation, _ = llamacpp_server
    with grpc.insecure_channel(generation) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        info = stub.ModelInfo(generation_pb2.ModelInfoRequest())
        responses = list(
            stub.Generate(
                generation_pb2.GenerateRequest(text="hello world", params={"max_new_tokens": 6, "ignore_eos": True})
            )
        )
    assert info.dtype.upper() == "F32"
    assert responses[-1].finish.generated_tokens == 6


def test_64_concurrent_chats_all_answer(llamacpp_server):
    _, orchestrator = llamacpp_server
    results: list[int] = []

    def chat() -> None:
        with grpc.insecure_channel(orchestrator) as channel:
            responses = list(
                chat_pb2_grpc.ChatStub(channel).Chat(
                    chat_pb2.ChatRequest(message="Where is Zurich?", params={"max_new_tokens": 8, "ignore_eos": True})
                )
            )
        results.append(responses[-1].end.completion_tokens)

    callers = [threading.Thread(target=chat) for _ in range(64)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(120)
    assert results == [8] * 64


@pytest.mark.skipif(NODE is None, reason="node is not installed: the Node.js client cannot run")
def test_the_node_client_chats_and_cancels_on_llama_cpp(llamacpp_server):
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300)
    _, orchestrator = llamacpp_server
    answered = run_node(NODE_DIR / "chat_client.mjs", orchestrator, "no-deadline")
    assert answered["code"] == "OK" and answered["events"][-1] == "end"
    cancelled = run_node(NODE_DIR / "chat_client.mjs", orchestrator, "cancel")
    assert cancelled["code"] == "CANCELLED"


# -- the registry holds GGUF versions: kept as they came, or made by llama.cpp's converter ------------------


def test_convert_keeps_a_gguf_as_it_came_and_both_runners_serve_that_version(tiny_gguf: Path, tmp_path: Path):
    from training import convert

    var = tmp_path / "var"
    assert convert.main(["--gguf", str(tiny_gguf), "--name", "tiny-gguf", "--var-dir", str(var)]) == 0
    registry = ModelRegistry(var / "models")
    version = registry.resolve("tiny-gguf")
    kept = version.path / "model.gguf"
    assert kept.read_bytes() == tiny_gguf.read_bytes()
    assert version.metadata.files["model.gguf"] == hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert not list(version.path.glob("*.safetensors"))
    on_llama_cpp = load_model("tiny-gguf", registry, runner="llamacpp")
    on_transformers = load_model("tiny-gguf", registry)
    assert on_llama_cpp.model.path == kept and on_llama_cpp.version == version.metadata.version
    ours, theirs = engine_for(on_llama_cpp), engine_for(on_transformers)
    try:
        assert (
            run(ours, [7, 8, 9], max_new_tokens=8, ignore_eos=True)[0]
            == run(theirs, [7, 8, 9], max_new_tokens=8, ignore_eos=True)[0]
        )
    finally:
        ours.shutdown(grace=1)
        theirs.shutdown(grace=1)


def test_convert_to_gguf_adds_a_quantized_gguf_that_llama_cpp_serves(tiny_gguf: Path, tmp_path: Path):
    from training import convert

    var = tmp_path / "var"
    argv = ["--hf", str(tiny_gguf.parent), "--name", "tiny-q8", "--var-dir", str(var), "--to-gguf", "q8_0"]
    assert convert.main([*argv, "--gguf-pre-tokenizer", "gpt-2"]) == 0
    version = ModelRegistry(var / "models").resolve("tiny-q8")
    assert list(version.path.glob("*.safetensors")) and "model.gguf" in version.metadata.files
    loaded = load_model("tiny-q8", ModelRegistry(var / "models"), runner="llamacpp")
    assert loaded.dtype == "Q8_0"
    engine = engine_for(loaded)
    try:
        assert len(run(engine, [7, 8, 9], max_new_tokens=5, ignore_eos=True)[0]) == 5
    finally:
        engine.shutdown(grace=1)


def test_a_new_gguf_version_swaps_in_live_and_rolls_back(tiny_gguf: Path, tmp_path: Path):
    from services.generation.host import ModelHost
    from training import convert

    var = tmp_path / "var"
    for _ in range(2):
        assert convert.main(["--gguf", str(tiny_gguf), "--name", "tiny-gguf", "--var-dir", str(var)]) == 0
    registry = ModelRegistry(var / "models")

    def load(spec: str):
        return load_model(spec, registry, runner="llamacpp")

    first = load("tiny-gguf:1")
    host = ModelHost(first, engine_for(first), registry, load=load, drain_seconds=5)
    try:
        before = run(host.active.engine, [4, 5, 6], max_new_tokens=6, ignore_eos=True)[0]
        stages = [event.stage for event in host.start_swap("tiny-gguf:2").events()]
        assert "switched" in stages and host.active.label == "tiny-gguf:2"
        assert run(host.active.engine, [4, 5, 6], max_new_tokens=6, ignore_eos=True)[0] == before
        list(host.start_rollback().events())
        assert host.active.label == "tiny-gguf:1"
    finally:
        host.shutdown(grace=1)
