"""The evaluation gate: a candidate is promoted only if it is not worse than the served version.

Both models are measured on the same held-out data with the loss the fine-tune reports (``training.model``):
token-level cross-entropy over the assistant tokens, and its perplexity. An optional question file (JSONL:
``{"question": ..., "expected": [words]}``) is answered by each model through the generation engine, greedy,
and scored by whether every expected word appears in the answer. The candidate passes when its perplexity is at
most ``(1 + max_regression)`` times the baseline's and its question score is no lower than the baseline's minus
``max_regression``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger

from services.generation.engine.request import Request, TokenChunk
from services.generation.engine.sampling import SamplingConfig
from services.generation.loading import LoadedModel, start_engine
from training.data import load_packed
from training.model import loss_metrics, packed_loss

QUESTION_TOKENS = 48


class GateError(ValueError):
    """The gate cannot run: unreadable eval data or question file."""


@dataclass
class GateResult:
    candidate: dict[str, float]
    baseline: dict[str, float]
    baseline_model: str
    max_regression: float
    passed: bool
    forced: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def decision(self) -> str:
        return "accepted" if self.passed else ("forced" if self.forced else "refused")

    def as_metadata(self) -> dict:
        numbers = {f"candidate_{k}": v for k, v in self.candidate.items()}
        numbers.update({f"baseline_{k}": v for k, v in self.baseline.items()})
        return {
            **numbers,
            "max_regression": self.max_regression,
            "baseline": self.baseline_model,
            "decision": self.decision,
            "reasons": self.reasons,
        }

    def table(self) -> str:
        rows = [f"{'metric':<22}{'candidate':>12}{'baseline':>12}"]
        for key in self.candidate:
            rows.append(f"{key:<22}{self.candidate[key]:>12.4f}{self.baseline.get(key, float('nan')):>12.4f}")
        rows.append(f"baseline {self.baseline_model}; max regression {self.max_regression:.1%}: {self.decision}")
        rows.extend(f"  {reason}" for reason in self.reasons)
        return "\n".join(rows)


def held_out_metrics(loaded: LoadedModel, eval_data: Path, seq_length: int) -> dict[str, float]:
    """Loss and perplexity of ``loaded`` on ``eval_data`` (packed with its own tokenizer)."""
    data = load_packed(eval_data, loaded.tokenizer, min(seq_length, loaded.context_length), False, False)
    if len(data) == 0:
        raise GateError(f"{eval_data} yields no evaluation rows")
    loss_sum, tokens = packed_loss(loaded.model, data, micro_batch_size=4, device=loaded.device)
    return loss_metrics(loss_sum, tokens)


def read_questions(path: Path) -> list[tuple[str, list[str]]]:
    questions = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            questions.append((str(record["question"]), [str(w) for w in record["expected"]]))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise GateError(f"{path}:{number}: expected {{'question': ..., 'expected': [...]}}: {error}") from None
    if not questions:
        raise GateError(f"{path} holds no questions")
    return questions


def question_score(loaded: LoadedModel, questions: list[tuple[str, list[str]]]) -> float:
    """Share of questions whose greedy answer (through the serving engine) holds every expected word."""
    engine = start_engine(loaded)
    try:
        requests = [
            engine.submit(Request(_prompt_ids(loaded, question), SamplingConfig(max_new_tokens=QUESTION_TOKENS)))
            for question, _ in questions
        ]
        right = 0
        for request, (question, expected) in zip(requests, questions, strict=True):
            answer = "".join(e.text for e in request.events() if isinstance(e, TokenChunk))
            ok = all(word.lower() in answer.lower() for word in expected)
            logger.debug("{} -> {!r} ({})", question, answer, "ok" if ok else "missed")
            right += ok
        return right / len(questions)
    finally:
        engine.shutdown(0.0)


def _prompt_ids(loaded: LoadedModel, question: str) -> list[int]:
    if loaded.prompt_format == "chat_template":
        text = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = f"<human>: {question}\n<bot>:"
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def evaluate_model(
    loaded: LoadedModel, eval_data: Path, seq_length: int, questions: list[tuple[str, list[str]]] | None
) -> dict[str, float]:
    metrics = held_out_metrics(loaded, eval_data, seq_length)
    if questions:
        metrics["question_score"] = question_score(loaded, questions)
    return metrics


def decide(
    candidate: dict[str, float],
    baseline: dict[str, float],
    baseline_model: str,
    max_regression: float,
    force: bool,
) -> GateResult:
    reasons = []
    limit = baseline["eval_perplexity"] * (1 + max_regression)
    if candidate["eval_perplexity"] > limit:
        reasons.append(
            f"perplexity {candidate['eval_perplexity']:.3f} is above the baseline's "
            f"{baseline['eval_perplexity']:.3f} + {max_regression:.1%} = {limit:.3f}"
        )
    if "question_score" in candidate and candidate["question_score"] < baseline["question_score"] - max_regression:
        reasons.append(
            f"question score {candidate['question_score']:.2f} is below the baseline's {baseline['question_score']:.2f}"
        )
    return GateResult(candidate, baseline, baseline_model, max_regression, not reasons, force, reasons)
