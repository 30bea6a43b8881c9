"""`make eval`: answer quality of the running stack on the question set in tests/eval/questions.json.

    make eval                                   # make up, then this script against it
    .venv/bin/python tests/eval/run_eval.py --limit 5   # a quick look (5 questions per set)

It talks to the generation and retrieval services that `make up` started, through Chat orchestrators it starts
in this process: one per prompt variant (`grounded`, the orchestrator's default; `whole`, grounded without the
sentence cut; `plain`, the prompt before grounding, the baseline) and, for the first variant, one per way of
building the retrieval query (`--modes`: recent, condense, last), so all are measured side by side in one run on
the same backends, each question asked of every variant at about the same time. Reported per set:
- source recall@1 and @k: the question's article is among the first 1 / k passages searched;
- MRR (over the first k);
- answer-word accuracy: the answer contains the expected word (numbers compared without their commas);
- admitted: the share of answers that say the documents do not hold the answer (wanted for `unanswerable`,
  a loss elsewhere);
- p50 / p95 latency of the whole turn, and p50 time to the first event (ChatStart: the search is done).

Beside them, how each search mode finds sources (`search/<vector|keyword|hybrid>/<keyword|single|followup>`,
source recall and MRR; turns prepared by an orchestrator whose searches all ask for that mode, not generated),
with the ratios `hybrid_vs_vector_source_recall_at_3/<set>`. The `keyword` set asks what only a number in one
article answers ("Which city has a population of 613,111?"). Where the retrieval service has a reranker
(`NIGHTCAP_RERANKER=<CrossEncoder folder or hub id> make eval`), those three modes search without it and a
fourth, `search/hybrid+rerank/<set>`, with it, with the ratios `hybrid_rerank_vs_vector_source_recall_at_3/<set>`.

Sets: `single` (questions that name their subject), `opening` (the first turn of each conversation),
`followup/<mode>` (the second turn, with the first turn as history, for each query mode; `last` is the
last-message-only baseline) and `unanswerable` (questions about made-up names); a variant other than the first
prefixes its name (`plain/single`). Writes var/bench/eval.json with the ratios
`multiturn_vs_single_source_recall_at_3` (default mode's follow-ups against the single-turn set) and
`answer_accuracy_vs_baseline/<set>` (the first variant against `plain`; for `unanswerable`, admitted).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bench")]

from report import BenchReport  # noqa: E402

from clients.client import ChatClient, Reply, SamplingParams  # noqa: E402
from nightcap.records import GENERATION_ADDRESS, RETRIEVAL_ADDRESS  # noqa: E402
from nightcap.v1 import retrieval_pb2  # noqa: E402
from services.orchestrator.backends import GenerationBackend, RetrievalBackend  # noqa: E402
from services.orchestrator.conversation import ChatOrchestrator, QueryMode, TurnRequest  # noqa: E402
from services.orchestrator.grounding import Grounding  # noqa: E402
from services.orchestrator.prompts import ContextPassage, Turn  # noqa: E402
from services.orchestrator.server import start_chat_server  # noqa: E402

QUESTIONS = Path(__file__).with_name("questions.json")
DEFAULT_MODE = QueryMode.RECENT
BASELINE = "plain"
VARIANTS = {
    "grounded": Grounding(),
    "whole": Grounding(cut=False),  # grounded, passages whole: the sentence cut off
    "uncited": Grounding(cite=False),  # grounded, numbered but no citations asked for
    "admit": Grounding(admit=True),  # grounded, and the model told to say "The documents do not say."
    "untitled": Grounding(titles=False),  # grounded, no title lookup for "What is X?" questions
    BASELINE: Grounding.plain(),
}
# What an answer that admits the documents do not hold the answer says, in the words models use for it.
ADMISSIONS = (
    "do not say",
    "does not say",
    "don't say",
    "doesn't say",
    "do not know",
    "don't know",
    "not mentioned",
    "no information",
    "not provided",
    "cannot answer",
    "can't answer",
    "not specified",
    "do not contain",
    "does not contain",
    "do not mention",
    "does not mention",
    "no passage",
)


@dataclass(frozen=True)
class Sampling:
    """How every variant answers: greedy (make eval's headline), or sampled as a chat is by default (the
    gateway's and chatctl's temperature 0.6, top-k 40), each question with its own seed drawn from its text, so
    a run is reproducible and the variants get the same draws."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int = 0

    def params(self, max_new_tokens: int) -> Callable[[str], SamplingParams]:
        def for_question(question: str) -> SamplingParams:
            seed = (self.seed + zlib.crc32(question.encode())) % 2**31 if self.temperature > 0 else None
            return SamplingParams(
                max_new_tokens=max_new_tokens,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                repetition_penalty=self.repetition_penalty,
                seed=seed,
            )

        return for_question

    def label(self) -> dict[str, Any]:
        fields = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        fields["repetition_penalty"] = self.repetition_penalty
        return {name: value for name, value in fields.items() if value is not None}


