"""The scheduler alone, without a model: each step's plan as plain data (admission, limits, chunked
prefill, joining and leaving), and how the step's tokens are applied."""

from __future__ import annotations

import pickle

import pytest

from services.common.errors import ResourceExhausted
from services.generation.engine.request import Request, RequestStatus
from services.generation.engine.sampling import SamplingConfig
from services.generation.engine.scheduler import (
    DEAD_ROW_TOKEN,
    SHARED_PREFIX_MIN_TOKENS,
    ContinuousBatchScheduler,
    PrefillChunk,
    SchedulerConfig,
)

EOS = 0
LONG = SHARED_PREFIX_MIN_TOKENS + 8  # a prompt long enough that sharing it is worth a step's wait


def request(prompt_length: int = 4, new_tokens: int = 3, **config) -> Request:
    return Request(list(range(1, prompt_length + 1)), SamplingConfig(max_new_tokens=new_tokens, **config))


def scheduler(**config) -> ContinuousBatchScheduler:
    return ContinuousBatchScheduler(SchedulerConfig(**config), eos_token_ids=frozenset({EOS}))


def step(s: ContinuousBatchScheduler, token: int = 7):
    """One step where the model answers every sampled row with ``token``."""
    output = s.schedule()
    finished = s.update_from_output(output, [token] * len(output.sampled))
    return output, finished


def test_a_lone_request_prefills_then_decodes_until_its_length():
    s = scheduler()
    r = request(prompt_length=5, new_tokens=3)
    s.add(r)
    first, _ = step(s, token=11)
    assert first.model.prefill == PrefillChunk(0, 5, True, (tuple(range(1, 6)),))
    assert first.model.decode_tokens == () and first.sampled == [r]
    second, _ = step(s, token=12)
    assert second.model.prefill is None and second.model.decode_tokens == (11,)
    third, finished = step(s, token=13)
    assert third.model.decode_tokens == (12,)
    assert finished == [r] and r.status is RequestStatus.FINISHED_LENGTH and r.output_ids == [11, 12, 13]
    leaving = s.schedule()
    assert leaving.model.keep == () and leaving.model.idle and not s.has_work


def test_requests_waiting_together_are_admitted_as_one_group_up_to_the_batch_size():
    s = scheduler(max_batch_size=3)
    requests = [request() for _ in range(5)]
    for r in requests:
        s.add(r)
    output, _ = step(s)
    assert output.prefilling == requests[:3] and len(output.model.prefill.prompts) == 3
    assert [r.status for r in requests[3:]] == [RequestStatus.WAITING] * 2
    output, _ = step(s)
    assert output.model.prefill is None and len(output.model.decode_tokens) == 3  # the batch is full


def test_the_token_budget_holds_back_the_head_of_the_queue_and_nobody_overtakes_it():
    s = scheduler(max_batch_total_tokens=20)
    big, small = request(prompt_length=10, new_tokens=6), request(prompt_length=1, new_tokens=1)
    first = request(prompt_length=2, new_tokens=6)
    for r in (first, big, small):
        s.add(r)
    output, _ = step(s)
    assert output.prefilling == [first]  # 8 tokens; the big one (16) would make 24 > 20
    output, _ = step(s)
    assert output.prefilling == [] and big.status is RequestStatus.WAITING and small.status is RequestStatus.WAITING


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_decodes():
    s = scheduler(max_prefill_tokens=8)
    short = request(prompt_length=2, new_tokens=50)
    s.add(short)
    step(s)
    long = request(prompt_length=20, new_tokens=2)
    s.add(long)
    chunks = []
    for _ in range(3):
        output, _ = step(s)
        chunks.append(output.model.prefill)
        assert output.model.decode_tokens == (7,)  # the short request keeps decoding meanwhile
    assert [(c.start, c.end, c.last) for c in chunks] == [(0, 8, False), (8, 16, False), (16, 20, True)]
    assert chunks[0].prompts and not chunks[1].prompts  # the prompt travels once
    output, _ = step(s)
    assert output.decoding == [short, long] and len(output.model.decode_tokens) == 2


