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

What a guessed position costs is measured, not assumed (``StepCost``): the engine times its decode steps and
fits seconds = fixed + per_position x positions. The transformers runner on a CPU pays mostly the fixed part (one
pass of Python and weight reads whatever the positions), so long drafts pay; llama.cpp on a 2-core AVX2 machine
with the default Q4_1 GGUF pays about half a step for every extra position (12.8 ms for one position, 21.5 for
two, 43.6 for five, 118 for seventeen), so there a guess pays only when it is likely to stand. A draft's j-th
token is worth scoring when the row's chance of keeping it, acceptance^j, exceeds the share of a step's time
that one more position adds (``StepCost.position_share``); a row drafts at most that many tokens, and none at all
below the first. Acceptance is measured in two parts, because copies come in runs: the chance that a draft's first
token stands, and the chance that a token after a kept one does (higher: a copied phrase goes on). A row that is
not drafting still checks its lookup's guess against the token it then gets, so its first-token acceptance stays
measured and drafting resumes when guesses start to stand.
"""

from __future__ import annotations

import math
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
# StepCost: the weight a step's timing keeps after each later one (an average over about the last 200 steps),
# and the timed steps, with two different position counts among them, before the fit is used
COST_DECAY = 0.995
COST_MIN_STEPS = 16
# DraftState's acceptance, (kept, tried) priors: a draft's first token 1 of 2 (0.5), a token after a kept one 3 of
# 4 (0.75); and the weight a guess keeps after each later one (about the last 30 guesses count)
FIRST_PRIOR = (1.0, 2.0)
NEXT_PRIOR = (3.0, 4.0)
ACCEPTANCE_DECAY = 0.97


class StepCost:
    """A decode step's time as a line in the positions it scores, fitted by decayed least squares over the
    engine's own steps (prefill steps are not observed: they cost what their chunk costs)."""

    def __init__(self) -> None:
        self._n = self._x = self._y = self._xx = self._xy = 0.0
        self._steps = 0
        self._positions: set[int] = set()

    def observe(self, positions: int, seconds: float) -> None:
        d = COST_DECAY
        self._n = self._n * d + 1
        self._x = self._x * d + positions
        self._y = self._y * d + seconds
        self._xx = self._xx * d + positions * positions
        self._xy = self._xy * d + positions * seconds
        self._steps += 1
        if len(self._positions) < 2:
            self._positions.add(positions)

    def line(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per position), or None until enough different steps were timed."""
        if self._steps < COST_MIN_STEPS or len(self._positions) < 2:
            return None
        spread = self._n * self._xx - self._x * self._x
        if spread <= 1e-9 * max(1.0, self._n * self._xx):
            return None
        slope = (self._n * self._xy - self._x * self._y) / spread
        fixed = (self._y - slope * self._x) / self._n
        return max(fixed, 0.0), max(slope, 0.0)

    def position_share(self, rows: int) -> float:
        """The share of a step's time that one more scored position adds, for a step of ``rows`` rows (each one
        position): the chance a guessed token must have of standing to be worth scoring. 0 (every guess is
        worth it) until the fit exists."""
        line = self.line()
        if line is None:
            return 0.0
        fixed, per_position = line
        step = fixed + per_position * max(rows, 1)
        return min(1.0, per_position * max(rows, 1) / step) if step > 0 else 0.0


def worth_drafting(first: float, following: float, share: float) -> int:
    """The longest draft whose every token is worth scoring: the largest j with first x following^(j-1) > share,
    the chance that the j-th guess stands (``first``: the first guess's; ``following``: a guess's after a kept
    one), against the share of a step's time it adds."""
    if share <= 0.0:
        return 1 << 30
    if first <= share:
        return 0
    if following >= 1.0:
        return 1 << 30
    if following <= 0.0:
        return 1
    return 1 + max(0, math.ceil(math.log(share / first) / math.log(following)) - 1)


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
    # decayed (kept, tried) counts of drafts' first tokens, and of the tokens after a kept one whose fate was
    # seen (a draft stops at its first miss)
    first: tuple[float, float] = FIRST_PRIOR
    following: tuple[float, float] = NEXT_PRIOR
    shadow: int | None = None  # the guess a row not drafting this step would have made, checked against its token

    @property
    def acceptance(self) -> tuple[float, float]:
        """The chances that a draft's first token stands, and that a token after a kept one does."""
        return self.first[0] / self.first[1], self.following[0] / self.following[1]

    def propose(self, output_length: int, max_draft: int, room: int, share: float = 0.0) -> tuple[int, ...]:
        """This step's draft: at most ``max_draft`` and ``room`` (the tokens the row may still add after the one
        it is fed) tokens, and no more than are worth scoring at ``share`` (``StepCost.position_share``); none
        while the row pauses."""
        self.shadow = None
        if output_length < self.resume_at:
            return ()
        worth = worth_drafting(*self.acceptance, share)
        if worth == 0:
            guess = self.lookup.propose(1) if room > 0 else ()
            self.shadow = guess[0] if guess else None
            return ()
        return self.lookup.propose(min(self.length, max_draft, room, worth))

    def check_shadow(self, token: int) -> None:
        """A row that did not draft learns whether its guess would have stood."""
        if self.shadow is not None:
            self.first = _learned(self.first, int(self.shadow == token), 1)
            self.shadow = None

    def record(self, drafted: int, accepted: int, output_length: int, max_draft: int) -> None:
        """Adapts the next draft's length to this one's fate: double it after full acceptance, the accepted
        length plus one after a partial one; a row whose drafts keep missing pauses, longer each time."""
        if not drafted:
            return
        self.drafted += drafted
        self.accepted += accepted
        self.first = _learned(self.first, int(accepted > 0), 1)
        if accepted:  # the tokens after the first: those kept, and the one refused, if one was
            self.following = _learned(self.following, accepted - 1, accepted - 1 + (accepted < drafted))
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


def _learned(counts: tuple[float, float], kept: int, tried: int) -> tuple[float, float]:
    """(kept, tried) after ``tried`` more guesses, ``kept`` of them standing; older ones weigh less."""
    fade = ACCEPTANCE_DECAY**tried
    return counts[0] * fade + kept, counts[1] * fade + tried


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
