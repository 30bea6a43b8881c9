"""A slice of `make eval` on the test stack: the question set's shape, and the evaluation itself run through
real orchestrators on the tiny model and an index of the questions' articles plus distractors."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
from conftest import build_tiny_cross_encoder

from services.orchestrator.conversation import QueryMode
from services.retrieval.reranker import Reranker

EVAL = Path(__file__).with_name("eval")
sys.path.insert(0, str(EVAL))
run_eval = importlib.import_module("run_eval")
QUESTIONS = json.loads((EVAL / "questions.json").read_text(encoding="utf-8"))


def one_of_each_kind(items: list[dict]) -> list[dict]:
    return [next(item for item in items if item["kind"] == kind) for kind in ("city", "person", "thing")]


def test_the_question_set_has_held_out_questions_and_conversations_that_need_their_first_turn():
    single, conversations = QUESTIONS["single"], QUESTIONS["conversations"]
    assert len(single) >= 50 and len(conversations) >= 30
    for items in (single, conversations):
        assert {item["split"] for item in items} == {"dev", "heldout"}
        assert {item["kind"] for item in items} == {"city", "person", "thing"}
    assert not {item["source"] for item in single} & {item["source"] for item in conversations}
    for conversation in conversations:
        opening, follow_up = conversation["turns"]
        assert conversation["source"].split(" (")[0] in opening["question"]
        assert conversation["source"].split(" (")[0] not in follow_up["question"]
        assert {"there", "he", "she", "it"} & set(follow_up["question"].rstrip("?").split())
        assert follow_up["answer_words"] and opening["answer_words"]


@pytest.fixture(scope="module")
def eval_index(embedder, tmp_path_factory):
    """Every article of the question set: each follow-up has a dozen of its kind to mistake it for (the other
    cities, people and things)."""
    from services.retrieval.build import build_index
    from services.retrieval.corpus import read_wikipedia_summaries
    from services.retrieval.index import load_index

    titles = [item["source"] for item in QUESTIONS["single"] + QUESTIONS["conversations"] + QUESTIONS["keyword"]]
    folder = tmp_path_factory.mktemp("var") / "indexes" / "eval-slice"
    build_index(read_wikipedia_summaries(titles=titles), embedder, folder, progress=False)
    index = load_index(folder)
    yield index
    index.close()


def serve_retrieval(embedder, index, reranker=None):
    from services.retrieval.retriever import Retriever
    from services.retrieval.server import start_retrieval_server

    return start_retrieval_server(Retriever(embedder, index, reranker), "127.0.0.1:0")


@pytest.fixture(scope="module")
def eval_retrieval(embedder, eval_index):
    """A retrieval service over the eval's articles."""
    running = serve_retrieval(embedder, eval_index)
    yield running.address
    running.stop(grace=1)


def test_the_eval_slice_finds_every_source_and_the_follow_ups_need_the_mix(
    generation_address, eval_retrieval, tmp_path
):
    questions = {
        "single": one_of_each_kind(QUESTIONS["single"]),
        "conversations": one_of_each_kind(QUESTIONS["conversations"]),
    }
    modes = [QueryMode.RECENT, QueryMode.CONDENSE, QueryMode.LAST]
    sets, rewrites = run_eval.run(
        questions, generation_address, eval_retrieval, modes, max_new_tokens=4, progress=False
    )

    assert sets["single"].metrics()["source_recall_at_3"] == 1.0
    assert sets["opening"].metrics()["source_recall_at_3"] == 1.0
    recent, last = sets["followup/recent"].metrics(), sets["followup/last"].metrics()
    assert recent["source_recall_at_3"] == 1.0
    assert recent["source_recall_at_3"] > last["source_recall_at_3"]  # the pronoun alone misses
    assert [o.query for o in sets["followup/last"].outcomes] == [
        c["turns"][1]["question"] for c in questions["conversations"]
    ]
    assert len(rewrites) == 3 and all(r["ms"] > 0 for r in rewrites)

    bench = run_eval.report(sets, rewrites, modes, 3, "tiny")
    written = json.loads(bench.write(tmp_path).read_text())
    assert written["ratios"]["multiturn_vs_single_source_recall_at_3"] == 1.0
    assert "last/multiturn_vs_single_source_recall_at_3" in written["ratios"]
    names = {(r["name"], r["params"].get("split")) for r in written["results"]}
    assert {("single", "all"), ("followup/last", "all"), ("condense_rewrite", None)} <= names


