"""Writes tests/eval/questions.json: the `make eval` question set, generated from the default Wikipedia corpus.

    .venv/bin/python tests/eval/make_questions.py          # rewrite the committed set (deterministic)

Three kinds of article, each with a question the article answers in words that can be checked:
- a city with its population: "Where is X?" (its country), then "How many people live there?";
- a person: "Who was X?" (the occupation), then "What nationality was he?";
- a thing founded, built or established in a year: "What is X?" (what it is), then "When was it founded?".

Single-turn questions name their subject ("How many people live in Accra?"); conversations ask the same kind of
question as a follow-up with a pronoun, which only the earlier turn explains. The two sets use different
articles. About a third of each set is held out: tune on the rest (`--split dev`), report both.

A keyword set asks what only a number in one article answers, the kind of question an embedder handles poorly:
a city by its population ("Which city has a population of 613,111?"), kept only when no other article holds that
number; cities the other sets do not use.

A fourth set is unanswerable: the same questions about made-up names that no article of the corpus mentions
("How many people live in Torvalune?"), so whatever the search returns does not hold the answer, and a
trustworthy answer says so.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from services.retrieval.corpus import Document, read_wikipedia_summaries

OUT = Path(__file__).with_name("questions.json")
SINGLE_PER_KIND = 20
CONVERSATIONS_PER_KIND = (14, 13, 13)  # cities, people, things: 40 conversations
HELD_OUT_EVERY = 3  # every third question of a kind is held out
UNANSWERABLE_PER_KIND = 10
KEYWORD_QUESTIONS = 36
# Made-up names are built from these syllables and kept only when no article contains them.
_SYLLABLES = ("tor", "va", "lune", "mer", "drav", "os", "quin", "bel", "thar", "ik", "sol", "ven", "grim", "ora")
_GIVEN_NAMES = ("Ilsa", "Tomas", "Perrin", "Ada", "Oskar", "Mirela", "Jonah", "Livia", "Bram", "Katya")
_THINGS = ("Bridge", "Cathedral", "Treaty", "Observatory", "Canal", "Academy", "Festival", "Railway", "Dam", "Museum")

_CITY = re.compile(r"^[^.]*? is (?:a|an|the) [^.]*?\b(?:city|town|capital|municipality)\b[^.]*? (?:of|in) (?:the )?"
                   r"(?:[a-z]+ )*([A-Z][a-z]+(?: [A-Z][a-z]+)?)")  # fmt: skip
_POPULATION = re.compile(
    r"population (?:of|was|is) (?:about |approximately |around |over |roughly )?(\d{1,3}(?:,\d{3})+)"
)
_PERSON = re.compile(r"^[^.()]*? (is|was) an? ([A-Z][a-z]+)(?:-born)?(?: [A-Z][a-z]+)* ([a-z]{4,})\b")
_FOUNDED = re.compile(
    r"\b(founded|established|built|opened|formed|completed|released|published|composed|written|painted|discovered"
    r"|signed|launched|introduced|created) in (?:[A-Z][a-z]+ )?(?:\d{1,2}, )?(\d{4})\b"
)
_WHAT = re.compile(
    r"^[^.()]*? (?:is|was) (?:an?|the) ((?:[a-z-]+ ){0,3}?[a-z-]{4,})(?: in| of| that| which| by| for| located|,|\.)"
)
_SKIP_OCCUPATIONS = {"born", "based", "former", "professional", "retired", "stage"}


@dataclass(frozen=True)
class Article:
    kind: str  # city, person or thing
    title: str
    first_answer: str  # what the opening question ("Where is X?") should answer
    second_answer: str  # what the second question ("How many people live there?") should answer
    pronoun: str  # he, she, it or there
    verb: str = ""  # founded, built, ... (things)


def articles(documents: list[Document]) -> Iterator[Article]:
    for document in documents:
        text, title = document.text, document.title
        if not text.startswith(title.split(" (")[0]) or len(title) > 40:
            continue  # the question names the article by its title: the text must be about that name
        city, population = _CITY.match(text), _POPULATION.search(text)
        if city and population and city.group(1) != title:
            yield Article("city", title, city.group(1), population.group(1), "there")
            continue
        person = _PERSON.match(text)
        he, she = len(re.findall(r"\b(?:he|his|him)\b", text, re.I)), len(re.findall(r"\b(?:she|her)\b", text, re.I))
        if person and person.group(3) not in _SKIP_OCCUPATIONS and max(he, she) >= 2:
            pronoun = "he" if he > she else "she"
            yield Article("person", title, person.group(3), person.group(2), pronoun, person.group(1))
            continue
        founded, what = _FOUNDED.search(text), _WHAT.match(text)
        if founded and what and not re.search(r"\b(?:he|she)\b", text[:300], re.I):
            yield Article("thing", title, what.group(1).split()[-1], founded.group(2), "it", founded.group(1))


def name(article: Article) -> str:
    """The title as a person would say it: "Utopia (book)" is asked about as "Utopia"."""
    return article.title.split(" (")[0]


# Per kind: the single-turn question, a conversation's opening, its follow-up (formatted with the article's fields).
_TEMPLATES = {
    "city": ("How many people live in {name}?", "Where is {name}?", "How many people live there?"),
    "person": ("What nationality {verb} {name}?", "Who {verb} {name}?", "What nationality {verb} {pronoun}?"),
    "thing": ("When was {name} {verb}?", "What is {name}?", "When was it {verb}?"),
}


def _ask(article: Article, which: int) -> str:
    return _TEMPLATES[article.kind][which].format(name=name(article), verb=article.verb, pronoun=article.pronoun)


def standalone(article: Article) -> str:
    return _ask(article, 0)


def opening(article: Article) -> str:
    return _ask(article, 1)


def follow_up(article: Article) -> str:
    return _ask(article, 2)


def _split(number: int) -> str:
    return "heldout" if number % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else "dev"


def _order(article: Article) -> str:
    return hashlib.sha256(article.title.encode()).hexdigest()  # a fixed shuffle, independent of corpus order


def made_up_names(corpus_text: str, count: int, salt: str) -> Iterator[str]:
    """Deterministic invented words of two or three syllables that the corpus does not contain."""
    seen: set[str] = set()
    number = 0
    while len(seen) < count:
        digest = hashlib.sha256(f"{salt}-{number}".encode()).digest()
        number += 1
        syllables = [_SYLLABLES[b % len(_SYLLABLES)] for b in digest[: 2 + digest[-1] % 2]]
        word = "".join(syllables).capitalize()
        if word not in seen and word.lower() not in corpus_text:
            seen.add(word)
            yield word


def unanswerable(documents: list[Document]) -> list[dict]:
    corpus_text = " ".join(f"{d.title} {d.text}" for d in documents).lower()
    questions = []
    for kind in ("city", "person", "thing"):
        for number, word in enumerate(made_up_names(corpus_text, UNANSWERABLE_PER_KIND, kind)):
            subject = {
                "city": word,
                "person": f"{_GIVEN_NAMES[number % len(_GIVEN_NAMES)]} {word}",
                "thing": f"the {word} {_THINGS[number % len(_THINGS)]}",
            }[kind]
            article = Article(kind, subject, "", "", "it", "was" if kind == "person" else "built")
            questions.append(
                {
                    "id": f"unanswerable-{kind}-{number}",
                    "kind": kind,
                    "split": _split(number),
                    "question": standalone(article),
                    "made_up": word,
                }
            )
    return questions


def keyword_set(found: dict[str, list[Article]], documents: list[Document]) -> list[dict]:
    """Cities asked about by their population, where no other article holds that number."""
    corpus = [d.text for d in documents]
    questions = []
    used = SINGLE_PER_KIND + CONVERSATIONS_PER_KIND[0]  # the cities of the other sets
    for article in sorted(found["city"], key=_order)[used:]:
        if sum(1 for text in corpus if article.second_answer in text) != 1:
            continue
        number = len(questions)
        questions.append(
            {
                "id": f"keyword-city-{number}",
                "kind": "city",
                "split": _split(number),
                "question": f"Which city has a population of {article.second_answer}?",
                "source": article.title,
                "answer_words": [name(article)],
            }
        )
        if len(questions) == KEYWORD_QUESTIONS:
            break
    return questions


def build() -> dict:
    found: dict[str, list[Article]] = {"city": [], "person": [], "thing": []}
    documents = list(read_wikipedia_summaries())
    for article in articles(documents):
        found[article.kind].append(article)
    single, conversations = [], []
    for kind, conversation_count in zip(found, CONVERSATIONS_PER_KIND, strict=True):
        chosen = sorted(found[kind], key=_order)
        for number, article in enumerate(chosen[:SINGLE_PER_KIND]):
            single.append(
                {
                    "id": f"single-{kind}-{number}",
                    "kind": kind,
                    "split": _split(number),
                    "question": standalone(article),
                    "source": article.title,
                    "answer_words": [article.second_answer],
                }
            )
        for number, article in enumerate(chosen[SINGLE_PER_KIND : SINGLE_PER_KIND + conversation_count]):
            conversations.append(
                {
                    "id": f"conversation-{kind}-{number}",
                    "kind": kind,
                    "split": _split(number),
                    "source": article.title,
                    "turns": [
                        {"question": opening(article), "answer_words": [article.first_answer]},
                        {"question": follow_up(article), "answer_words": [article.second_answer]},
                    ],
                }
            )
    return {
        "about": "Generated by tests/eval/make_questions.py from the default corpus (Wikipedia summaries, "
        "CC BY-SA). `source` is the article title; a passage id is '<title>#<n>'.",
        "counts": {kind: len(items) for kind, items in found.items()},
        "single": single,
        "conversations": conversations,
        "unanswerable": unanswerable(documents),
        "keyword": keyword_set(found, documents),
    }


def main() -> None:
    questions = build()
    OUT.write_text(json.dumps(questions, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(
        f"{len(questions['single'])} single-turn questions, {len(questions['conversations'])} conversations,"
        f" {len(questions['unanswerable'])} unanswerable questions, {len(questions['keyword'])} keyword questions"
    )
    print(f"articles of each kind in the corpus: {questions['counts']} -> {OUT}")


if __name__ == "__main__":
    main()
