"""How retrieved passages are put before the model so that its answer can be trusted: which passages sit next to
the question, which of their sentences are kept, what the model is told to do when they do not hold the answer,
and which passages its answer cites.

Pure functions over plain records; the orchestrator calls the backends (the retrieval service's embedder for
the sentence scores) and passes their answers in, with the served model's token count for the budget.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from nightcap.records import Passage
from services.common.sentences import split_sentences
from services.orchestrator.prompts import ContextPassage, ContextStyle, Turn

# A sentence that opens by pointing back ("It has ...", "The city ...") reads wrong without the one before it.
_POINTS_BACK = re.compile(
    r"^(?:it|its|he|his|she|her|they|their|them|this|these|those|that|there|the (?:city|town|country|capital|"
    r"company|band|film|book|album|river|region|state|building|church|group|party|team|species|area|island))\b",
    re.IGNORECASE,
)
# "What is X?", "Who was X?", "Where is X?", "Tell me about X": a question a document's opening sentence answers.
_ASKS_WHAT = re.compile(
    r"^\s*(?:(?:what|who|where)(?:\s+|'s\s*|’s\s*)(?:(?:is|are|was|were)\s+)?|tell me about\s+|describe\s+)"
    r"(?P<subject>.+?)[\s?.!]*$",
    re.IGNORECASE,
)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)
# subjects that point back at the conversation instead of naming something
_POINTING = re.compile(r"^(?:it|this|that|these|those|there|here|he|she|they|him|her|them|its|his|their|one)$", re.I)
_CITATION = re.compile(r"\[(\d{1,3}(?:\s*,\s*\d{1,3})*)\]")
NO_SOURCE_REPLY = "The documents do not say"
_WORD = re.compile(r"[\w’'-]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_LETTERS = re.compile(r"[^\W\d_]+")
# Words that say what kind of answer a question wants, or join it, rather than what it is about: a passage gives the
# answer without repeating them. With each `make eval` single question's own source passages, "many", "people",
# "live" or "nationality" were missing for 38 of 60 questions, every one of them answerable.
_ASKING_LIST = """
a about above after again against all also am an and any are as at be been before being below between both but by can
could did do does doing done down during each few for from further get gets got had has have having he her here hers
him his how i if in into is it its itself just me more most my no nor not now of off on once only or other our out
over own same she should so some such than that the their theirs them then there these they this those through to
too under until up very was we were what when where which while who whom whose why will with would you your
hello thanks thank please don doesn didn isn wasn aren weren won
tell know say said give show describe explain mean means meaning called call name named names known
many much number numbers amount people person persons live lives lived living population inhabitants resident
residents nationality citizen citizenship country countries city cities town towns place places located location
situated lie lies found find born birth died die dies death old age year years date dates day century time times
long tall high big large small largest biggest smallest oldest newest first last main kind type sort part
longer taller higher lower bigger larger smaller older newer better best worse
built build founded establish established publish published written write wrote released release introduced
created create formed completed discovered discover invent invented inventor founder made make happened happen
start started begin began end ended use used work works worked famous like look looks speak spoken language languages
"""
_ASKING = frozenset(_ASKING_LIST.split())


class PromptStyle(str, enum.Enum):
    GROUNDED = "grounded"
    PLAIN = "plain"

    def grounding(self, cut: bool, context_tokens: int, min_score: float, titles: bool = True) -> Grounding:
        if self is PromptStyle.PLAIN:
            return Grounding.plain(min_score)
        return Grounding(cut=cut, context_tokens=context_tokens, min_score=min_score, titles=titles)


@dataclass(frozen=True)
class Grounding:
    """The orchestrator's grounding settings (its --prompt, --context-cut, --context-tokens, --min-score and
    --title-lookup flags).

    ``plain`` is the prompt before these settings existed (passages unnumbered, given once, whole): the
    baseline `make eval` measures the grounded prompt against in the same run."""

    numbered: bool = True  # passages numbered [1], [2], ...: the answer's [n] markers cite them
    cite: bool = True  # the model is asked to cite the passage it uses
    admit: bool = False  # the model is asked to say ADMISSION when the passages do not hold the answer
    names: bool = True  # the question names something no given passage mentions: the reply says no source matched
    repeat_earlier: bool = True  # an earlier turn's passage that is again among the best hits sits by the question
    cut: bool = True  # keep the sentences that answer the query, within context_tokens
    # The new turn's passages, in the served model's tokens, when cut: about two sentences. With 48 or 64 a second
    # passage about the same subject came in, and SmolLM2-135M answered "Where is Zurich?" from its "hub for
    # railways" sentence instead of the "largest city in Switzerland" one before it.
    context_tokens: int = 32
    min_score: float = 0.0  # passages scoring below this are not given; none left: the reply says no source matched
    # "What is X?" also looks up the document titled X; when found, its first passages are given alone
    titles: bool = True

    @classmethod
    def plain(cls, min_score: float = 0.0) -> Grounding:
        return cls(
            numbered=False, cite=False, repeat_earlier=False, cut=False, names=False, min_score=min_score, titles=False
        )

    @property
    def style(self) -> ContextStyle:
        return ContextStyle(self.numbered, self.numbered and self.cite, self.admit)


@dataclass(frozen=True)
class Grounded:
    """What a new turn is given: its passages (best first, for the prompt to fit), or the answer it gets
    without the model."""

    passages: list[Passage]
    reply: str = ""  # the answer, given without the model: no passage is good enough
    notice: str = ""  # why there is a reply; "" keeps the search's notice


def ground(
    grounding: Grounding,
    message: str,
    history: Sequence[Turn],
    ranked: Sequence[Passage],
    k: int,
    searched: bool,
    count: Callable[[str], int],
    score: Callable[[list[str]], np.ndarray | None],
    building: str = "",
) -> Grounded:
    """The search's passages (``ranked``, best first) that the new ``message`` is given, in four choices:

    - below ``grounding.min_score`` a passage is not given, and when none is left the reply says no source matched;
    - when the message names something none of the first ``k`` mentions (``grounding.names``), none is given and
      the reply says so (or, with no passages at all, that the search found none: a model asked without them makes
      up an answer);
    - when the title lookup found the document the question names (``Passage.titled``), its passages alone;
    - with ``grounding.cut``, the first ``k`` (without those the kept ``history`` holds, unless
      ``grounding.repeat_earlier``) cut to their best sentences within ``grounding.context_tokens``.

    ``searched``: the search ran (it may have found nothing). ``count``: tokens of a text in the served model.
    ``score``: each sentence's score against the searches (the sentences as ``"Title: sentence"``), or None when
    they cannot be scored: the passages are then given whole. ``building``: how far the index build is, when one
    runs."""
    given = [p for p in ranked if grounding.min_score <= 0 or p.score >= grounding.min_score]
    reply = notice = ""
    if grounding.min_score > 0 and not given and searched:
        reply = no_source_reply(ranked[0].score if ranked else None, grounding.min_score)
        notice = f"no passage scored above --min-score {grounding.min_score:g}; answered that no source matched"
    elif grounding.names and (given or searched) and (missing := missing_names(message, given[:k])):
        # With no passages at all (an empty index, or one still filling), the model asked without them makes up
        # an answer ("Zurkle is a city nestled in the heart of Switzerland").
        if given:
            reply = no_name_reply(missing)
            notice = f"no passage found mentions {', '.join(missing)}; answered that no source matched"
        else:
            reply = no_source_reply(None, grounding.min_score, building)
            notice = "retrieval found no passages; answered that no source matched"
        given = []
    if any(p.titled for p in given[:k]):  # only a search sent a title (--title-lookup) marks any
        # "What is Ulaanbaatar?" with its article's lead and an unrelated second hit ("Anansi is a character
        # ..."): SmolLM2-135M answered from the last one. The document the question names answers it alone
        # (`make eval` openings 35 to 36 of 40, follow-ups 26 to 27, no set lower).
        given = [p for p in given[:k] if p.titled]
    if given and grounding.cut:
        if not grounding.repeat_earlier:  # the passages the kept history does not hold, as fit_prompt picks
            held = {passage_key(p) for turn in history for p in turn.context}
            given = [p for p in given if passage_key(context_of(p)) not in held]
        given = cut_to_sentences(given[:k], grounding.context_tokens, count, score, asked_subject(message))
    return Grounded(given, reply, notice)


def cut_to_sentences(
    passages: list[Passage],
    budget: int,
    count: Callable[[str], int],
    score: Callable[[list[str]], np.ndarray | None],
    subject: str,
) -> list[Passage]:
    """The passages cut to their sentences that best answer the searches (``score``: as the search mix scores
    passages), within ``budget`` tokens; whole when they cannot be scored. ``subject``: what a "What is X?"
    question asks about; the opening sentence of the document titled so is kept first."""
    sentences = sentences_of(passages)
    if len(sentences) <= len(passages):  # one sentence each: nothing to cut
        return passages
    titled = [f"{passages[s.passage].title}: {s.text}" if passages[s.passage].title else s.text for s in sentences]
    scores = score(titled)
    if scores is None:
        return passages
    first = leads(passages, sentences, subject)
    return cut_passages(passages, sentences, scores, budget, count, first)


def context_of(passage: Passage) -> ContextPassage:
    """The passage as a prompt turn carries it."""
    return ContextPassage(passage.title, passage.text, passage.source, passage.id)


def passage_key(passage: ContextPassage) -> tuple[str, ...]:
    """Which passage this is, to tell whether a turn already holds it."""
    # by id when the client sent ids back: a passage cut to other sentences for another turn is still the same
    return (passage.id,) if passage.id else (passage.title, passage.text)


@dataclass(frozen=True)
class Sentence:
    passage: int  # index into the passages being cut
    position: int  # the sentence's place in its passage
    text: str


def sentences_of(passages: Sequence[Passage]) -> list[Sentence]:
    """Every sentence of the passages, each passage's leading "Title: " left out (it is shown once per passage)."""
    found = []
    for number, passage in enumerate(passages):
        body = _body(passage)
        for position, text in enumerate(split_sentences(body)):
            found.append(Sentence(number, position, text))
    return found


