"""Speculative decoding that drafts from the row's own tokens (prompt lookup), and how much each row drafts.

One stream on a CPU is bound by reading the weights, so scoring a row's token and k guessed tokens after it in
one forward costs about what one token does; every guess the model agrees with is a token won. The guesses come
from the row itself: when its last few tokens (an n-gram) occurred earlier in the prompt or the answer, the
tokens that followed them there are proposed. A grounded answer copies names, dates and phrases from the passages
in its prompt, and a follow-up repeats the earlier answer, so those copies come several tokens a step.

The engine verifies the drafts (``accept``): position i is sampled exactly as a plain step would sample it, with
the row's own random stream, and the draft token is kept while it equals that sample. For a draft proposed with
certainty (a point mass q), this is the standard speculative-sampling rule: the draft is accepted with
probability min(1, p/q) = p(draft), and on a rejection the token comes from p without the draft, renormalised.
Drawing one uniform number per kept token, as a plain step does, makes a seeded row's output the same with
speculation on or off (scoring k+1 positions in one forward can round differently from one at a time, so a
near-tie may still flip).

Each row decides for itself how far to guess (``DraftState``): longer after full acceptance, shorter after a
miss, and not at all for a while when its drafts keep failing. The scheduler drafts only while the batch is small
enough that verification costs less than it saves (``SpeculationConfig.max_batch``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.generation.engine.sampling import RowSampling, TokenLogprob, greedy_tokens, sample_batch

# n-gram lengths looked up, longest first: a 3-token match is a surer guess than a 2-token one; a single token
# matches too often to guess from (measured on make eval's grounded prompts: far more drafts, fewer accepted).
NGRAM_SIZES = (3, 2)
FIRST_DRAFT = 4  # draft length of a row's first guess
MISSES_BEFORE_PAUSE = 3  # drafts in a row with nothing accepted before a row pauses drafting
PAUSE_TOKENS = 16  # tokens a pausing row decodes without drafting, doubled for every pause after the first
MAX_PAUSE_TOKENS = 256
# `serve`'s defaults (--speculative-tokens, --speculative-max-batch); `make bench`'s grounded rows measure them
SPECULATIVE_TOKENS = 8
SPECULATIVE_MAX_BATCH = 4


@dataclass(frozen=True)
class SpeculationConfig:
    """``max_draft``: the most tokens a row guesses a step (0: speculation off). ``max_batch``: rows decoding
    together above which nobody drafts (verifying k+1 positions of many rows is compute, not memory, bound)."""

    max_draft: int = 0
    max_batch: int = 4

    @property
    def enabled(self) -> bool:
        return self.max_draft > 0


class PromptLookup:
    """Proposes the tokens that followed the latest earlier occurrence of the row's last n tokens. The n-grams of
    the prompt and answer are indexed as they arrive (a dict per n-gram length), so a lookup costs O(1)."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens: list[int] = []
        self._latest: dict[tuple[int, ...], int] = {}  # n-gram -> index just past its latest earlier occurrence
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            # the n-grams ending at the current last token get a continuation: the token arriving now
            end = len(self.tokens)
            for n in NGRAM_SIZES:
                if end >= n:
                    self._latest[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def propose(self, k: int) -> tuple[int, ...]:
        """Up to ``k`` tokens guessed to follow; empty when no n-gram of the tail occurred before."""
        if k <= 0:
            return ()
        tokens = self.tokens
        for n in NGRAM_SIZES:
            if len(tokens) <= n:
                continue
            start = self._latest.get(tuple(tokens[-n:]))
            if start is not None:
                return tuple(tokens[start : start + k])
        return ()


@dataclass
class DraftState:
    """One row's speculation: its lookup, how long its next draft may be, and what its drafts achieved."""

    lookup: PromptLookup
    length: int = FIRST_DRAFT
    misses: int = 0  # drafts in a row with nothing accepted
    pauses: int = 0
    resume_at: int = 0  # the output length at which a pausing row drafts again
    drafted: int = 0
    accepted: int = 0
    pending: tuple[int, ...] = field(default=())  # the draft fed this step
    rejected: int = 0  # positions of the last draft the sampler turned down: they leave the KV next step

    def propose(self, output_length: int, max_draft: int, room: int) -> tuple[int, ...]:
        """This step's draft: at most ``max_draft`` and ``room`` (the tokens the row may still add after the one
        it is fed) tokens; none while the row pauses."""
        if output_length < self.resume_at:
            return ()
        return self.lookup.propose(min(self.length, max_draft, room))

    def record(self, drafted: int, accepted: int, output_length: int, max_draft: int) -> None:
        """Adapts the next draft's length to this one's fate: double it after full acceptance, the accepted
        length plus one after a partial one; a row whose drafts keep missing pauses, longer each time."""
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.length = min(max_draft, self.length * 2)
        else:
            self.length = max(1, accepted + 1)
        self.misses = 0 if accepted else self.misses + 1
        if self.misses >= MISSES_BEFORE_PAUSE:
            self.resume_at = output_length + min(MAX_PAUSE_TOKENS, PAUSE_TOKENS << self.pauses)
            self.pauses += 1
            self.misses = 0
            self.length = FIRST_DRAFT


def accept(draft: Sequence[int], sampled: Sequence[int]) -> int:
    """How many draft tokens stand: the length of the longest prefix of ``draft`` that equals what was sampled at
    its positions (``sampled`` holds one token per scored position, len(draft) + 1)."""
    kept = 0
    for guess, token in zip(draft, sampled, strict=False):
        if guess != token:
            break
        kept += 1
    return kept


def sample_drafted(
    logits: torch.Tensor, rows: list[RowSampling], drafts: list[tuple[int, ...]]
) -> tuple[list[list[int]], list[list[TokenLogprob | None]]]:
    """Samples every row at each of its 1 + len(draft) positions (``logits`` holds them row after row) and keeps,
    per row, the draft tokens that equal their position's sample and the sample after them, with their logprobs.

    A drafted row is sampled at position i as if ``draft[:i]`` were already its output (for the penalties),
    drawing from its own random stream in position order; afterwards its stream stands where one draw per kept
    token leaves it, as a step per token would have left it."""
    # where each sampled, drafted row's random stream stood before the step: it cannot be stepped back
    began = {i: row.generator.get_state() for i, row in enumerate(rows) if drafts[i] and not row.config.greedy}
    if all(row.plain_greedy for row in rows):
        flat, flat_logprobs = greedy_tokens(logits).tolist(), [None] * logits.shape[0]
    else:
        at = [state for row, draft in zip(rows, drafts, strict=True) for state in _positions(row, draft)]
        flat, flat_logprobs = sample_batch(logits, at)
    tokens, logprobs, start = [], [], 0
    for i, (row, draft) in enumerate(zip(rows, drafts, strict=True)):
        end = start + len(draft) + 1
        kept = accept(draft, flat[start:end]) + 1
        tokens.append(flat[start : start + kept])
        logprobs.append(flat_logprobs[start : start + kept])
        if i in began and kept < end - start:
            row.generator.set_state(began[i])
            for _ in range(kept):  # as sample_batch draws: one torch.rand(1) per sampled row
                torch.rand(1, generator=row.generator)
        start = end
    return tokens, logprobs


def _positions(row: RowSampling, draft: tuple[int, ...]) -> list[RowSampling]:
    """The row as sampled at each of its 1 + len(draft) positions. A constrained row's grammar gives each
    position its own allowed tokens, as if the draft before it had been taken (``GrammarMask.along``)."""
    if not draft:
        return [row]
    masks = row.logits_mask.along(row.output, draft) if row.logits_mask is not None else None
    return [
        RowSampling(
            row.config,
            [*row.seen, *draft[:i]],
            [*row.output, *draft[:i]],
            row.generator,
            None if masks is None else _fixed(masks[i]),
        )
        for i in range(len(draft) + 1)
    ]


def _fixed(allowed: torch.Tensor) -> Callable[[list[int]], torch.Tensor]:
    return lambda _output: allowed
