"""Prefix caching: a prompt that starts with tokens the engine has run reuses their KV, and the tokens it
generates are exactly those of a cold prefill, whatever column or batch row the reused prefix lands in."""

from __future__ import annotations

import random
import threading

import pytest

from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.prefix_cache import EvictKV, KVStore, PrefixIndex, SplitKV, StoreKV
from services.generation.engine.request import Request, RequestStatus, TokenChunk
from services.generation.engine.runners.transformers import kv_bytes_per_token
from services.generation.engine.sampling import SamplingConfig
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.loading import start_engine

CACHE = 1 << 26  # bytes: far more than these tests fill


def engine_with(model, cache_bytes: int = CACHE, **config) -> ContinuousBatchingEngine:
    return start_engine(model, SchedulerConfig(prefix_cache_bytes=cache_bytes, **config))


def submit_all(engine, cases: list[tuple[list[int], int]]) -> list[Request]:
    return [engine.submit(Request(p, SamplingConfig(max_new_tokens=n, ignore_eos=True))) for p, n in cases]


def tokens_of(request: Request) -> list[int]:
    return [i for e in request.events(timeout=60) if isinstance(e, TokenChunk) for i in e.token_ids]


def one_by_one(engine, cases) -> list[list[int]]:
    return [tokens_of(submit_all(engine, [case])[0]) for case in cases]


def submit_at_once(engine, cases: list[tuple[list[int], int]]) -> list[Request]:
    """``submit_all`` before the engine's worker plans its next step, as a chat's n answers arrive together."""
    with engine._wakeup:  # the worker schedules holding it
        return submit_all(engine, cases)


def assert_n_answers_to_one_prompt_prefill_it_once(warm, cold) -> None:
    """Four requests with one prompt at once: the first prefills it, the other three take all of it but its
    last token from ``warm``'s prefix cache, and all answer as they do from ``cold``, which has none (shuts
    both engines down)."""
    prompt = random_tokens(random.Random(13), 40)
    try:
        shared = submit_at_once(warm, [(prompt, 12)] * 4)
        got = [tokens_of(r) for r in shared]
        apart = submit_at_once(cold, [(prompt, 12)] * 4)
        expected = [tokens_of(r) for r in apart]
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    assert [r.cached_tokens for r in shared] == [0] + [len(prompt) - 1] * 3  # one token prefilled each
    assert [r.cached_tokens for r in apart] == [0] * 4
    assert got == expected


def random_tokens(rng: random.Random, count: int) -> list[int]:
    return [rng.randrange(1, 400) for _ in range(count)]


# -- the index alone -------------------------------------------------------------------------------------


def test_the_index_matches_to_the_token_and_splits_a_node_where_a_new_path_branches():
    index = PrefixIndex(capacity=1000)
    (store,) = index.insert([1, 2, 3, 4, 5], row=0)
    assert store == StoreKV(store.node, 0, 0, 5)
    assert index.match([1, 2, 3, 9]).tokens == 3  # inside the node
    ops = index.insert([1, 2, 3, 7, 8], row=2)
    split, new = ops
    assert split == SplitKV(store.node, 3, split.new) and new == StoreKV(new.node, 2, 3, 5)
    reuse = index.match([1, 2, 3, 7, 8, 6])
    assert reuse.tokens == 5 and reuse.segments == ((store.node, 3), (new.node, 2))
    assert index.match([1, 2, 3, 4, 5]).segments == ((store.node, 3), (split.new, 2))
    assert index.insert([1, 2, 3], row=1) == []  # already held
    assert index.held == 7 and index.nodes == 3


def test_the_index_evicts_least_recently_used_leaves_and_never_holds_more_than_its_capacity():
    index = PrefixIndex(capacity=10)
    index.insert([1, 2, 3, 4], row=0)
    index.insert([5, 6, 7, 8], row=0)
    index.match([1, 2, 3, 4])  # [1..4] is now more recent than [5..8]
    ops = index.insert([9, 10, 11, 12], row=0)
    assert isinstance(ops[-1], EvictKV) and index.held == 8
    assert index.match([5, 6, 7, 8]).tokens == 0 and index.match([1, 2, 3, 4]).tokens == 4
    assert index.insert(list(range(100, 120)), row=0) == []  # longer than the whole cache: not kept
    assert index.stats.evictions == 1


def test_the_store_follows_the_index_operations():
    import torch

    index, store = PrefixIndex(capacity=100), KVStore()
    kv = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)  # heads, tokens, head_dim

    def row_kv(_row, start, end):
        return [(kv[:, start:end], -kv[:, start:end])]

    for op in index.insert([1, 2, 3, 4, 5, 6], row=0):
        store.apply(op, row_kv)
    for op in index.insert([1, 2, 3, 9], row=0):
        store.apply(op, lambda _row, start, end: [(kv[:, start:end] + 100, kv[:, start:end] + 100)])
    keys, values = store.read(index.match([1, 2, 3, 4, 5, 6]).segments)[0]
    assert torch.equal(keys, kv) and torch.equal(values, -kv)
    keys, _ = store.read(index.match([1, 2, 3, 9]).segments)[0]
    assert torch.equal(keys[:, :3], kv[:, :3]) and torch.equal(keys[:, 3:], kv[:, 3:4] + 100)