def asked_about(message: str) -> str:
    """The name a "What is X?" / "Who was X?" / "Where is X?" / "Tell me about X" question asks about, as
    written: the document title the retrieval search looks up. "" for any other question, and for a subject
    that names nothing: no capital letter ("What is the capital?" after "Where is France?" does not ask for the
    article titled "Capital") or a pronoun ("Where is it?")."""
    subject = _subject(message)
    if not any(c.isupper() for c in subject) or _POINTING.match(_ARTICLE.sub("", subject)):
        return ""
    return subject


def asked_subject(message: str) -> str:
    """What such a question asks about, folded as `leads` compares it with titles ("" for any other)."""
    return _folded(_subject(message)).strip()


def _subject(message: str) -> str:
    match = _ASKS_WHAT.match(message)
    return match.group("subject").strip() if match else ""


def leads(passages: Sequence[Passage], sentences: Sequence[Sentence], subject: str) -> list[int]:
    """The sentences that open a document titled ``subject``: the first sentence of its first passage (chunk
    ids end in "#0"). An encyclopedia's or a manual's opening sentence says what its subject is; ranked against
    "What is Utopia?", it loses to a sentence that repeats the question's words ("A utopia is an imagined
    community ...") while the lead ("Utopia is a work of fiction ... by Thomas More") holds the answer."""
    if not subject:
        return []
    # the retrieval service looked the title up (``titled``: "The Four Seasons (Vivaldi)" for "The Four Seasons")
    titled = [n for n, p in enumerate(passages) if p.titled]
    if titled:
        return [i for n in titled for i, s in enumerate(sentences) if s.passage == n and s.position == 0]
    firsts = {number: _folded(p.title).strip() for number, p in enumerate(passages) if p.id.endswith("#0") and p.title}
    # "What is The Metamorphosis?" names the novella, not the biology article titled "Metamorphosis"; "What is
    # the Eiffel Tower?" names the one titled "Eiffel Tower": the title as asked first, then without its article.
    openers = {n for n, title in firsts.items() if title == subject}
    if not openers:
        bare = _ARTICLE.sub("", subject)
        openers = {n for n, title in firsts.items() if _ARTICLE.sub("", title) == bare}
    return [i for i, s in enumerate(sentences) if s.passage in openers and s.position == 0]


