"""Speculative decoding drafted from the prompt: the lookup, each row's draft length, the scheduler's plan of a
drafted step, the sampling rule, and the output of both runners the same with speculation on and off (greedy
alone, in a batch of 16 and with prefix-cache hits; seeded sampling), with drafts actually scored and kept."""

from __future__ import annotations

import dataclasses
import random
import re

import pytest
import torch
from scipy.stats import chisquare
from test_engine import random_prompts, tokens_of
from test_llamacpp import gguf_loaded, tiny_gguf  # noqa: F401  (fixtures)

from services.generation.engine.constraints import ConstraintCompiler, ConstraintSpec
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.request import Finished, Request, RequestStatus, TokenChunk
from services.generation.engine.runner import execute_step
from services.generation.engine.sampling import RowSampling, SamplingConfig
from services.generation.engine.scheduler import (
    ContinuousBatchScheduler,
    DecodeRow,
    ModelStep,
    PrefillChunk,
    SchedulerConfig,
)
from services.generation.engine.speculation import (
    COST_MIN_STEPS,
    FIRST_DRAFT,
    MISSES_BEFORE_PAUSE,
    PAUSE_TOKENS,
    DraftState,
    PromptLookup,
    StepCost,
    sample_drafted,
    worth_drafting,
)
from services.generation.loading import make_runner, start_engine

SPECULATIVE = {"speculative_tokens": 6, "speculative_max_batch": 16}


def test_the_lookup_proposes_what_followed_the_tail_last_time():
    lookup = PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 4, 6, 7, 8, 2, 3])
    assert lookup.propose(3) == (4, 6, 7)  # "2 3" last occurred before "4 6 7"
    lookup.extend([4])
    assert lookup.propose(2) == (6, 7)  # "2 3 4", the longest tail that occurred, wins over "3 4"
    assert lookup.propose(0) == ()
    assert PromptLookup([1, 2, 3, 4]).propose(4) == ()  # nothing repeats
    assert PromptLookup([5, 6, 7, 5, 6]).propose(8) == (7, 5, 6)  # a guess may run up to the tail


def test_a_row_drafts_longer_after_success_and_pauses_after_misses():
    state = DraftState(PromptLookup([1, 2, 3, 1, 2]))
    assert state.propose(0, max_draft=8, room=10) == (3, 1, 2)
    state.record(drafted=4, accepted=4, output_length=5, max_draft=8)
    assert state.length == min(8, FIRST_DRAFT * 2)
    state.record(drafted=8, accepted=2, output_length=8, max_draft=8)
    assert state.length == 3
    assert state.propose(0, max_draft=8, room=1) == (3,)  # never past the tokens the row may still add
    for step in range(MISSES_BEFORE_PAUSE):
        state.record(drafted=3, accepted=0, output_length=10 + step, max_draft=8)
    paused_at = 10 + MISSES_BEFORE_PAUSE - 1
    assert state.propose(paused_at + 1, max_draft=8, room=10) == ()
    assert state.propose(paused_at + PAUSE_TOKENS, max_draft=8, room=10) != ()
    assert (state.drafted, state.accepted) == (4 + 8 + 3 * MISSES_BEFORE_PAUSE, 6)


def test_the_step_cost_is_fitted_from_timed_steps_and_says_what_one_more_position_adds():
    cost = StepCost()
    for _ in range(COST_MIN_STEPS):
        cost.observe(1, 0.0128)  # one position only: nothing tells the fixed part from the per-position one
    assert cost.line() is None and cost.position_share(1) == 0.0  # unknown: every guess is worth scoring
    rng = random.Random(0)
    for _ in range(200):  # llama.cpp on the 2-core test machine: 6.2 ms a step and 6.6 ms a position
        positions = rng.choice([1, 2, 3, 5, 9])
        cost.observe(positions, 0.0062 + 0.0066 * positions + rng.uniform(-5e-4, 5e-4))
    fixed, per_position = cost.line()
    assert fixed == pytest.approx(0.0062, abs=5e-4) and per_position == pytest.approx(0.0066, abs=2e-4)
    assert cost.position_share(1) == pytest.approx(0.0066 / 0.0128, abs=0.03)
    assert cost.position_share(16) > 0.9  # many rows: a guess must be nearly sure to be worth its position