def test_a_group_splits_its_chunk_budget_over_its_rows():
    s = scheduler(max_prefill_tokens=8)
    for _ in range(2):
        s.add(request(prompt_length=3))
    s.add(request(prompt_length=8))  # 3 + 3 + 8 > 8: waits for the next group
    output, _ = step(s)
    assert len(output.prefilling) == 2 and output.model.prefill.end == 3
    output, _ = step(s)
    assert output.model.prefill == PrefillChunk(0, 8, True, (tuple(range(1, 9)),))


def test_finished_rows_stay_dead_until_dropping_them_pays_and_the_rest_keep_their_order():
    s = scheduler()
    a, b, c = request(new_tokens=9), request(new_tokens=1), request(new_tokens=9)
    for r in (a, b, c):
        s.add(r)
    _, finished = step(s)
    assert finished == [b]
    for _ in range(2):  # 1, then 2 row-steps spent on the dead row: fewer than the batch's 3 rows
        output, _ = step(s)
        assert output.model.keep is None and output.model.decode_tokens == (7, DEAD_ROW_TOKEN, 7)
        assert output.sampled == [a, c] and output.logit_rows == [0, 2]
    output, _ = step(s)  # 3 row-steps: as much as copying the cache without it costs
    assert output.model.keep == (0, 2) and output.decoding == [a, c] and output.model.decode_tokens == (7, 7)
    assert output.sampled == [a, c] and output.logit_rows == [0, 1]
    output, _ = step(s)
    assert output.model.keep is None  # nobody left: the batch is untouched


def test_with_free_row_drops_a_finished_row_leaves_at_the_next_step():
    s = ContinuousBatchScheduler(SchedulerConfig(), frozenset({EOS}), free_row_drops=True)
    a, b, c = request(new_tokens=9), request(new_tokens=1), request(new_tokens=9)
    for r in (a, b, c):
        s.add(r)
    _, finished = step(s)
    assert finished == [b]
    output, _ = step(s)  # llama.cpp's seq_rm copies nothing: no dead row is ever fed
    assert output.model.keep == (0, 2) and output.model.decode_tokens == (7, 7) and output.logit_rows == [0, 1]


def test_a_prefix_tree_bounded_in_nodes_evicts_to_stay_within_them():
    s = ContinuousBatchScheduler(SchedulerConfig(prefix_cache_bytes=10_000), frozenset({EOS}), max_prefix_nodes=3)
    for first in range(6):  # six prompts that share nothing: six leaves wanted, three allowed
        s.add(Request([100 + first, 1, 2], SamplingConfig(max_new_tokens=1)))
        while s.has_work:
            step(s)
    assert s.prefix.nodes == 3 and s.prefix.stats.evictions >= 3


def test_dead_rows_leave_when_a_group_joins_so_the_batch_stays_within_its_size():
    s = scheduler(max_batch_size=2)
    a, b, c = request(new_tokens=9), request(new_tokens=1), request(new_tokens=9)
    s.add(a)
    s.add(b)
    step(s)  # a and b prefill together; b is done at once
    s.add(c)
    output, _ = step(s)  # b is dead, a decodes and c's one-chunk prefill joins
    assert output.model.keep == (0,) and output.model.decode_tokens == (7,) and output.prefilling == [c]
    assert output.sampled == [a, c] and output.logit_rows == [0, 1]
    assert s.batch == [a, c]


def test_eos_and_stop_token_ids_finish_a_request_without_adding_the_token():
    s = scheduler()
    plain, stopper, ignoring = request(new_tokens=5), request(new_tokens=5, stop_token_ids=frozenset({9})), None
    ignoring = request(new_tokens=5, ignore_eos=True)
    for r in (plain, stopper, ignoring):
        s.add(r)
    output = s.schedule()
    finished = s.update_from_output(output, [EOS, 9, EOS])
    assert finished == [plain, stopper]
    assert plain.status is RequestStatus.FINISHED_EOS and plain.output_ids == []
    assert stopper.status is RequestStatus.FINISHED_EOS
    assert ignoring.output_ids == [EOS] and ignoring.status is RequestStatus.RUNNING


def test_a_cancelled_row_stops_decoding_in_the_step_that_notices_it():
    s = scheduler()
    keep, drop = request(new_tokens=9), request(new_tokens=9)
    s.add(keep)
    s.add(drop)
    step(s)
    drop.cancel()
    output = s.schedule()
    assert output.expired == [drop] and output.model.decode_tokens == (7, DEAD_ROW_TOKEN)
    assert output.sampled == [keep] and output.logit_rows == [0]