def cut_passages(
    passages: Sequence[Passage],
    sentences: Sequence[Sentence],
    scores: np.ndarray,
    budget: int,
    count: Callable[[str], int],
    first: Sequence[int] = (),
) -> list[Passage]:
    """The passages with only their best sentences, best passage first, within ``budget`` tokens.

    Sentences are taken best first; one that points back ("It has ...") brings the sentence before it, just
    after it. Each passage shows its kept sentences best first, and passages are ordered by their best sentence:
    a small model copies what comes first (SmolLM2-135M, asked for a population, gave the first sentence of a
    passage that holds it in its third, and ran out of tokens before the number). With the needed neighbour put
    before its sentence, it copied the neighbour ("Shanghai is a provincial-level municipality ...") and ran out
    of tokens again; put after, the answer comes first and the neighbour still says what "It" is (`make eval`'s
    first 24 questions per set: single 0.75 to 0.79, follow-ups 0.58 to 0.67, openings 0.83 both). The best
    sentence is always kept, whatever the budget; a passage left without sentences is dropped.

    ``first``: sentences taken before the ranked ones, in that order (the `leads` of a "What is X?" question)."""
    if not sentences:
        return list(passages)
    by_place = {(s.passage, s.position): i for i, s in enumerate(sentences)}
    kept: dict[int, None] = {}  # in the order taken: best first, a needed neighbour just after its sentence
    used = 0
    leading = set(first)
    order = [*first, *(int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in leading)]
    for best in order:
        wanted = [best]
        sentence = sentences[best]
        before = by_place.get((sentence.passage, sentence.position - 1))
        if before is not None and _POINTS_BACK.match(sentence.text):
            wanted.append(before)
        new = [i for i in wanted if i not in kept]
        cost = sum(count(sentences[i].text) for i in new)
        if kept and used + cost > budget:
            continue
        kept.update(dict.fromkeys(new))
        used += cost
    best_score: dict[int, float] = {}
    for i in kept:
        number = sentences[i].passage
        score = np.inf if i in leading else float(scores[i])
        best_score[number] = max(best_score.get(number, -np.inf), score)
    cut = []
    for number in sorted(best_score, key=lambda n: -best_score[n]):
        chosen = [i for i in kept if sentences[i].passage == number]
        passage = passages[number]
        text = " ".join(sentences[i].text for i in chosen)
        cut.append(replace(passage, text=f"{passage.title}: {text}" if passage.title else text))
    return cut


