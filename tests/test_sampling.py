"""Batched sampling: every row of a batch sampled at once, each with its own parameters and seed."""

from __future__ import annotations

import itertools

import pytest
import torch

from services.generation.engine.sampling import (
    RowSampling,
    SamplingConfig,
    apply_penalties,
    draw_kept,
    greedy_tokens,
    logits_to_probs,
    sample_batch,
)

VOCAB = 50

CONFIGS = [
    SamplingConfig(max_new_tokens=8),
    SamplingConfig(max_new_tokens=8, temperature=0.7, top_k=5, seed=1),
    SamplingConfig(max_new_tokens=8, temperature=1.3, top_p=0.6, seed=2),
    SamplingConfig(max_new_tokens=8, temperature=1.0, typical_p=0.5, seed=3, logprobs=True, top_logprobs=2),
    SamplingConfig(max_new_tokens=8, repetition_penalty=1.8, frequency_penalty=1.0, presence_penalty=0.5),
]


def rows(seed_offset: int = 0) -> list[RowSampling]:
    return [
        RowSampling(c, [1, 2, 3, 3], [3, 3], torch.Generator().manual_seed((c.seed or 0) + seed_offset))
        for c in CONFIGS
    ]


def test_each_row_samples_what_it_would_alone_whatever_its_batch_mates():
    torch.manual_seed(0)
    logits = torch.randn(len(CONFIGS), VOCAB) * 3
    together_rows, alone_rows = rows(), rows()
    for _ in range(20):
        together, together_logprobs = sample_batch(logits, together_rows)
        alone = [sample_batch(logits[r : r + 1], [alone_rows[r]]) for r in range(len(CONFIGS))]
        assert together == [tokens[0] for tokens, _ in alone]
        assert together_logprobs[3] == alone[3][1][0]


def test_filters_apply_per_row():
    torch.manual_seed(1)
    logits = torch.randn(len(CONFIGS), VOCAB) * 3
    top5 = set(logits[1].topk(5).indices.tolist())
    drawn = [sample_batch(logits, rows(seed))[0] for seed in range(60)]
    assert {tokens[1] for tokens in drawn} <= top5  # top_k=5
    assert len({tokens[1] for tokens in drawn}) > 1  # and it samples
    assert {tokens[0] for tokens in drawn} == {int(logits[0].argmax())}  # greedy stays greedy beside them


def test_penalties_push_seen_tokens_down():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 1.0  # the favourite, already generated twice
    config = SamplingConfig(max_new_tokens=8, repetition_penalty=1.8, frequency_penalty=1.0, presence_penalty=0.5)
    tokens, _ = sample_batch(logits, [RowSampling(config, [1, 2, 3, 3], [3, 3], torch.Generator())])
    assert tokens != [3]


def test_logprobs_are_the_models_own_and_list_the_top_alternatives():
    torch.manual_seed(2)
    logits = torch.randn(len(CONFIGS), VOCAB)
    tokens, logprobs = sample_batch(logits, rows())
    row = logprobs[3]
    assert [lp is None for lp in logprobs] == [True, True, True, False, True]
    assert row.token_id == tokens[3]
    assert row.logprob == float(logits[3].log_softmax(-1)[tokens[3]])
    assert [t for t, _ in row.top] == logits[3].topk(2).indices.tolist()


def test_a_row_mask_leaves_only_its_tokens_to_every_transform_after_it():
    allowed = {4, 17, 30}

    def mask(output: list[int]) -> torch.Tensor:
        assert output == [3, 3]  # the row's own output so far, as a grammar would walk it
        return torch.isin(torch.arange(VOCAB), torch.tensor(sorted(allowed)))

    torch.manual_seed(3)
    logits = torch.randn(len(CONFIGS), VOCAB) * 3
    logits[:, 9] = 50.0  # a forbidden favourite every unmasked row takes, whatever its parameters
    best_allowed = max(allowed, key=lambda token: float(logits[0, token]))
    top1 = SamplingConfig(max_new_tokens=8, temperature=1.0, top_k=1, seed=4)
    for seed in range(30):
        masked = [RowSampling(c, [1, 2, 3, 3], [3, 3], torch.Generator().manual_seed(seed), mask) for c in CONFIGS]
        tokens, logprobs = sample_batch(logits, masked)
        assert set(tokens) <= allowed, f"seed {seed}: {tokens}"
        assert logprobs[3].logprob > -1e9 and {t for t, _ in logprobs[3].top} <= allowed
        # top-k runs after the mask: its one token is the best allowed one, not the forbidden favourite
        (greedy, best), _ = sample_batch(
            logits[[0, 0]], [masked[0], RowSampling(top1, [], [3, 3], torch.Generator(), mask)]
        )
        assert greedy == best == best_allowed
    assert sample_batch(logits, rows())[0][0] == 9  # unmasked, the favourite wins
    assert not masked[0].plain_greedy  # so the engine's argmax shortcut never skips a mask