def test_the_made_up_names_of_the_unanswerable_set_are_in_no_article():
    from services.retrieval.corpus import read_wikipedia_summaries

    unanswerable = QUESTIONS["unanswerable"]
    assert len(unanswerable) >= 30 and {item["split"] for item in unanswerable} == {"dev", "heldout"}
    words = {item["made_up"].lower() for item in unanswerable}
    for document in read_wikipedia_summaries():
        text = f"{document.title} {document.text}".lower()
        assert not [word for word in words if word in text], document.title
    assert all(item["made_up"] in item["question"] for item in unanswerable)


def test_admissions_are_told_from_answers():
    assert run_eval.admits("The documents do not say.")
    assert run_eval.admits("I don’t know who that is.")
    assert not run_eval.admits("Zurich has 436,551 inhabitants [1].")


def test_the_grounded_prompt_is_measured_against_the_plain_one_in_the_same_run(
    generation_address, eval_retrieval, tmp_path
):
    questions = {
        "single": one_of_each_kind(QUESTIONS["single"])[:1],
        "conversations": one_of_each_kind(QUESTIONS["conversations"])[:1],
        "unanswerable": QUESTIONS["unanswerable"][:2],
    }
    variants = {"grounded": run_eval.VARIANTS["grounded"], "plain": run_eval.VARIANTS["plain"]}
    sets, _ = run_eval.run(
        questions,
        generation_address,
        eval_retrieval,
        [QueryMode.RECENT],
        max_new_tokens=4,
        progress=False,
        variants=variants,
    )
    assert set(sets) == {
        "single", "opening", "followup/recent", "unanswerable",
        "plain/single", "plain/opening", "plain/followup/recent", "plain/unanswerable",
    }  # fmt: skip
    assert all(len(s.outcomes) == 2 for name, s in sets.items() if name.endswith("unanswerable"))
    grounded, plain = sets["single"].outcomes[0], sets["plain/single"].outcomes[0]
    assert grounded.rank == plain.rank == 1  # the same search; only the prompt differs
    unanswerable = sets["unanswerable"].metrics()
    assert "admitted" in unanswerable and "source_recall_at_3" not in unanswerable
    bench = run_eval.report(sets, [], [QueryMode.RECENT], 3, "tiny")
    written = json.loads(bench.write(tmp_path).read_text())
    names = {r["name"] for r in written["results"]}
    assert {"unanswerable", "plain/unanswerable", "plain/followup/recent"} <= names
    for ratio in written["ratios"]:
        assert ratio.startswith(("answer_accuracy_vs_baseline/", "multiturn_vs_single"))


def test_the_keyword_set_asks_for_numbers_only_one_article_holds():
    keyword = QUESTIONS["keyword"]
    assert len(keyword) >= 30 and {item["split"] for item in keyword} == {"dev", "heldout"}
    assert not {item["source"] for item in keyword} & {item["source"] for item in QUESTIONS["single"]}
    for item in keyword:
        assert item["source"].split(" (")[0] not in item["question"]  # only the number names it


