"""Choosing the next tokens from the logits: one small function per step (gpt-fast style), each
working on the whole batch at once with per-row parameters.

Every transform is row-wise, so a request's choice never depends on its batch-mates. Each sampled row
draws one uniform number from its own ``torch.Generator`` and picks its token by inverse CDF: with a
seed, a request samples the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling parameters of one request (params.py checks them)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    typical_p: float = 1.0  # 1 -> off
    repetition_penalty: float = 1.0  # 1 -> off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]), added after penalties
    # a compiled constraint (constraints.CompiledConstraint): each row gets its own mask from it
    constraint: Any = field(default=None, compare=False)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that needs the row's history: the whole batch can take one argmax."""
        return (
            self.greedy
            and self.repetition_penalty == 1.0
            and self.frequency_penalty == 0.0
            and self.presence_penalty == 0.0
            and not self.logprobs
            and not self.logit_bias
            and self.constraint is None
        )


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


LogitsMask = Callable[[list[int]], torch.Tensor]  # a row's output so far -> (vocab,) bool: the tokens it may take


@dataclass
class RowSampling:
    """What sampling needs of one row: its parameters, its history, its random stream, and the tokens it may
    take next when something above the model restricts them (a grammar)."""

    config: SamplingConfig
    seen: list[int]  # prompt + output, for the repetition penalty
    output: list[int]  # output so far, for frequency and presence penalties
    generator: torch.Generator
    logits_mask: LogitsMask | None = None

    @property
    def plain_greedy(self) -> bool:
        """Nothing but the argmax of the model's logits chooses this row's token."""
        return self.config.plain_greedy and self.logits_mask is None