@dataclass
class Outcome:
    rank: int | None  # 1-based rank of the first passage of the source article among the first k, or None
    correct: bool | None  # the answer holds an expected word (None: no answer was generated)
    seconds: float
    start_seconds: float
    split: str
    query: str = ""
    answer: str = ""
    admitted: bool | None = None  # the answer says the documents do not hold it (None: no answer generated)
    top_score: float | None = None  # the best given passage's score


@dataclass
class EvalSet:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)

    def metrics(self, split: str | None = None) -> dict[str, float]:
        chosen = [o for o in self.outcomes if split is None or o.split == split]
        if not chosen:
            return {}
        times = sorted(o.seconds for o in chosen)
        metrics = {
            "questions": len(chosen),
            "source_recall_at_1": _mean(o.rank == 1 for o in chosen),
            "source_recall_at_3": _mean(o.rank is not None and o.rank <= 3 for o in chosen),
            "mrr": _mean(1 / o.rank if o.rank else 0.0 for o in chosen),
            "p50_latency_ms": 1000 * statistics.median(times),
            "p95_latency_ms": 1000 * _p95(times),
            "p50_time_to_start_ms": 1000 * statistics.median(o.start_seconds for o in chosen),
        }
        answered = [o.correct for o in chosen if o.correct is not None]
        if answered and not self.name.endswith("unanswerable"):
            metrics["answer_word_accuracy"] = _mean(answered)
        admitted = [o.admitted for o in chosen if o.admitted is not None]
        if admitted:
            metrics["admitted"] = _mean(admitted)
        if self.name.endswith("unanswerable"):
            for key in ("source_recall_at_1", "source_recall_at_3", "mrr"):  # no article holds the answer
                del metrics[key]
        return metrics


def set_name(variant: str, base: str, variants: list[str]) -> str:
    """The first variant's sets keep their plain names; another's are prefixed with it (``plain/single``)."""
    return base if variant == variants[0] else f"{variant}/{base}"


def empty_sets(
    modes: list[QueryMode], variants: list[str] | None = None, unanswerable: bool = False
) -> dict[str, EvalSet]:
    variants = variants or ["grounded"]
    names = []
    for variant in variants:
        follow_ups = [f"followup/{m.value}" for m in (modes if variant == variants[0] else modes[:1])]
        bases = ["single", "opening", *follow_ups, *(["unanswerable"] if unanswerable else [])]
        names += [set_name(variant, base, variants) for base in bases]
    return {name: EvalSet(name) for name in names}


def _mean(values: Iterable[float]) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 4) if values else 0.0


def _p95(ascending: list[float]) -> float:
    """The nearest-rank 95th percentile of sorted values."""
    return ascending[min(len(ascending) - 1, round(0.95 * (len(ascending) - 1)))]


def article_of(passage_id: str) -> str:
    return passage_id.rpartition("#")[0]