# -- the engine ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill_chunk", [2048, 16])
def test_greedy_tokens_with_cache_hits_equal_a_cold_prefill_alone_and_in_a_batch_of_16(model, prefill_chunk):
    rng = random.Random(7)
    system = random_tokens(rng, 24)
    cases = [(system + random_tokens(rng, rng.randrange(1, 30)), rng.randrange(5, 25)) for _ in range(16)]
    cold, warm = start_engine(model, SchedulerConfig(max_prefill_tokens=prefill_chunk)), None
    try:
        expected = one_by_one(cold, cases)
        warm = engine_with(model, max_prefill_tokens=prefill_chunk)
        alone = one_by_one(warm, cases)  # each after the first reuses the shared system prompt
        requests = submit_all(warm, cases)  # all reuse their whole prompt but its last token
        together = [tokens_of(r) for r in requests]
        cached = [r.cached_tokens for r in requests]
    finally:
        cold.shutdown(grace=1)
        if warm is not None:
            warm.shutdown(grace=1)
    assert alone == expected and together == expected
    assert cached == [len(p) - 1 for p, _ in cases]


@pytest.mark.parametrize("prefill_chunk", [2048, 16])
def test_n_answers_to_one_prompt_prefill_it_once_and_answer_as_without_the_cache(model, prefill_chunk):
    assert_n_answers_to_one_prompt_prefill_it_once(
        engine_with(model, max_prefill_tokens=prefill_chunk),
        start_engine(model, SchedulerConfig(max_prefill_tokens=prefill_chunk)),
    )


def test_a_reused_prefix_lands_at_another_column_and_batch_row_and_changes_nothing(model):
    rng = random.Random(3)
    short = random_tokens(rng, 6)
    first_turn = (short, 8)
    batch = [
        (random_tokens(rng, 37), 10),  # longer than anything else: the cached row sits far to the right
        (short + random_tokens(rng, 12), 12),  # reuses ``short`` from row 1, after its own gap
        (random_tokens(rng, 3), 6),
    ]
    cold, warm = start_engine(model), engine_with(model)
    try:
        expected = one_by_one(cold, [first_turn, *batch])
        assert one_by_one(warm, [first_turn]) == expected[:1]
        requests = submit_all(warm, batch)
        got = [tokens_of(r) for r in requests]
    finally:
        cold.shutdown(grace=1)
        warm.shutdown(grace=1)
    assert [r.cached_tokens for r in requests] == [0, len(short), 0]
    assert got == expected[1:]


def test_the_next_turn_reuses_the_whole_previous_prompt_and_answer(model):
    rng = random.Random(11)
    prompt, answer_tokens = random_tokens(rng, 30), 12
    warm, cold = engine_with(model), start_engine(model)
    try:
        (answer,) = one_by_one(warm, [(prompt, answer_tokens)])
        second = prompt + answer + random_tokens(rng, 5)
        (request,) = submit_all(warm, [(second, 10)])
        reply = tokens_of(request)
        (expected,) = one_by_one(cold, [(second, 10)])
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    # the answer's last token was sampled but never fed back, so its KV does not exist yet
    assert request.cached_tokens == len(prompt) + answer_tokens - 1
    assert reply == expected


def test_a_cancelled_request_leaves_its_prefix_behind_and_the_output_stays_right(tiny_loaded):
    prompt = list(range(10, 40))
    warm, cold = engine_with(tiny_loaded), start_engine(tiny_loaded)
    try:
        (long,) = submit_all(warm, [(prompt, 500)])
        events = long.events(timeout=60)
        next(events)
        long.cancel()
        assert [e for e in events][-1].status is RequestStatus.FINISHED_CANCELLED
        (again,) = submit_all(warm, [([*prompt, 5, 6], 10)])
        got = tokens_of(again)
        (expected,) = one_by_one(cold, [([*prompt, 5, 6], 10)])
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    assert again.cached_tokens >= len(prompt)
    assert got == expected


def test_a_small_cache_evicts_and_stays_within_its_bytes(tiny_loaded):
    per_token = kv_bytes_per_token(tiny_loaded.model.config, tiny_loaded.model.dtype)
    rng = random.Random(5)
    cases = [(random_tokens(rng, 40), 8) for _ in range(12)]
    warm, cold = engine_with(tiny_loaded, cache_bytes=100 * per_token), start_engine(tiny_loaded)
    try:
        got = one_by_one(warm, cases + cases[-1:])
        expected = one_by_one(cold, cases + cases[-1:])
        metrics = warm.metrics
        held = metrics.prefix_cache_bytes._value.get()
        evictions = metrics.prefix_cache_evictions._value.get()
        tensors = sum(k.numel() * k.element_size() * 2 for n in warm.runner.prefixes.nodes.values() for k, _ in n)
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    assert got == expected
    assert evictions > 0 and 0 < held <= 100 * per_token
    assert tensors == held  # what the store really holds is what the index counts
    assert metrics.prefix_cache_hits._value.get() >= 1  # the repeated last prompt