def test_each_search_mode_is_measured_on_the_keyword_single_and_follow_up_sets(
    generation_address, eval_retrieval, tmp_path
):
    questions = {
        "keyword": QUESTIONS["keyword"][:6],
        "single": one_of_each_kind(QUESTIONS["single"]),
        "conversations": one_of_each_kind(QUESTIONS["conversations"]),
    }
    sets = run_eval.run_search_modes(questions, generation_address, eval_retrieval, progress=False)

    recall = {name: evaluated.metrics()["source_recall_at_3"] for name, evaluated in sets.items()}
    assert set(recall) == {
        f"search/{m}/{s}" for m in ("vector", "keyword", "hybrid") for s in ("keyword", "single", "followup")
    }
    assert recall["search/keyword/keyword"] == recall["search/hybrid/keyword"] == 1.0
    assert recall["search/hybrid/keyword"] > recall["search/vector/keyword"]  # numbers are what vectors miss
    bench = run_eval.report({**sets, "single": sets["search/hybrid/single"]}, [], [], 3, "tiny")
    written = json.loads(bench.write(tmp_path).read_text())
    results = {r["name"]: r["metrics"] for r in written["results"] if r["params"].get("split") == "all"}
    assert results["search/hybrid/keyword"]["source_recall_at_3"] == 1.0
    assert written["ratios"]["hybrid_vs_vector_source_recall_at_3/single"] >= 1.0  # (undefined where vector finds 0)


def test_a_service_with_a_reranker_is_measured_with_it_and_without_it_in_one_run(
    generation_address, embedder, eval_index, eval_retrieval, tmp_path
):
    questions = {"keyword": QUESTIONS["keyword"][:6], "single": one_of_each_kind(QUESTIONS["single"])}
    questions["conversations"] = one_of_each_kind(QUESTIONS["conversations"])
    texts = [item["question"] for item in questions["keyword"] + questions["single"]]
    reranker = Reranker(str(build_tiny_cross_encoder(tmp_path / "cross-encoder", texts)))
    running = serve_retrieval(embedder, eval_index, reranker)
    try:
        with_reranker = run_eval.run_search_modes(questions, generation_address, running.address, progress=False)
    finally:
        running.stop(grace=1)
    without = run_eval.run_search_modes(questions, generation_address, eval_retrieval, progress=False)

    recall = {name: evaluated.metrics()["source_recall_at_3"] for name, evaluated in with_reranker.items()}
    assert set(recall) == set(without) | {f"search/hybrid+rerank/{s}" for s in ("keyword", "single", "followup")}
    for name, evaluated in without.items():  # the three modes ask the service not to rerank, and it does not
        assert recall[name] == evaluated.metrics()["source_recall_at_3"], name
    # a random cross-encoder reorders the 20 fused candidates: the sources it loses show it ran
    assert recall["search/hybrid+rerank/keyword"] < recall["search/hybrid/keyword"] == 1.0
    bench = run_eval.report(with_reranker | {"single": with_reranker["search/hybrid/single"]}, [], [], 3, "t")
    ratios = json.loads(bench.write(tmp_path).read_text())["ratios"]
    assert recall["search/vector/single"] > 0  # the ratio is defined
    assert ratios["hybrid_rerank_vs_vector_source_recall_at_3/single"] == pytest.approx(
        recall["search/hybrid+rerank/single"] / recall["search/vector/single"], abs=1e-3
    )


def test_sampled_runs_give_each_question_its_own_seed_and_greedy_runs_none():
    sampled = run_eval.Sampling(temperature=0.6, top_k=40).params(64)
    first, again, other = sampled("Where is Zurich?"), sampled("Where is Zurich?"), sampled("Who was Galileo?")
    assert first.seed is not None and first.seed == again.seed and first.seed != other.seed
    assert (first.temperature, first.top_k, first.max_new_tokens) == (0.6, 40, 64)
    assert run_eval.Sampling(temperature=0.6, seed=1).params(64)("Where is Zurich?").seed != first.seed
    greedy = run_eval.Sampling().params(64)("Where is Zurich?")
    assert greedy.temperature == 0.0 and greedy.seed is None and greedy.top_k is None
    assert run_eval.Sampling(temperature=0.6, top_k=40).label() == {"temperature": 0.6, "top_k": 40}