def rank_of(source: str, retrieved_ids: list[str], k: int) -> int | None:
    for rank, passage_id in enumerate(retrieved_ids[:k], 1):
        if article_of(passage_id) == source:
            return rank
    return None


def holds_answer(answer: str, words: list[str]) -> bool:
    text = answer.lower().replace(",", "")
    return any(word.lower().replace(",", "") in text for word in words)


def admits(answer: str) -> bool:
    text = answer.lower().replace("’", "'")
    return any(phrase in text for phrase in ADMISSIONS)


def timed_ask(client: ChatClient, question: str, **kwargs: Any) -> tuple[Reply, float, float]:
    """The reply, the seconds to its last event and the seconds to its first (ChatStart)."""
    started = time.perf_counter()
    first_event: list[float] = []
    events = client.chat(question, **kwargs)
    reply_events = []
    for event in events:
        if not first_event:
            first_event.append(time.perf_counter() - started)
        reply_events.append(event)
    total = time.perf_counter() - started
    text = "".join(getattr(e, "text", "") for e in reply_events[1:-1])
    return Reply(text, reply_events[0], reply_events[-1]), total, first_event[0]


def run(
    questions: dict[str, Any],
    generation: str,
    retrieval: str,
    modes: list[QueryMode],
    k: int = 3,
    max_new_tokens: int = 64,
    limit: int | None = None,
    progress: bool = True,
    concurrency: int = 1,
    variants: dict[str, Grounding] | None = None,
    sampling: Sampling | None = None,
) -> tuple[dict[str, EvalSet], list[dict[str, Any]]]:
    """Every question through real Chat orchestrators (one per variant, and per mode for the first variant) on
    the given backends; ``concurrency`` questions (or conversations) at a time, which the generation service
    batches. Each question is asked of every variant before the next question, so the variants share the
    machine's load alike.

    Returns the sets and, for the condense mode, each rewrite with its latency (measured by preparing the
    turn in this process: the same code path, timed alone). ``sampling``: greedy when not given."""
    variants = variants or {"grounded": Grounding()}
    sampling = sampling or Sampling()
    names = list(variants)
    single, conversations = questions["single"][:limit], questions["conversations"][:limit]
    unanswerable = questions.get("unanswerable", [])[:limit]
    params = sampling.params(max_new_tokens)
    servers = {
        (variant, mode): start_chat_server(generation, retrieval, "127.0.0.1:0", query_mode=mode, grounding=grounding)
        for variant, grounding in variants.items()
        for mode in (modes if variant == names[0] else modes[:1])
    }
    clients = {key: ChatClient(server.address, timeout=300) for key, server in servers.items()}
    sets = empty_sets(modes, names, bool(unanswerable))
    rewrites: list[dict[str, Any]] = []
    total = sum(len(single) + len(unanswerable) + len(conversations) for _ in names)
    total += sum(len(conversations) for _ in clients)
    lock = threading.Lock()
    condense = (
        ChatOrchestrator(
            GenerationBackend(generation),
            RetrievalBackend(retrieval),
            query_mode=QueryMode.CONDENSE,
            grounding=variants[names[0]],
        )
        if QueryMode.CONDENSE in modes
        else None
    )

    def record(name: str, outcome: Outcome) -> None:
        with lock:
            sets[name].outcomes.append(outcome)
            bar.update()

    def ask_single(job: tuple[str, dict[str, Any]]) -> None:
        variant, item = job
        reply, seconds, start = timed_ask(
            clients[(variant, modes[0])], item["question"], retrieval=True, k=k, params=params(item["question"])
        )
        record(set_name(variant, "single", names), _outcome(item["source"], item, reply, seconds, start, k))

    def ask_unanswerable(job: tuple[str, dict[str, Any]]) -> None:
        variant, item = job
        reply, seconds, start = timed_ask(
            clients[(variant, modes[0])], item["question"], retrieval=True, k=k, params=params(item["question"])
        )
        outcome = _outcome("", {**item, "answer_words": []}, reply, seconds, start, k)
        outcome.correct = outcome.admitted
        record(set_name(variant, "unanswerable", names), outcome)

    def converse(job: tuple[str, dict[str, Any]]) -> None:
        variant, conversation = job
        opening, follow_up = conversation["turns"]
        split = conversation["split"]
        reply, seconds, start = timed_ask(
            clients[(variant, modes[0])], opening["question"], retrieval=True, k=k, params=params(opening["question"])
        )
        item = {**opening, "split": split}
        record(set_name(variant, "opening", names), _outcome(conversation["source"], item, reply, seconds, start, k))
        history = reply.as_history(opening["question"])
        for (owner, mode), client in clients.items():
            if owner != variant:
                continue
            answer, seconds, start = timed_ask(
                client,
                follow_up["question"],
                history=history,
                retrieval=True,
                k=k,
                params=params(follow_up["question"]),
            )
            outcome = _outcome(conversation["source"], {**follow_up, "split": split}, answer, seconds, start, k)
            record(set_name(variant, f"followup/{mode.value}", names), outcome)
        if condense is not None and variant == names[0]:
            rewrite = _rewrite(condense, follow_up["question"], history, k)
            with lock:
                rewrites.append(rewrite)

    def jobs(items: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        return [(variant, item) for item in items for variant in names]

    try:
        with (
            tqdm(total=total, desc="eval", unit="turn", disable=not progress) as bar,
            ThreadPoolExecutor(concurrency) as pool,
        ):
            # list() re-raises the first failure
            list(pool.map(ask_single, jobs(single)))
            list(pool.map(converse, jobs(conversations)))
            list(pool.map(ask_unanswerable, jobs(unanswerable)))
    finally:
        for client in clients.values():
            client.close()
        for server in servers.values():
            server.stop(grace=1)
        if condense is not None:
            condense.generation.close()
            condense.retrieval.close()
    return sets, rewrites


NOT_GENERATED = "(no answer: a retrieval-only run generates none)"


def run_retrieval_only(
    questions: dict[str, Any],
    generation: str,
    retrieval: str,
    modes: list[QueryMode],
    k: int = 3,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, EvalSet]:
    """The retrieval half of the evaluation, fast: each turn is prepared by a real ChatOrchestrator (query built
    from the conversation, search, prompt fitted and tokenized by the generation service) but not generated.
    The opening turn's answer in the history is a placeholder, so `condense`, which reads it, is left out."""
    modes = [mode for mode in modes if mode is not QueryMode.CONDENSE]
    single, conversations = questions["single"][:limit], questions["conversations"][:limit]
    orchestrators = {
        mode: ChatOrchestrator(GenerationBackend(generation), RetrievalBackend(retrieval), query_mode=mode)
        for mode in modes
    }
    sets = empty_sets(modes)

    def prepared(mode: QueryMode, question: str, history: list[Turn], source: str, split: str) -> tuple[Outcome, Any]:
        started = time.perf_counter()
        turn = orchestrators[mode].prepare(TurnRequest(question, history, retrieval=True, k=k, max_new_tokens=1))
        seconds = time.perf_counter() - started
        rank = rank_of(source, turn.retrieved_ids, k)
        return Outcome(rank, None, seconds, seconds, split, turn.retrieval_query), turn

    try:
        for item in tqdm(single, desc="single", disable=not progress):
            sets["single"].outcomes.append(prepared(modes[0], item["question"], [], item["source"], item["split"])[0])
        for conversation in tqdm(conversations, desc="conversations", disable=not progress):
            opening, follow_up = conversation["turns"]
            source, split = conversation["source"], conversation["split"]
            outcome, turn = prepared(modes[0], opening["question"], [], source, split)
            sets["opening"].outcomes.append(outcome)
            context = tuple(ContextPassage(p.title, p.text, p.source) for p in turn.sources)
            history = [Turn("user", opening["question"], context), Turn("assistant", NOT_GENERATED)]
            for mode in modes:
                outcome, _ = prepared(mode, follow_up["question"], history, source, split)
                sets[f"followup/{mode.value}"].outcomes.append(outcome)
    finally:
        for orchestrator in orchestrators.values():
            orchestrator.generation.close()
            orchestrator.retrieval.close()
    return sets


SEARCH_MODES = {
    "vector": retrieval_pb2.SEARCH_MODE_VECTOR,
    "keyword": retrieval_pb2.SEARCH_MODE_KEYWORD,
    "hybrid": retrieval_pb2.SEARCH_MODE_HYBRID,
}
RERANKED = "hybrid+rerank"  # hybrid search reordered by the service's reranker, when it has one


def run_search_modes(
    questions: dict[str, Any],
    generation: str,
    retrieval: str,
    k: int = 3,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, EvalSet]:
    """Source recall of each search mode (``search/<mode>/<set>``) on the keyword, single and follow-up sets,
    each turn prepared (not generated) by a real orchestrator in the default query mode whose searches all ask
    for that mode. The unanswerable set has no source to find: it is left out here. Where the service has a
    reranker, the modes search without it, and ``hybrid+rerank`` with it."""
    sets: dict[str, EvalSet] = {}
    keyword, single = questions.get("keyword", [])[:limit], questions["single"][:limit]
    conversations = questions["conversations"][:limit]
    service = RetrievalBackend(retrieval)
    try:
        reranker = service.stats(30).reranker
    finally:
        service.close()
    searches = {name: (mode, False) for name, mode in SEARCH_MODES.items()}
    if reranker:
        searches[RERANKED] = (retrieval_pb2.SEARCH_MODE_HYBRID, True)
    for name, (mode, rerank) in searches.items():
        orchestrator = ChatOrchestrator(
            GenerationBackend(generation),
            RetrievalBackend(retrieval, search_mode=mode, rerank=rerank),
            query_mode=DEFAULT_MODE,
        )

        def prepared(question: str, history: list[Turn], source: str, split: str, o=orchestrator) -> tuple:
            started = time.perf_counter()
            turn = o.prepare(TurnRequest(question, history, retrieval=True, k=k, max_new_tokens=1))
            seconds = time.perf_counter() - started
            return Outcome(
                rank_of(source, turn.retrieved_ids, k), None, seconds, seconds, split, turn.retrieval_query
            ), turn

        try:
            for base, items in (("keyword", keyword), ("single", single)):
                evaluated = sets.setdefault(f"search/{name}/{base}", EvalSet(f"search/{name}/{base}"))
                for item in tqdm(items, desc=f"{name} search: {base}", disable=not progress):
                    evaluated.outcomes.append(prepared(item["question"], [], item["source"], item["split"])[0])
            evaluated = sets.setdefault(f"search/{name}/followup", EvalSet(f"search/{name}/followup"))
            for conversation in tqdm(conversations, desc=f"{name} search: follow-ups", disable=not progress):
                opening, follow_up = conversation["turns"]
                source, split = conversation["source"], conversation["split"]
                _, turn = prepared(opening["question"], [], source, split)
                context = tuple(ContextPassage(p.title, p.text, p.source) for p in turn.sources)
                history = [Turn("user", opening["question"], context), Turn("assistant", NOT_GENERATED)]
                evaluated.outcomes.append(prepared(follow_up["question"], history, source, split)[0])
        finally:
            orchestrator.generation.close()
            orchestrator.retrieval.close()
    return {name: evaluated for name, evaluated in sets.items() if evaluated.outcomes}


def _outcome(source: str, item: dict[str, Any], reply: Reply, seconds: float, start: float, k: int) -> Outcome:
    scores = [passage.score for passage in reply.started.sources]
    return Outcome(
        rank=rank_of(source, reply.started.retrieved_ids, k) if source else None,
        correct=holds_answer(reply.text, item["answer_words"]),
        seconds=seconds,
        start_seconds=start,
        split=item["split"],
        query=reply.started.retrieval_query,
        answer=reply.text.strip(),
        admitted=admits(reply.text),
        top_score=round(max(scores), 4) if scores else None,
    )


def _rewrite(condense: ChatOrchestrator, question: str, history: list, k: int) -> dict[str, Any]:
    turns = [
        Turn(m.role, m.content, tuple(ContextPassage(s.title, s.text, s.source) for s in m.sources)) for m in history
    ]
    prepared = condense.prepare(TurnRequest(question, history=turns, retrieval=True, k=k, max_new_tokens=1))
    return {"question": question, "rewritten": prepared.retrieval_query, "ms": round(prepared.query_ms, 1)}


def report(
    sets: dict[str, EvalSet],
    rewrites: list[dict[str, Any]],
    modes: list[QueryMode],
    k: int,
    model: str,
    concurrency: int = 1,
    sampling: Sampling | None = None,
    area: str = "eval",
) -> BenchReport:
    bench = BenchReport(area)
    labels = (sampling or Sampling()).label()
    for name, evaluated in sets.items():
        for split in (None, "dev", "heldout"):
            metrics = evaluated.metrics(split)
            if metrics:
                params = {"k": k, "split": split or "all", "concurrency": concurrency, **labels}
                bench.add(name, system="nightcap", model=model, params=params, metrics=metrics)
    single = sets["single"].metrics()
    if rewrites:
        times = sorted(r["ms"] for r in rewrites)
        bench.add(
            "condense_rewrite",
            system="nightcap",
            model=model,
            params={"max_new_tokens": 40},
            metrics={
                "p50_ms": statistics.median(times),
                "p95_ms": _p95(times),
            },
        )
    baseline = BASELINE if any(name.startswith(f"{BASELINE}/") for name in sets) else None
    for name, evaluated in sets.items():
        if baseline is None or f"{baseline}/{name}" not in sets:
            continue  # another variant's set, or a follow-up in a mode only the first variant ran
        metric = "admitted" if name == "unanswerable" else "answer_word_accuracy"
        ours, theirs = evaluated.metrics().get(metric), sets[f"{baseline}/{name}"].metrics().get(metric)
        if ours is not None and theirs:  # undefined when the baseline got none right: both are in the results
            bench.ratio(f"answer_accuracy_vs_baseline/{name}", ours / theirs)
    for base in ("keyword", "single", "followup"):  # what hybrid search (and a reranker) gains on each set
        vector = sets.get(f"search/vector/{base}")
        for name, ratio_name in (("hybrid", "hybrid"), (RERANKED, "hybrid_rerank")):
            searched = sets.get(f"search/{name}/{base}")
            if searched and vector and vector.metrics()["source_recall_at_3"]:
                ratio = searched.metrics()["source_recall_at_3"] / vector.metrics()["source_recall_at_3"]
                bench.ratio(f"{ratio_name}_vs_vector_source_recall_at_3/{base}", ratio)
    if single and single["source_recall_at_3"]:
        for mode in modes:
            follow_up = sets[f"followup/{mode.value}"].metrics()
            if follow_up:
                ratio = follow_up["source_recall_at_3"] / single["source_recall_at_3"]
                name = "multiturn_vs_single_source_recall_at_3"
                bench.ratio(name if mode is modes[0] else f"{mode.value}/{name}", ratio)
    return bench


def variants(names: str, min_score: float) -> dict[str, Grounding]:
    chosen = {}
    for name in names.split(","):
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: use some of {', '.join(VARIANTS)}")
        grounding = VARIANTS[name]
        chosen[name] = replace(grounding, min_score=min_score) if grounding.numbered else grounding
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--generation",
        default=os.environ.get("NIGHTCAP_GENERATION_ADDRESS", GENERATION_ADDRESS),
        help="generation service host:port (NIGHTCAP_GENERATION_ADDRESS)",
    )
    parser.add_argument(
        "--retrieval",
        default=os.environ.get("NIGHTCAP_RETRIEVAL_ADDRESS", RETRIEVAL_ADDRESS),
        help="retrieval service host:port (NIGHTCAP_RETRIEVAL_ADDRESS)",
    )
    parser.add_argument(
        "--modes",
        default=DEFAULT_MODE.value,
        help="query modes to compare on the follow-ups, the default first (its ratio is the headline), e.g."
        " recent,condense,last",
    )
    parser.add_argument(
        "--variants",
        default="grounded,whole,plain",
        help=f"prompt variants to compare, the headline first: {', '.join(VARIANTS)} ({BASELINE} is the"
        " baseline of the answer_accuracy_vs_baseline ratios)",
    )
    parser.add_argument(
        "--min-score", type=float, default=0.0, help="the grounded variants' retrieval score floor (0: none)"
    )
    parser.add_argument("-k", type=int, default=3, help="passages per turn")
    # 64, not 32: at 32 the answer that copies "Shanghai: Shanghai is ... It has a population of 30,050,000" was
    # cut at "30,050,0" and counted wrong, though a chat (256 tokens by default) shows the whole number.
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer length in tokens, every variant alike")
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature of every answer; 0 (the default) is greedy, 0.6 is what a chat gets by default",
    )
    parser.add_argument("--top-k", type=int, default=None, help="top-k of every answer (unset: the server's)")
    parser.add_argument("--top-p", type=float, default=None, help="top-p of every answer (unset: the server's)")
    parser.add_argument(
        "--repetition-penalty", type=float, default=None, help="repetition penalty of every answer (unset: none)"
    )
    parser.add_argument("--seed", type=int, default=0, help="added to each question's seed when sampling")
    parser.add_argument(
        "--area",
        default="eval",
        help="the report's name: var/bench/<AREA>.json (eval-defaults for a run at a chat's default sampling)",
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each set")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="questions (or conversations) asked at once; 1 for clean latencies"
    )
    parser.add_argument("--questions", type=Path, default=QUESTIONS, help="the question set")
    parser.add_argument("--samples", type=Path, default=None, help="also write every answer and query here")
    parser.add_argument(
        "--retrieval-only",
        action="store_true",
        help="prepare each turn (query, search, prompt) without generating: recall and MRR in seconds, no answers",
    )
    parser.add_argument(
        "--skip-search-modes",
        action="store_true",
        help="skip the source recall of vector, keyword and hybrid search on the keyword, single and follow-up sets",
    )
    args = parser.parse_args()
    modes = [QueryMode(m) for m in args.modes.split(",")]
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.seed)
    questions = json.loads(args.questions.read_text(encoding="utf-8"))
    generation = GenerationBackend(args.generation)
    model = generation.model_info(30).name
    generation.close()
    search_sets = {}
    if not args.skip_search_modes:
        search_sets = run_search_modes(questions, args.generation, args.retrieval, args.k, args.limit)
    if args.retrieval_only:
        sets, rewrites = run_retrieval_only(questions, args.generation, args.retrieval, modes, args.k, args.limit), []
        modes = [mode for mode in modes if mode is not QueryMode.CONDENSE]
    else:
        sets, rewrites = run(
            questions,
            args.generation,
            args.retrieval,
            modes,
            args.k,
            args.max_new_tokens,
            args.limit,
            True,
            args.concurrency,
            variants(args.variants, args.min_score),
            sampling,
        )
    sets.update(search_sets)
    concurrency = 0 if args.retrieval_only else args.concurrency
    bench = report(sets, rewrites, modes, args.k, model, concurrency, sampling, args.area)
    bench.write()
    if args.samples:
        samples = {name: [o.__dict__ for o in s.outcomes] for name, s in sets.items()} | {"rewrites": rewrites}
        args.samples.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
