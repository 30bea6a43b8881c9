"""Choosing the next token from the logits: one small function per step (gpt-fast style)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling parameters of one request (see params.py for the checks)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0 -> greedy
    top_k: int = 0  # 0 -> off
    top_p: float = 1.0  # 1 -> off
    repetition_penalty: float = 1.0  # 1 -> off
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019), as in transformers: shrink the logits of seen tokens."""
    if penalty == 1.0 or seen.numel() == 0:
        return logits
    scores = logits.gather(-1, seen)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen, scores)


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the tokens before it already cover top_p; the most likely one always stays
        drop = (cumulative - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits.softmax(-1)


def sample_next_token(
    logits: torch.Tensor, config: SamplingConfig, seen: torch.Tensor, generator: torch.Generator | None
) -> int:
    """``logits`` is the last position's vector (vocab,), ``seen`` the prompt and generated ids so far."""
    logits = apply_repetition_penalty(logits.float(), seen, config.repetition_penalty)
    if config.greedy:
        return int(logits.argmax(-1))
    probs = logits_to_probs(logits, config.temperature, config.top_k, config.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))