def test_a_draft_is_as_long_as_its_guesses_are_likely_enough_to_stand():
    assert worth_drafting(0.65, 0.9, share=0.0) >= 8  # costs unknown, or free: draft all the row may
    assert worth_drafting(0.65, 0.9, share=0.15) == 14  # the transformers runner: guesses are nearly free
    assert worth_drafting(0.65, 0.9, share=0.5) == 3  # llama.cpp here: 0.65, 0.585, 0.527 stand above half
    assert worth_drafting(0.45, 0.99, share=0.5) == 0  # a first guess that stands less than half the time
    assert worth_drafting(0.6, 0.5, share=0.5) == 1


def test_a_row_whose_guesses_rarely_stand_stops_drafting_and_resumes_when_they_do():
    state = DraftState(PromptLookup([1, 2, 3, 1, 2]))
    for step in range(8):  # first guesses refused, two drafts in three: below the half a position costs
        state.record(drafted=2, accepted=2 if step % 3 == 0 else 0, output_length=step, max_draft=8)
        state.misses = 0  # (the pause after misses is its own rule, tested above)
    assert state.acceptance[0] < 0.5
    assert state.propose(8, max_draft=8, room=10, share=0.5) == ()
    assert state.shadow == 3  # what it would have guessed, checked against the token it gets
    assert state.propose(8, max_draft=8, room=10, share=0.1) == (3,)  # where positions are cheap, it drafts
    for _ in range(12):  # its unscored guesses stand
        state.propose(8, max_draft=8, room=10, share=0.5)
        state.check_shadow(3)
    assert state.acceptance[0] > 0.5
    assert state.propose(8, max_draft=8, room=10, share=0.5) == (3,)
    state.check_shadow(99)  # a drafting row has no unscored guess to check
    assert state.acceptance[0] > 0.5


def test_the_scheduler_plans_drafted_rows_and_takes_back_what_was_refused():
    s = ContinuousBatchScheduler(SchedulerConfig(max_batch_size=4, **SPECULATIVE), eos_token_ids=frozenset({0}))
    copying = Request([7, 8, 9, 10, 11, 7, 8], SamplingConfig(max_new_tokens=20))
    plain = Request([20, 21, 22], SamplingConfig(max_new_tokens=20))
    for request in (copying, plain):
        s.add(request)
    first = s.schedule()
    s.update_from_output(first, [9, 23])  # the copying row's answer starts "9": "8 9" occurred before
    step = s.schedule()
    copy_row, plain_row = step.model.decode
    assert copy_row.token == 9 and copy_row.draft == (10, 11, 7, 8) and copy_row.rejected == 0
    assert plain_row.draft == ()
    # the logits: the drafted row's five positions, then the plain row's one
    assert step.logit_rows == [0, 5] and step.drafts == [(10, 11, 7, 8), ()] and step.positions == [0, 1, 2, 3, 4, 5]
    # two draft tokens kept, then a token of its own: three tokens, and the other two positions leave the KV
    s.update_from_output(step, [[10, 11, 30], [24]])
    assert copying.output_ids == [9, 10, 11, 30] and plain.output_ids == [23, 24]
    assert (copying.drafted_tokens, copying.accepted_draft_tokens) == (4, 2)
    following = s.schedule()
    assert following.model.decode[0].token == 30 and following.model.decode[0].rejected == 2


def test_no_drafts_above_the_batch_limit():
    s = ContinuousBatchScheduler(SchedulerConfig(speculative_tokens=4, speculative_max_batch=1))
    for _ in range(2):
        s.add(Request([7, 8, 7], SamplingConfig(max_new_tokens=10)))
    s.update_from_output(s.schedule(), [8, 8])
    assert all(row.draft == () for row in s.schedule().model.decode)