def test_concurrent_turns_of_many_conversations_match_the_cold_engine(tiny_llama):
    """Eight conversations of four turns, all at once: joins, leaves and hits interleave."""
    rng = random.Random(21)
    systems = [random_tokens(rng, 10) for _ in range(8)]
    asks = [[random_tokens(rng, rng.randrange(2, 8)) for _ in range(4)] for _ in range(8)]
    warm, cold = engine_with(tiny_llama, max_prefill_tokens=32), start_engine(tiny_llama)
    results: dict[tuple[str, int], list[list[int]]] = {}

    def talk(engine, name: str, which: int) -> None:
        history, replies = list(systems[which]), []
        for ask in asks[which]:
            history += ask
            (request,) = submit_all(engine, [(list(history), 6)])
            reply = tokens_of(request)
            history += reply
            replies.append(reply)
        results[(name, which)] = replies

    try:
        for name, engine in (("warm", warm), ("cold", cold)):
            threads = [threading.Thread(target=talk, args=(engine, name, i)) for i in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
        hits = warm.metrics.prefix_cache_hits._value.get()
    finally:
        warm.shutdown(grace=1)
        cold.shutdown(grace=1)
    assert all(results[("warm", i)] == results[("cold", i)] for i in range(8))
    assert hits >= 8 * 3  # every turn after the first


# -- llama.cpp's saved sequences: the host-memory form of its runner's nodes ------------------------------


def saved_sequence(positions: list[int], transposed: bool, layers: int = 2, row: int = 6, width: int = 3) -> bytes:
    """A sequence as llama.cpp 0.3.36 saves it (``llama_state_seq_get_data``), each byte of data telling
    which layer, cell and offset it is."""
    import struct

    cells = len(positions)
    out = struct.pack("<II", 0xAF143CD8, 5) + struct.pack("<II", 1, cells)
    out += b"".join(struct.pack("<iIi", pos, 1, 5) for pos in positions)
    out += struct.pack("<II", int(transposed), layers)
    for layer in range(layers):  # keys: a row per cell
        out += struct.pack("<iQ", 1, row) + bytes(
            (layer * 50 + pos * 7 + i) % 256 for pos in positions for i in range(row)
        )
    for layer in range(layers):  # values: a row per cell, or a row of cells per element when transposed
        if transposed:
            data = bytes(
                (layer * 30 + pos * 5 + j * 11 + i) % 256 for j in range(width) for pos in positions for i in range(2)
            )
            out += struct.pack("<iII", 1, 2, width) + data
        else:
            out += struct.pack("<iQ", 1, row) + bytes(
                (layer * 30 + pos * 5 + i) % 256 for pos in positions for i in range(row)
            )
    return out


@pytest.mark.parametrize("transposed", [False, True])
def test_a_saved_llama_cpp_sequence_is_cut_and_joined_back_byte_for_byte(transposed):
    import numpy as np

    from services.generation.engine.runners.llamacpp_state import join_state, parse_state, state_size

    original = saved_sequence(list(range(10)), transposed)
    layout, saved = parse_state(np.frombuffer(original, np.uint8).copy())
    assert (saved.start, saved.cells, layout.bytes_per_cell) == (0, 10, 2 * 6 + 2 * 6)  # keys and values, 2 layers
    assert saved.nbytes == 10 * layout.bytes_per_cell
    first, rest = saved.part(0, 4, copy=True), saved.part(4, 10, copy=True)
    assert rest.start == 4
    assert join_state(layout, [first, rest]).tobytes() == original
    # a match that ends inside a node: the first 7 positions, as llama.cpp would have saved them
    assert join_state(layout, [first, rest.part(0, 3)]).tobytes() == saved_sequence(list(range(7)), transposed)
    # cells saved out of position order (a row's token in a hole of the pool) come back in order
    _, shuffled = parse_state(np.frombuffer(saved_sequence([0, 1, 5, 2, 3, 4], transposed), np.uint8).copy())
    assert join_state(layout, [shuffled]).tobytes() == saved_sequence(list(range(6)), transposed)
    # joined into a reused buffer (the runner's, so a restore touches no fresh memory): the same bytes, in it
    buffer = np.full(len(original) + 100, 255, np.uint8)
    joined = join_state(layout, [first, rest], into=buffer)
    assert joined.tobytes() == original and np.shares_memory(joined, buffer)
    assert state_size(layout, 10) == len(original)
    small = np.zeros(len(original) - 1, np.uint8)  # too small: a new array, the buffer untouched
    assert join_state(layout, [first, rest], into=small).tobytes() == original and not small.any()