def weighted_scores(query_vectors: np.ndarray, weights: Sequence[float], sentence_vectors: np.ndarray) -> np.ndarray:
    """Each sentence's weighted mean similarity to the queries: the score the search mix gives a passage."""
    weight = np.asarray(weights, dtype=np.float32)[:, None]
    return (weight * (query_vectors @ sentence_vectors.T)).sum(axis=0) / weight.sum()


def cited(answer: str, sources: int) -> list[int]:
    """The passage numbers the answer cites as [n] (or [n, m]), first cited first; numbers past ``sources``
    (the model making one up) are left out."""
    numbers: list[int] = []
    for match in _CITATION.finditer(answer):
        for part in match.group(1).split(","):
            number = int(part)
            if 1 <= number <= sources and number not in numbers:
                numbers.append(number)
    return numbers


# Content words the passages must all lack before they count: one is often the question's own wording of what a
# passage says otherwise ("What colour did she paint it?" of "she painted it violet"); two or more (an office's
# "phone", "tourist", "office"; "post", "online") mean another subject. Names and numbers count alone.
MISSING_TERMS = 2


def missing_names(message: str, passages: Sequence[Passage]) -> list[str]:
    """What the message asks about that none of the passages mentions, in the message's order: its names
    (capitalised words of three letters or more, other than a sentence's first), its numbers ("1687",
    "724,290", the 2234 of "V-2234") and its other content words (`missing_terms`) when at least
    ``MISSING_TERMS`` of them are missing, compared without case or accents.

    A search always returns its nearest passages, and a small model reads them as the answer: asked about
    "Torvalune", it reports another city's population; asked for an office's phone number, it gives four digits.
    A name, a number or a term the passages never mention means they are about something else, whatever their
    score."""
    text = _folded(" ".join(f"{p.title} {p.text}" for p in passages))
    missing = []
    for sentence in re.split(r"(?<=[.!?])\s+", message.strip()):
        for word in _WORD.findall(sentence)[1:]:
            word = word.removesuffix("'s").removesuffix("’s")
            if len(word) >= 3 and word[0].isupper() and _folded(word) not in text and word not in missing:
                missing.append(word)
    held = set(_NUMBER.findall(text))
    missing += [number for number in dict.fromkeys(_NUMBER.findall(message)) if number not in held]
    terms = missing_terms(message, text)
    if len(terms) >= MISSING_TERMS:
        missing += terms
    return sorted(dict.fromkeys(missing), key=lambda word: message.find(word))


def missing_terms(message: str, text: str) -> list[str]:
    """The message's content words (lowercase, or a sentence's first) that ``text`` (folded) holds in no form: a
    word is found when a word of the text starts with its stem (its first five letters; a shorter word less a
    final s, e or d, so "phone" finds "phones" and "observe" finds "observed"). Words that only say what kind of
    answer is wanted (`_ASKING`) are not content: a passage answers "How many people live in Amsterdam?" with "a
    population of 941,873"."""
    words = set(_LETTERS.findall(text))
    missing = []
    for sentence in re.split(r"(?<=[.!?])\s+", message.strip()):
        for position, word in enumerate(_LETTERS.findall(sentence)):
            folded = _folded(word)
            if len(folded) < 3 or folded in _ASKING or (position > 0 and word[0].isupper()):  # names: above
                continue
            stem = folded[:5] if len(folded) > 5 else (folded.rstrip("sed") or folded)
            if not any(found.startswith(stem) for found in words) and word not in missing:
                missing.append(word)
    return missing


def no_name_reply(missing: list[str]) -> str:
    return f"{NO_SOURCE_REPLY}: none of the passages found mentions {', '.join(missing)}."


def _folded(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def no_source_reply(best: float | None, floor: float, building: str = "") -> str:
    """``building``: how far the index's build is, when one is running (an index still filling finds nothing)."""
    if best is None:
        return f"{NO_SOURCE_REPLY}: the search found no passages{f' ({building})' if building else ''}."
    return f"{NO_SOURCE_REPLY}: no passage matches closely enough (the best scored {best:.2f}, below {floor:.2f})."


def _body(passage: Passage) -> str:
    prefix = f"{passage.title}: "
    return passage.text[len(prefix) :] if passage.title and passage.text.startswith(prefix) else passage.text