def test_a_drafted_position_is_sampled_from_the_models_distribution():
    """The acceptance rule keeps the distribution: the first token follows p0, and after an accepted draft the
    second follows p1 (chi-square over 6,000 draws with a fixed seed)."""
    p0 = torch.tensor([0.1, 0.2, 0.4, 0.2, 0.1])
    p1 = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.3])
    logits = torch.stack([p0.log(), p1.log()])
    row = RowSampling(SamplingConfig(max_new_tokens=8, temperature=1.0), [], [], torch.Generator().manual_seed(7))
    first, second = torch.zeros(5), torch.zeros(5)
    for _ in range(6000):
        (tokens,), _ = sample_drafted(logits, [row], [(2,)])
        first[tokens[0]] += 1
        if len(tokens) == 2:
            assert tokens[0] == 2  # a second token only after the draft was kept
            second[tokens[1]] += 1
    assert chisquare(first, p0 * first.sum()).pvalue > 1e-3
    assert chisquare(second, p1 * second.sum()).pvalue > 1e-3


def test_a_seeded_row_draws_the_same_numbers_with_and_without_a_draft():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    config = SamplingConfig(max_new_tokens=8, temperature=1.0, seed=3)
    one_at_a_time = RowSampling(config, [], [], torch.Generator().manual_seed(3))
    drafted = RowSampling(config, [], [], torch.Generator().manual_seed(3))
    plain = [sample_drafted(logits[i : i + 1], [one_at_a_time], [()])[0][0][0] for i in range(3)]
    (kept,), _ = sample_drafted(logits, [drafted], [(plain[0], 49 if plain[1] != 49 else 48)])
    assert kept == plain[:2]  # the first guess stood, the second did not: its position's own sample follows
    # after the step, the stream stands where two plain steps leave it, so the next step draws the third number
    two_steps = torch.Generator().manual_seed(3)
    for _ in range(2):
        torch.rand(1, generator=two_steps)
    assert torch.equal(drafted.generator.get_state(), two_steps.get_state())


@pytest.fixture(params=["gpt_neox", "llama", "llamacpp", "llamacpp-fa-off"])
def loaded(request, tiny_loaded, tiny_llama):
    if request.param.startswith("llamacpp"):
        # without flash attention llama.cpp scores a draft's positions through another kernel and stores values
        # transposed (which the prefix cache's saved parts must cut and join alike)
        flash_attn = "off" if request.param.endswith("fa-off") else "auto"
        return dataclasses.replace(request.getfixturevalue("gguf_loaded"), flash_attn=flash_attn)
    return tiny_loaded if request.param == "gpt_neox" else tiny_llama