def reference_draw(row: torch.Tensor, temperature: float, top_k: int, top_p: float, uniform: float) -> int:
    """The whole vocabulary sorted (logits_to_probs), in float64, then the inverse CDF at ``uniform``."""
    probs = logits_to_probs(
        row[None].double(), torch.tensor([[temperature]], dtype=torch.float64), torch.tensor([[top_k]]), top_p
    )
    cdf = probs.cumsum(-1)
    return int(torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).clamp(max=row.numel() - 1))


@pytest.mark.parametrize("vocab", [50, 49152])
def test_a_row_drawn_from_the_tokens_it_keeps_gets_what_sorting_the_whole_vocabulary_gives(vocab):
    generator = torch.Generator().manual_seed(vocab)
    for temperature, top_k, top_p in itertools.product((0.6, 1.0), (0, 1, 40), (1.0, 0.9, 0.5)):
        for _ in range(12):
            row = torch.randn(vocab, generator=generator) * 3
            uniform = float(torch.rand(1, generator=generator))
            expected = reference_draw(row, temperature, top_k, top_p, uniform)
            assert draw_kept((row / temperature).numpy(), top_k, top_p, uniform) == expected


def test_top_p_on_a_flat_distribution_looks_past_its_first_tokens():
    # nearly every token equally likely: top-p 0.5 keeps about half of them, far past TOP_P_LOOKS
    row = torch.randn(49152, generator=torch.Generator().manual_seed(5)) * 1e-3
    uniforms = (0.0, 0.3, 0.6, 0.999)
    drawn = [draw_kept(row.numpy(), 0, 0.5, u) for u in uniforms]
    assert drawn == [reference_draw(row, 1.0, 0, 0.5, u) for u in uniforms]
    assert len(set(drawn)) == 4


def test_greedy_takes_the_first_of_equal_maxima_on_any_row_count():
    logits = torch.randn(9, 49152)
    logits[4, 7] = logits[4, 300] = 99.0
    assert greedy_tokens(logits).tolist() == logits.argmax(-1).tolist()
    assert greedy_tokens(logits)[4] == 7
    assert greedy_tokens(logits.bfloat16()).tolist() == logits.bfloat16().argmax(-1).tolist()  # numpy has no bf16


def test_penalties_scattered_by_token_equal_the_dense_formulas():
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(6, 300, generator=generator) * 4
    configs = [
        SamplingConfig(max_new_tokens=8, repetition_penalty=1.3),
        SamplingConfig(max_new_tokens=8, frequency_penalty=0.7, presence_penalty=0.4),
        SamplingConfig(max_new_tokens=8, repetition_penalty=0.8, frequency_penalty=-0.5, presence_penalty=1.5),
        SamplingConfig(max_new_tokens=8),
        SamplingConfig(max_new_tokens=8, repetition_penalty=1.1, presence_penalty=0.3),
        SamplingConfig(max_new_tokens=8, repetition_penalty=1.2),
    ]
    histories = [torch.randint(0, 300, (n,), generator=generator).tolist() for n in (40, 25, 60, 10, 33, 0)]
    rows = [RowSampling(c, h, h[len(h) // 2 :], torch.Generator()) for c, h in zip(configs, histories, strict=True)]
    # the dense formulas: a (rows, vocab) mask of seen tokens and counts of output tokens
    seen = torch.zeros_like(logits, dtype=torch.bool)
    counts = torch.zeros_like(logits)
    for r, row in enumerate(rows):
        seen[r, row.seen] = True
        counts[r].index_put_(
            (torch.tensor(row.output, dtype=torch.long),), torch.ones(len(row.output)), accumulate=True
        )
    penalty = torch.tensor([[c.repetition_penalty] for c in configs])
    expected = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    frequency = torch.tensor([[c.frequency_penalty] for c in configs])
    presence = torch.tensor([[c.presence_penalty] for c in configs])
    expected = expected - frequency * counts - presence * (counts > 0).float()
    assert torch.equal(apply_penalties(logits, rows), expected)
