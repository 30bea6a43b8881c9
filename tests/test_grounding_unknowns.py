"""Unknowns admitted: a question whose name, number or content word no found passage mentions is answered "The
documents do not say" without the model; a question its passages answer still goes to the model.

`ground` on passages made here or taken from the default corpus (the eval's sources); no servers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nightcap.records import Passage
from services.orchestrator.grounding import NO_SOURCE_REPLY, Grounded, Grounding, ground, missing_names
from services.retrieval.chunker import passages_of
from services.retrieval.corpus import read_wikipedia_summaries

QUESTIONS = json.loads((Path(__file__).parent / "eval" / "questions.json").read_text(encoding="utf-8"))
ZURICH = Passage(
    "Zurich#0",
    "Zurich: Zurich is the largest city in Switzerland and the capital of the canton of Zurich. It is located in "
    "north-central Switzerland, at the northwestern tip of Lake Zurich. As of January 2020, the municipality has "
    "434,335 inhabitants.",
    "Zurich",
    score=0.71,
)
LIGHTHOUSE = Passage(
    "quillon#0",
    "The Quillon lighthouse: The Quillon lighthouse stands on a basalt reef. Its keeper, Marta Quist, painted it"
    " violet in 1931.",
    "The Quillon lighthouse",
    score=0.6,
)
AMSTERDAM = Passage(
    "Amsterdam#0",
    "Amsterdam: Amsterdam is the capital and most populous city of the Netherlands, with a population of 941,873.",
    "Amsterdam",
    score=0.66,
)
GALILEO = Passage(
    "Galileo#0",
    "Galileo Galilei: Galileo di Vincenzo Bonaiuti de' Galilei was an Italian astronomer, physicist and engineer "
    "of the 17th century. He championed heliocentrism and observed the moons of Jupiter with a telescope.",
    "Galileo Galilei",
    score=0.58,
)


def grounded(message: str, passages: list[Passage], grounding: Grounding | None = None) -> Grounded:
    return ground(grounding or Grounding(cut=False), message, [], passages, 3, True, len, lambda _: np.ones(1))


def admitted(message: str, passages: list[Passage]) -> bool:
    return grounded(message, passages).reply.startswith(NO_SOURCE_REPLY)


def test_a_phone_number_no_passage_mentions_is_admitted_not_invented() -> None:
    found = grounded("What is the phone number of the tourist office in Zurich?", [ZURICH, AMSTERDAM])
    assert found.reply == "The documents do not say: none of the passages found mentions phone, tourist, office."
    assert found.passages == [] and "phone" in found.notice


def test_what_an_astronomer_posted_online_is_admitted() -> None:
    assert admitted("What did Galileo post online?", [GALILEO])
    assert not admitted("What did Galileo observe with his telescope?", [GALILEO])


def test_a_number_no_passage_holds_is_admitted_and_one_it_holds_is_answered() -> None:
    assert missing_names("Which city has a population of 1,200,000?", [ZURICH, AMSTERDAM]) == ["1,200,000"]
    assert not admitted("Which city has a population of 941,873?", [ZURICH, AMSTERDAM])
    assert admitted("What happened in Zurich in 1848?", [ZURICH])


@pytest.mark.parametrize(
    ("question", "passages"),
    [
        ("Where is Zurich?", [ZURICH]),
        ("How many people live in Amsterdam?", [AMSTERDAM, ZURICH]),
        ("How many people live in Zürich?", [ZURICH]),
        ("What is the largest city in Switzerland?", [ZURICH]),
        ("Which lake is Zurich on?", [ZURICH]),
        ("What nationality was Galileo?", [GALILEO]),
        ("When was Galileo born?", [GALILEO]),
        ("Tell me about Amsterdam.", [AMSTERDAM]),
        # one word of the question's own (the passage says "violet", "painted"): a paraphrase, not another subject
        ("What colour did Marta Quist paint the Quillon lighthouse?", [LIGHTHOUSE]),
        ("What is Zurich's climate like?", [ZURICH]),
    ],
)
def test_a_question_its_passages_answer_goes_to_the_model(question: str, passages: list[Passage]) -> None:
    found = grounded(question, passages)
    assert found.reply == "" and found.passages


def test_the_plain_prompt_asks_the_model_whatever_the_question_names() -> None:
    found = grounded("What is the phone number of the tourist office in Zurich?", [ZURICH], Grounding.plain())
    assert found.reply == "" and found.passages == [ZURICH]


def nearest_of_its_kind(kind: str) -> list[Passage]:
    """What a search returns for a made-up subject: real passages of the same kind (cities for a city, people for
    a person), each of which shares the question's other words."""
    return {
        "city": [AMSTERDAM, ZURICH],
        "person": [GALILEO],
        "thing": [
            Passage("Golden Gate Bridge#0", "Golden Gate Bridge: The bridge was built in 1937.", "Golden Gate Bridge"),
            Passage(
                "Cologne Cathedral#0", "Cologne Cathedral: The cathedral was built from 1248.", "Cologne Cathedral"
            ),
        ],
    }[kind]


def test_every_unanswerable_eval_question_is_admitted_with_the_passages_nearest_it() -> None:
    kept = [
        q["question"] for q in QUESTIONS["unanswerable"] if not admitted(q["question"], nearest_of_its_kind(q["kind"]))
    ]
    assert kept == []


@pytest.fixture(scope="module")
def sources() -> dict[str, list[Passage]]:
    """The first three passages of every document the eval's answerable questions come from, as the retrieval
    service returns them."""
    titles = {q["source"] for q in [*QUESTIONS["single"], *QUESTIONS["keyword"], *QUESTIONS["conversations"]]}
    return {
        document.title: [Passage(p.id, p.text, p.title, p.source) for p in list(passages_of(document))[:3]]
        for document in read_wikipedia_summaries(titles=sorted(titles))
    }


@pytest.mark.parametrize("questions", ["single", "keyword", "conversations"])
def test_no_answerable_eval_question_is_admitted_with_its_sources_passages(
    questions: str, sources: dict[str, list[Passage]]
) -> None:
    items = QUESTIONS[questions]
    if questions == "conversations":  # their opening question: a follow-up's own words search with it
        items = [{"question": c["turns"][0]["question"], "source": c["source"]} for c in items]
    wrongly = {q["question"]: missing_names(q["question"], sources[q["source"]]) for q in items}
    assert {question: missing for question, missing in wrongly.items() if missing} == {}