def copying_prompts(count: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """Prompts that repeat a phrase, so the answers have something to copy, with random ones among them."""
    rng = random.Random(seed)
    prompts = []
    for prompt, n in random_prompts(count, seed):
        phrase = [rng.randrange(1, 400) for _ in range(rng.randrange(4, 9))]
        prompts.append(([*prompt, *phrase, *prompt[:3], *phrase[:3]], n + 20))
    return prompts


def run_all(engine: ContinuousBatchingEngine, cases, together: bool, **config) -> list[tuple[list[int], Finished]]:
    def submit(prompt, n):
        return engine.submit(Request(list(prompt), SamplingConfig(max_new_tokens=n, ignore_eos=True, **config)))

    def result(request: Request) -> tuple[list[int], Finished]:
        events = list(request.events(timeout=120))
        return [i for e in events if isinstance(e, TokenChunk) for i in e.token_ids], events[-1]

    if together:
        return [result(r) for r in [submit(p, n) for p, n in cases]]
    return [result(submit(p, n)) for p, n in cases]


def engines(loaded, **config) -> tuple[ContinuousBatchingEngine, ContinuousBatchingEngine]:
    base = {"max_batch_total_tokens": 8192, "max_batch_size": 16, **config}
    return start_engine(loaded, SchedulerConfig(**base)), start_engine(loaded, SchedulerConfig(**base, **SPECULATIVE))


def drafts_of(engine: ContinuousBatchingEngine) -> tuple[float, float]:
    """The engine's metrics: draft tokens scored, and those kept."""
    value = engine.metrics.registry.get_sample_value
    return value("nightcap_generation_draft_tokens_total"), value("nightcap_generation_accepted_draft_tokens_total")


@pytest.mark.parametrize("together", [False, True], ids=["alone", "batch16"])
def test_greedy_output_is_the_same_with_speculation_on_and_off(loaded, together):
    off, on = engines(loaded)
    cases = copying_prompts(16)
    try:
        plain = run_all(off, cases, together)
        drafted = run_all(on, cases, together)
        scored, kept = drafts_of(on)
    finally:
        off.shutdown(grace=1)
        on.shutdown(grace=1)
    assert [tokens for tokens, _ in drafted] == [tokens for tokens, _ in plain]
    assert [len(tokens) for tokens, _ in drafted] == [n for _, n in cases]
    # the drafts were really scored and some kept, and each answer says how many of its tokens came from them
    assert kept > 0 and scored > kept
    assert sum(f.accepted_draft_tokens for _, f in drafted) == kept
    assert sum(f.drafted_tokens for _, f in drafted) == scored
    assert all(f.drafted_tokens == 0 for _, f in plain)
    assert on.scheduler.step_cost.line() is not None  # the engine timed its drafted and plain decode steps


def test_greedy_output_is_the_same_with_prefix_cache_hits(loaded):
    off, on = engines(loaded, prefix_cache_bytes=64 << 20)
    rng = random.Random(11)
    system = [rng.randrange(1, 400) for _ in range(24)]
    said = [[rng.randrange(1, 400) for _ in range(5)] + system[:4] for _ in range(4)]
    try:
        answers = {}
        for engine in (off, on):
            conversation, turns = list(system), []
            for words in said:
                conversation += words
                request = engine.submit(Request(list(conversation), SamplingConfig(max_new_tokens=16, ignore_eos=True)))
                answer = tokens_of(request)
                turns.append((answer, request.cached_tokens))
                conversation += answer
            answers[engine is on] = turns
        kept = drafts_of(on)[1]
    finally:
        off.shutdown(grace=1)
        on.shutdown(grace=1)
    assert [a for a, _ in answers[True]] == [a for a, _ in answers[False]]
    assert all(cached > 0 for _, cached in answers[True][1:])  # later turns did hit the cache
    assert kept > 0


def test_seeded_sampling_is_the_same_with_speculation_on_and_off(loaded):
    off, on = engines(loaded)
    cases = copying_prompts(6, seed=4)
    # a tiny random model's logits are nearly flat: this cool a temperature still samples, and repeats itself
    sampled = {"temperature": 0.01, "top_k": 3, "repetition_penalty": 1.02, "seed": 99, "logprobs": True}
    try:
        plain = run_all(off, cases, True, **sampled)
        drafted = run_all(on, cases, True, **sampled)
    finally:
        off.shutdown(grace=1)
        on.shutdown(grace=1)
    assert [tokens for tokens, _ in drafted] == [tokens for tokens, _ in plain]
    assert sum(f.accepted_draft_tokens for _, f in drafted) > 0


# a grammar with choices that never ends (so ignore_eos and max_new_tokens decide): answers repeat themselves,
# drafts are proposed, and the grammar refuses some of them
PETS = r"((cat|dog|bird|fish) )+"


def test_each_drafted_position_gets_the_tokens_its_grammar_allows_there(tiny_loaded):
    grammar = ConstraintCompiler().compile(ConstraintSpec("regex", PETS), tiny_loaded)
    encode = tiny_loaded.tokenizer.encode
    output, draft = encode("cat dog "), encode("bird cat")
    refused = encode("7")  # no digit anywhere in the grammar

    def alone(tokens):  # a fresh matcher's mask after ``tokens``
        return grammar.new_mask()(list(tokens))

    mask = grammar.new_mask()
    before = mask(output).clone()
    masks = mask.along(output, [*draft, *refused, *draft])
    assert len(masks) == 2 * len(draft) + 2
    for i in range(len(draft) + 1):
        assert torch.equal(masks[i], alone([*output, *draft[:i]])), i
    assert not masks[len(draft)][refused[0]]  # refused where it stands: the positions after it repeat its mask
    assert all(torch.equal(m, masks[len(draft)]) for m in masks[len(draft) + 1 :])
    assert torch.equal(mask(output), before)  # the matcher stepped back to where it stood
    assert torch.equal(mask([*output, *draft[:1]]), alone([*output, *draft[:1]]))  # and goes on from there


def test_constrained_greedy_output_is_the_same_with_speculation_on_and_off(loaded):
    grammar = ConstraintCompiler().compile(ConstraintSpec("regex", PETS), loaded)
    off, on = engines(loaded)
    base = [(prompt, 40) for prompt, _ in copying_prompts(8, seed=2)]
    try:
        # each prompt gets the start of its own answer followed by digits, which the grammar refuses: the drafts
        # copied from there are turned down by the mask, the ones copied from the answer itself are kept
        starts = run_all(off, base, True, constraint=grammar)
        digits = loaded.tokenizer.encode(" 7 8 9 7 8 9")
        cases = [([*prompt, *start[:6], *digits], n) for (prompt, n), (start, _) in zip(base, starts, strict=True)]
        plain = run_all(off, cases, True, constraint=grammar)
        drafted = run_all(on, cases, True, constraint=grammar)
        scored, kept = drafts_of(on)
    finally:
        off.shutdown(grace=1)
        on.shutdown(grace=1)
    assert [tokens for tokens, _ in drafted] == [tokens for tokens, _ in plain]
    # cut by max_new_tokens, maybe mid-word; where the grammar may end, ignore_eos lets end-of-text repeat
    texts = [loaded.tokenizer.decode(tokens, skip_special_tokens=True) for tokens, _ in plain]
    assert all(re.fullmatch(r"((cat|dog|bird|fish) )+[a-z]*", t) for t in texts), texts
    assert kept > 0 and scored > kept


def test_a_stop_sequence_inside_accepted_drafts_ends_the_answer_there(loaded):
    off, on = engines(loaded)
    tokenizer = loaded.tokenizer
    prompt, n = copying_prompts(1, seed=8)[0]
    try:
        free = run_all(off, [(prompt, n)], False)[0][0]
        text = tokenizer.decode(free)
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        assert stop.strip(), f"no text to stop on in {text!r}"
        ((stopped, finished),) = run_all(on, [(prompt, n)], False, stop=(stop,))
    finally:
        off.shutdown(grace=1)
        on.shutdown(grace=1)
    assert finished.status is RequestStatus.FINISHED_STOP_SEQUENCE
    assert len(stopped) < len(free) and free[: len(stopped)] == stopped
    assert finished.generated_tokens == len(stopped)  # the tokens after the stop sequence are not counted


def test_refused_guesses_leave_the_transformers_cache_no_wider(tiny_loaded):
    runner = make_runner(tiny_loaded)
    execute_step(runner, ModelStep(0, prefill=PrefillChunk(0, 4, True, ((5, 6, 7, 8),))))
    execute_step(runner, ModelStep(1, decode=(DecodeRow(20, (21, 22, 23)),)))
    assert runner.batch.mask.shape[1] == 8
    # one guess kept, two refused: the next step's token goes where the refused ones were
    execute_step(runner, ModelStep(2, decode=(DecodeRow(40, rejected=2),)))
    assert runner.batch.mask.shape[1] == 7 and bool(runner.batch.mask.all())