def test_cancelled_and_late_waiting_requests_expire_without_a_slot():
    s = scheduler(max_batch_size=1)
    running, cancelled, late = request(new_tokens=9), request(), request()
    late.deadline = 0.0
    for r in (running, cancelled, late):
        s.add(r)
    cancelled.cancel()
    output = s.schedule()
    assert output.prefilling == [running] and output.expired == [cancelled, late] and not s.waiting


def test_a_row_cancelled_while_its_group_prefills_joins_finished_and_then_leaves():
    s = scheduler(max_prefill_tokens=6)
    a, b = request(prompt_length=1), request(prompt_length=5)
    s.add(a)
    s.add(b)
    step(s)  # 2 rows share 6 tokens a step: 3 of the 5 padded columns, then 2
    b.cancel()
    output = s.schedule()
    assert output.expired == [b] and output.model.prefill.last
    b.status = RequestStatus.FINISHED_CANCELLED  # what the engine does with an expired request
    assert output.sampled == [a]  # its token is not sampled
    s.update_from_output(output, [7])
    assert b.output_ids == []
    following = s.schedule()
    assert following.model.decode_tokens == (7, DEAD_ROW_TOKEN) and following.sampled == [a]


def test_limits_refuse_with_the_flag_to_change():
    s = scheduler(max_concurrent_requests=2, max_batch_total_tokens=10)
    s.add(request())
    s.add(request())
    with pytest.raises(ResourceExhausted, match=r"--max-concurrent-requests\) is 2"):
        s.add(request())
    with pytest.raises(ResourceExhausted, match="--max-batch-total-tokens 10"):
        scheduler(max_batch_total_tokens=10).add(request(prompt_length=8, new_tokens=5))


def test_cancelled_requests_do_not_count_against_the_concurrency_limit():
    s = scheduler(max_concurrent_requests=2)
    first, second = request(), request()
    s.add(first)
    s.add(second)
    with pytest.raises(ResourceExhausted):
        s.add(request())
    first.cancel()  # its client went away; it leaves at the next step
    s.add(third := request())
    assert third.status is RequestStatus.WAITING


def test_the_model_step_is_plain_data_that_survives_a_round_trip():
    s = scheduler(max_prefill_tokens=3)
    s.add(request(prompt_length=5))
    output = s.schedule()
    assert pickle.loads(pickle.dumps(output.model)) == output.model
    assert isinstance(output.model.prefill.prompts[0][0], int)


def test_the_prefix_cache_travels_in_the_step_and_a_later_prompt_prefills_only_what_is_new():
    from services.generation.engine.prefix_cache import Reuse, StoreKV

    s = scheduler(prefix_cache_bytes=1000)  # bytes per token 1 here: 1000 tokens
    first = request(prompt_length=5, new_tokens=3)
    s.add(first)
    step(s, token=11)  # the group joins
    joined, _ = step(s, token=12)
    assert [op for op in joined.model.cache_ops if isinstance(op, StoreKV)] == [StoreKV(1, 0, 0, 5)]  # its prompt
    step(s, token=13)  # finished by length: 13 was sampled, never fed
    leaving = s.schedule()
    (answer,) = leaving.model.cache_ops
    assert answer == StoreKV(answer.node, 0, 5, 7)  # prompt + 11, 12: what the KV holds
    assert pickle.loads(pickle.dumps(leaving.model)) == leaving.model  # ranks receive it as it is
    s.update_from_output(leaving, [])

    later = Request([1, 2, 3, 4, 5, 11, 12, 40, 41], SamplingConfig(max_new_tokens=2))
    s.add(later)
    output = s.schedule()
    chunk = output.model.prefill
    assert later.cached_tokens == 7
    assert (chunk.start, chunk.end, chunk.last) == (7, 9, True)
    assert chunk.reuse == (Reuse(7, ((1, 5), (answer.node, 2))),)


