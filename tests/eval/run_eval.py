"""`make eval`: answer quality of the running stack on the question set in tests/eval/questions.json.

    make eval                                   # make up, then this script against it
    .venv/bin/python tests/eval/run_eval.py --limit 5   # a quick look (5 questions per set)

It talks to the generation and retrieval services that `make up` started, through Chat orchestrators it starts
in this process, one per way of building the retrieval query (recent, condense, last), so the three are
measured side by side in one run on the same backends. Reported per set:
- source recall@1 and @k: the question's article is among the first 1 / k passages searched;
- MRR (over the first k);
- answer-word accuracy: the answer contains the expected word (numbers compared without their commas);
- p50 / p95 latency of the whole turn, and p50 time to the first event (ChatStart: the search is done).

Sets: `single` (questions that name their subject), `opening` (the first turn of each conversation) and
`followup/<mode>` (the second turn, with the first turn as history, for each query mode; `last` is the
last-message-only baseline). Writes var/bench/eval.json with the ratio
`multiturn_vs_single_source_recall_at_3` (default mode's follow-ups against the single-turn set).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bench")]

from report import BenchReport  # noqa: E402

from clients.client import ChatClient, Reply, SamplingParams  # noqa: E402
from nightcap.records import GENERATION_ADDRESS, RETRIEVAL_ADDRESS  # noqa: E402
from services.orchestrator.backends import GenerationBackend, RetrievalBackend  # noqa: E402
from services.orchestrator.conversation import ChatOrchestrator, QueryMode, TurnRequest  # noqa: E402
from services.orchestrator.prompts import ContextPassage, Turn  # noqa: E402
from services.orchestrator.server import start_chat_server  # noqa: E402

QUESTIONS = Path(__file__).with_name("questions.json")
DEFAULT_MODE = QueryMode.RECENT


@dataclass
class Outcome:
    rank: int | None  # 1-based rank of the first passage of the source article among the first k, or None
    correct: bool | None  # the answer holds an expected word (None: no answer was generated)
    seconds: float
    start_seconds: float
    split: str
    query: str = ""
    answer: str = ""


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
        if answered:
            metrics["answer_word_accuracy"] = _mean(answered)
        return metrics


def empty_sets(modes: list[QueryMode]) -> dict[str, EvalSet]:
    return {name: EvalSet(name) for name in ["single", "opening", *(f"followup/{m.value}" for m in modes)]}


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
    max_new_tokens: int = 32,
    limit: int | None = None,
    progress: bool = True,
    concurrency: int = 1,
) -> tuple[dict[str, EvalSet], list[dict[str, Any]]]:
    """Every question through real Chat orchestrators (one per mode) on the given backends; ``concurrency``
    questions (or conversations) at a time, which the generation service batches.

    Returns the sets and, for the condense mode, each rewrite with its latency (measured by preparing the
    turn in this process: the same code path, timed alone)."""
    single, conversations = questions["single"][:limit], questions["conversations"][:limit]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    servers = {mode: start_chat_server(generation, retrieval, "127.0.0.1:0", query_mode=mode) for mode in modes}
    clients = {mode: ChatClient(server.address, timeout=300) for mode, server in servers.items()}
    sets = empty_sets(modes)
    rewrites: list[dict[str, Any]] = []
    default = clients[modes[0]]
    total = len(single) + len(conversations) * (1 + len(modes))
    lock = threading.Lock()
    condense = (
        ChatOrchestrator(GenerationBackend(generation), RetrievalBackend(retrieval), query_mode=QueryMode.CONDENSE)
        if QueryMode.CONDENSE in modes
        else None
    )

    def ask_single(item: dict[str, Any]) -> None:
        reply, seconds, start = timed_ask(default, item["question"], retrieval=True, k=k, params=params)
        with lock:
            sets["single"].outcomes.append(_outcome(item["source"], item, reply, seconds, start, k))
            bar.update()

    def converse(conversation: dict[str, Any]) -> None:
        opening, follow_up = conversation["turns"]
        reply, seconds, start = timed_ask(default, opening["question"], retrieval=True, k=k, params=params)
        with lock:
            item = {**opening, "split": conversation["split"]}
            sets["opening"].outcomes.append(_outcome(conversation["source"], item, reply, seconds, start, k))
            bar.update()
        history = reply.as_history(opening["question"])
        for mode, client in clients.items():
            answer, seconds, start = timed_ask(
                client, follow_up["question"], history=history, retrieval=True, k=k, params=params
            )
            with lock:
                item = {**follow_up, "split": conversation["split"]}
                sets[f"followup/{mode.value}"].outcomes.append(
                    _outcome(conversation["source"], item, answer, seconds, start, k)
                )
                bar.update()
        if condense is not None:
            rewrite = _rewrite(condense, follow_up["question"], history, k)
            with lock:
                rewrites.append(rewrite)

    try:
        with (
            tqdm(total=total, desc="eval", unit="turn", disable=not progress) as bar,
            ThreadPoolExecutor(concurrency) as pool,
        ):
            # list() re-raises the first failure
            list(pool.map(ask_single, single))
            list(pool.map(converse, conversations))
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


def _outcome(source: str, item: dict[str, Any], reply: Reply, seconds: float, start: float, k: int) -> Outcome:
    return Outcome(
        rank=rank_of(source, reply.started.retrieved_ids, k),
        correct=holds_answer(reply.text, item["answer_words"]),
        seconds=seconds,
        start_seconds=start,
        split=item["split"],
        query=reply.started.retrieval_query,
        answer=reply.text.strip(),
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
) -> BenchReport:
    bench = BenchReport("eval")
    for name, evaluated in sets.items():
        for split in (None, "dev", "heldout"):
            metrics = evaluated.metrics(split)
            if metrics:
                params = {"k": k, "split": split or "all", "concurrency": concurrency}
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
    if single and single["source_recall_at_3"]:
        for mode in modes:
            follow_up = sets[f"followup/{mode.value}"].metrics()
            if follow_up:
                ratio = follow_up["source_recall_at_3"] / single["source_recall_at_3"]
                name = "multiturn_vs_single_source_recall_at_3"
                bench.ratio(name if mode is modes[0] else f"{mode.value}/{name}", ratio)
    return bench


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
        default=",".join(m.value for m in [DEFAULT_MODE, *(m for m in QueryMode if m is not DEFAULT_MODE)]),
        help="query modes to compare, the default first (its ratio is the headline)",
    )
    parser.add_argument("-k", type=int, default=3, help="passages per turn")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length")
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
    args = parser.parse_args()
    modes = [QueryMode(m) for m in args.modes.split(",")]
    questions = json.loads(args.questions.read_text(encoding="utf-8"))
    generation = GenerationBackend(args.generation)
    model = generation.model_info(30).name
    generation.close()
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
        )
    bench = report(sets, rewrites, modes, args.k, model, 0 if args.retrieval_only else args.concurrency)
    bench.write()
    if args.samples:
        samples = {name: [o.__dict__ for o in s.outcomes] for name, s in sets.items()} | {"rewrites": rewrites}
        args.samples.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