def apply_logits_masks(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Each masked row's forbidden tokens get -inf before any other transform sees the logits, so penalties,
    temperature and top-k/p work on the tokens the row may take, and its logprobs are those of what it may take."""
    if all(row.logits_mask is None for row in rows):
        return logits
    anything = torch.ones(logits.size(-1), dtype=torch.bool, device=logits.device)
    allowed = [row.logits_mask(row.output).to(logits.device) if row.logits_mask else anything for row in rows]
    return logits.masked_fill(~torch.stack(allowed), float("-inf"))


def apply_penalties(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Each row's penalties, on the tokens it holds only: the CTRL-style repetition penalty (Keskar et al. 2019,
    as in transformers: a seen token's logit shrinks) over prompt and output, then OpenAI's frequency and presence
    penalties (``frequency * count + presence``) over the output. Scattered by token id rather than through a
    (rows, vocab) mask, which cost 45 ms a step for 64 rows on one core."""
    out: torch.Tensor | None = None
    device = logits.device
    for r, row in enumerate(rows):
        config = row.config
        if config.repetition_penalty != 1.0 and row.seen:
            out = logits.clone() if out is None else out
            ids = torch.tensor(sorted(set(row.seen)), device=device)
            penalty = torch.tensor(config.repetition_penalty, dtype=logits.dtype, device=device)
            values = out[r, ids]
            out[r, ids] = torch.where(values < 0, values * penalty, values / penalty)
        if (config.frequency_penalty or config.presence_penalty) and row.output:
            out = logits.clone() if out is None else out
            ids, counts = torch.tensor(row.output, device=device).unique(return_counts=True)
            frequency = torch.tensor(config.frequency_penalty, dtype=logits.dtype, device=device)
            presence = torch.tensor(config.presence_penalty, dtype=logits.dtype, device=device)
            out[r, ids] = out[r, ids] - frequency * counts.to(logits.dtype) - presence
    return logits if out is None else out


def apply_logit_bias(logits: torch.Tensor, biases: list[tuple[tuple[int, float], ...]]) -> torch.Tensor:
    """Adds each row's ``logit_bias`` (token id -> bias) to its logits; a token the row's mask forbids stays
    forbidden (-inf plus a bias is still -inf)."""
    rows = [r for r, bias in enumerate(biases) for _ in bias]
    tokens = [t for bias in biases for t, _ in bias]
    values = [b for bias in biases for _, b in bias]
    bias = torch.zeros_like(logits)
    device = logits.device
    bias[torch.tensor(rows, device=device), torch.tensor(tokens, dtype=torch.long, device=device)] = torch.tensor(
        values, dtype=logits.dtype, device=logits.device
    )
    return logits + bias


def _keep_until_mass(logits: torch.Tensor, order: torch.Tensor, mass: torch.Tensor | float) -> torch.Tensor:
    """Masks every token after the ones (taken in ``order``) that already cover ``mass`` of the
    probability; the first one always stays. ``mass`` >= 1 keeps everything."""
    probs = logits.softmax(-1).gather(-1, order)
    drop = (probs.cumsum(-1) - probs) >= mass
    drop &= torch.as_tensor(mass, device=logits.device) < 1.0  # float error must not cut a tail at mass 1
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def typical_filter(logits: torch.Tensor, typical_p: torch.Tensor | float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprisal is closest to the
    distribution's entropy, until they cover ``typical_p`` of the mass."""
    log_probs = logits.log_softmax(-1)
    entropy = -(log_probs.exp() * log_probs).nan_to_num().sum(-1, keepdim=True)
    order = (-log_probs - entropy).abs().argsort(-1)
    return _keep_until_mass(logits, order, typical_p)


def logits_to_probs(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_k: torch.Tensor | int,
    top_p: torch.Tensor | float,
    typical_p: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Temperature, then top-k (0: off), top-p and typical-p (1: off); parameters are scalars or one
    value per row, shaped (rows, 1)."""
    logits = logits / temperature
    vocab = logits.size(-1)
    sorted_logits, order = torch.sort(logits, descending=True)
    k = torch.as_tensor(top_k, device=logits.device)
    k = torch.where(k > 0, k.clamp(max=vocab), vocab).expand(*logits.shape[:-1], 1)
    kth = sorted_logits.gather(-1, k - 1)
    logits = logits.masked_fill(logits < kth, float("-inf"))
    logits = _keep_until_mass(logits, order, top_p)
    if (torch.as_tensor(typical_p) < 1.0).any():
        logits = typical_filter(logits, typical_p)
    return logits.softmax(-1)


def greedy_tokens(scores: torch.Tensor) -> torch.Tensor:
    """Each row's argmax (the first of equal maxima). On a CPU through numpy: torch's argmax took 70 us for one
    row of 49k logits and 7.5 ms for 64 rows on one core, numpy's 5 us and 0.27 ms."""
    if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64):
        return scores.argmax(-1)
    return torch.from_numpy(scores.detach().numpy().argmax(-1))


TOP_P_LOOKS = (256, 4096)  # top-p looks for its cut among this many best tokens before it sorts them all


def draw_kept(scaled: np.ndarray, top_k: int, top_p: float, uniform: float) -> int:
    """One row's token (CPU): top-k (0: off) and top-p (1: off) of ``scaled`` (its float32 logits over the
    temperature) as ``logits_to_probs`` keeps them, then the inverse CDF at ``uniform`` over the kept tokens in
    vocabulary order, as ``sample_batch``'s batched path draws. Only the kept tokens are ever sorted (a
    partition finds the k-th best; ties with it stay, as there); numpy, because torch's topk, nonzero and sort
    on one row of 49k logits each cost 100 us or more on one core, several times numpy's."""
    vocab = scaled.size
    ids: np.ndarray | None = None  # the kept token ids, ascending; None: every token
    if 0 < top_k < vocab:
        kth = np.partition(scaled, vocab - top_k)[vocab - top_k]
        ids = np.flatnonzero(scaled >= kth)
    if top_p < 1.0:
        candidates = scaled if ids is None else scaled[ids]
        high = candidates.max()
        total = np.exp(candidates - high, dtype=np.float64).sum()
        for look in (*(n for n in TOP_P_LOOKS if n < candidates.size), candidates.size):
            # the cut usually lies among the best few tokens: sort those, and more only if it lies further down
            best = np.argpartition(-candidates, look - 1)[:look] if look < candidates.size else None
            order = np.argsort(-candidates if best is None else -candidates[best], kind="stable")
            order = order if best is None else best[order]
            probs = np.exp(candidates[order] - high, dtype=np.float64) / total
            keep = (np.cumsum(probs) - probs) < top_p
            if not keep[-1] or best is None:
                break
        kept = np.sort(order[keep])
        ids = kept if ids is None else ids[kept]
    values = scaled if ids is None else scaled[ids]
    cdf = np.cumsum(np.exp(values - values.max(), dtype=np.float64))
    at = min(int(np.searchsorted(cdf, uniform * cdf[-1], side="right")), cdf.size - 1)
    return at if ids is None else int(ids[at])


def sample_batch(logits: torch.Tensor, rows: list[RowSampling]) -> tuple[list[int], list[TokenLogprob | None]]:
    """Chooses every row's next token from ``logits`` (rows, vocab) at once; returns the tokens and,
    for the rows that asked, their logprobs."""
    logits = apply_logits_masks(logits.float(), rows)
    configs = [row.config for row in rows]
    vocab, device = logits.size(-1), logits.device

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

    scores = apply_penalties(logits, rows)
    if any(c.logit_bias for c in configs):
        scores = apply_logit_bias(scores, [c.logit_bias for c in configs])
    tokens = greedy_tokens(scores)
    # one draw per sampled row from its own generator, in row order: the choice depends only on the row and its seed
    uniform = [
        float(torch.rand(1, generator=row.generator)) if not c.greedy else 0.0
        for row, c in zip(rows, configs, strict=True)
    ]
    # On a CPU a sampled row is drawn alone from the tokens it keeps (draw_kept): sorting the whole vocabulary,
    # as logits_to_probs does, took 5 ms a row on one core (49k tokens), as long as a step of the default model.
    # Typical-p needs every token's surprisal order, and a GPU sorts a batch at once: those take the sort.
    sorted_rows = [r for r, c in enumerate(configs) if not c.greedy and (device.type != "cpu" or c.typical_p < 1.0)]
    for r, config in enumerate(configs):
        if not config.greedy and r not in set(sorted_rows):
            scaled = (scores[r] / config.temperature).numpy()
            tokens[r] = draw_kept(scaled, config.top_k, config.top_p, uniform[r])
    if sorted_rows:
        picked = [configs[r] for r in sorted_rows]
        probs = logits_to_probs(
            scores[sorted_rows],
            column([c.temperature for c in picked]),
            torch.tensor([c.top_k for c in picked], device=device)[:, None],
            column([c.top_p for c in picked]),
            column([c.typical_p for c in picked]),
        )
        cdf = probs.cumsum(-1)
        at = column([uniform[r] for r in sorted_rows]) * cdf[:, -1:]
        tokens[sorted_rows] = torch.searchsorted(cdf, at, right=True).squeeze(-1).clamp(max=vocab - 1)
    chosen = tokens.tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(rows)
    wanted = [r for r, c in enumerate(configs) if c.logprobs]
    if wanted:
        log_probs = logits[wanted].log_softmax(-1)
        top = max(configs[r].top_logprobs for r in wanted)
        values, ids = torch.topk(log_probs, top) if top else (None, None)
        for i, r in enumerate(wanted):
            k = configs[r].top_logprobs
            alternatives = list(zip(ids[i, :k].tolist(), values[i, :k].tolist(), strict=True)) if k else []
            logprobs[r] = TokenLogprob(chosen[r], float(log_probs[i, chosen[r]]), alternatives)
    return chosen, logprobs