def test_a_full_prefix_cache_evicts_through_the_step():
    from services.generation.engine.prefix_cache import EvictKV

    s = scheduler(prefix_cache_bytes=8)
    evicted = []
    for prompt_start in (1, 100):
        r = Request(list(range(prompt_start, prompt_start + 6)), SamplingConfig(max_new_tokens=1))
        s.add(r)
        while s.has_work:
            output, _ = step(s)
            evicted += [op for op in output.model.cache_ops if isinstance(op, EvictKV)]
    assert evicted and s.prefix.held <= 8


def test_n_answers_to_one_prompt_prefill_it_once_and_the_rest_take_it_from_the_cache():
    s = scheduler(prefix_cache_bytes=1000)
    first, *others = answers = [request(prompt_length=LONG) for _ in range(4)]
    for r in answers:
        s.add(r)
    output, _ = step(s)
    assert output.prefilling == [first]
    assert output.model.prefill == PrefillChunk(0, LONG, True, (tuple(range(1, LONG + 1)),))
    assert [r.status for r in others] == [RequestStatus.WAITING] * 3  # nobody overtakes the one that waits
    output, _ = step(s)  # the first joined: its prompt is stored, then the rest start from it
    assert output.prefilling == others
    assert [r.cached_tokens for r in answers] == [0, LONG - 1, LONG - 1, LONG - 1]
    chunk = output.model.prefill
    assert (chunk.start, chunk.end, chunk.last) == (LONG - 1, LONG, True)  # one token each: the last, for its logits


def test_questions_after_a_new_system_prompt_wait_for_the_first_to_prefill_it():
    s = scheduler(prefix_cache_bytes=1000)
    system = list(range(1, LONG + 1))
    questions = [Request([*system, 100 + i, 7, 8], SamplingConfig(max_new_tokens=3)) for i in range(4)]
    for r in questions:
        s.add(r)
    output, _ = step(s)
    assert output.prefilling == questions[:1]
    output, _ = step(s)
    assert output.prefilling == questions[1:] and [r.cached_tokens for r in questions[1:]] == [LONG] * 3
    assert output.model.prefill.start == LONG  # three tokens each: their own question


def test_short_prompts_sharing_a_few_tokens_still_prefill_together():
    s = scheduler(prefix_cache_bytes=1000)
    header = list(range(1, SHARED_PREFIX_MIN_TOKENS))  # one token short of worth waiting for
    prompts = [[*header, 100 + i, 7, 8] for i in range(4)] + [[*header, 5]] * 2  # and two the same, as short
    requests = [Request(p, SamplingConfig(max_new_tokens=3)) for p in prompts]
    for r in requests:
        s.add(r)
    output, _ = step(s)
    assert output.prefilling == requests and all(r.cached_tokens == 0 for r in requests)


def test_without_a_prefix_cache_n_answers_to_one_prompt_prefill_together():
    s = scheduler()
    answers = [request(prompt_length=LONG) for _ in range(4)]
    for r in answers:
        s.add(r)
    output, _ = step(s)
    assert output.prefilling == answers and len(output.model.prefill.prompts) == 4


def test_nobody_waits_for_a_prompt_too_long_for_the_prefix_cache():
    s = scheduler(prefix_cache_bytes=LONG - 1)
    answers = [request(prompt_length=LONG) for _ in range(4)]
    for r in answers:
        s.add(r)
    output, _ = step(s)
    assert output.prefilling == answers


def test_a_request_waits_for_one_group_at_most_even_when_the_cache_lost_what_it_waited_for():
    s = scheduler(prefix_cache_bytes=LONG + 10)  # holds one of the two prompts joining together, not both
    first, other = request(prompt_length=LONG), Request(list(range(500, 530)), SamplingConfig(max_new_tokens=3))
    waiting, *rest = [request(prompt_length=LONG) for _ in range(3)]
    for r in (first, other, waiting, *rest):
        s.add(r)
    output, _ = step(s)
    assert output.prefilling == [first, other]
    output, _ = step(s)  # storing the other's prompt evicted the first's: the one that waited heads the next group
    assert output.prefilling == [waiting] and waiting.cached_tokens == 0
    output, _ = step(s)  # and the rest, the same prompt, wait for it in turn and prefill one token each
    assert output.prefilling == rest and [r.cached_tokens for r in rest] == [LONG - 1] * 2
