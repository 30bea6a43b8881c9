"""Choosing the next token from the logits: one small function per step (gpt-fast style).

Every transform works on one row of logits, so a request's choice never depends on its batch-mates;
with a seed, its own ``torch.Generator`` makes sampling reproducible wherever it runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
        )


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019), as in transformers: shrink the logits of seen tokens."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(-1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen, scores)


def apply_frequency_presence_penalties(
    logits: torch.Tensor, generated: torch.Tensor, frequency: float, presence: float
) -> torch.Tensor:
    """OpenAI-style: subtract ``frequency * count + presence * (count > 0)`` for each generated token."""
    if (frequency == 0.0 and presence == 0.0) or generated.numel() == 0:
        return logits
    counts = torch.bincount(generated, minlength=logits.size(-1)).to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def typical_filter(logits: torch.Tensor, typical_p: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): keep the tokens whose surprisal is closest to the
    distribution's entropy, until they cover ``typical_p`` of the mass."""
    log_probs = logits.log_softmax(-1)
    probs = log_probs.exp()
    entropy = -(probs * log_probs).nan_to_num().sum(-1, keepdim=True)
    distance = (-log_probs - entropy).abs()
    order = distance.argsort(-1)
    cumulative = probs.gather(-1, order).cumsum(-1)
    keep_count = int((cumulative < typical_p).sum()) + 1
    drop = torch.ones_like(logits, dtype=torch.bool)
    drop[order[:keep_count]] = False
    return logits.masked_fill(drop, float("-inf"))


def logits_to_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float, typical_p: float = 1.0
) -> torch.Tensor:
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the tokens before it already cover top_p; the most likely one always stays
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if typical_p < 1.0:
        logits = typical_filter(logits, typical_p)
    return logits.softmax(-1)


def sample_next_token(
    logits: torch.Tensor,
    config: SamplingConfig,
    prompt_and_output: torch.Tensor,
    output: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, TokenLogprob | None]:
    """One row: ``logits`` (vocab,) of the last position; returns the token and, if asked, its logprobs."""
    logits = logits.float()
    scores = apply_repetition_penalty(logits, prompt_and_output, config.repetition_penalty)
    scores = apply_frequency_presence_penalties(scores, output, config.frequency_penalty, config.presence_penalty)
    if config.greedy:
        token = int(scores.argmax(-1))
    else:
        probs = logits_to_probs(scores, config.temperature, config.top_k, config.top_p, config.typical_p)
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, (token_logprob(logits, token, config.top_logprobs) if config.logprobs else None)


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """Log-probabilities under the model's own distribution (before sampling transforms), as vLLM reports."""
    log_probs = logits.log_softmax(-1)
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        values, ids = torch.topk(log_probs, top)
        alternatives = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(log_probs[token]), alternatives)
