"""Documents -> passages of about three sentences, the unit OpenChatKit's Wikipedia index retrieves.

Each passage's text starts with its document title, when it has one
("Zurich: It is in north-central Switzerland..."), so a
passage that says "It" or "The city" still embeds, and reads in a prompt, as being about its article.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from services.retrieval.corpus import Document

SENTENCES_PER_PASSAGE = 3

# A sentence may end where ., ! or ? (plus closing quotes or brackets) is followed by space and a capital,
# digit or opening quote. Written by hand because the libraries that split well (nltk punkt, spaCy, pysbd)
# need downloaded data or are not among the dependencies, and summaries of encyclopedic prose need little.
_CANDIDATE_END = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
# Dotted letter runs are read as initials or abbreviations ("Arthur C. Clarke", "U.S.", "e.g."); a sentence that
# truly ends in one ("World War I.") stays joined to the next, which moves a passage boundary and loses nothing.
_INITIALS = re.compile(r"(?:[A-Za-z]\.)+")
# Abbreviations that are followed by a capitalised word far more often than they end a sentence.
_TITLES = ("mr", "mrs", "ms", "dr", "prof", "sr", "jr", "gen", "col", "lt", "sgt", "capt", "rev", "gov", "sen", "rep")
_MONTHS = ("jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec")
_OTHERS = ("st", "mt", "ft", "no", "vs", "etc", "approx", "ca", "cf", "fig", "vol", "inc", "ltd", "co", "corp")
_ABBREVIATIONS = frozenset((*_TITLES, *_MONTHS, *_OTHERS))


@dataclass(frozen=True)
class Passage:
    """A retrievable piece of a document; ``id`` is stable across rebuilds, e.g. "Zurich#0"."""

    id: str
    doc_id: str
    title: str
    text: str
    source: str


def split_sentences(text: str) -> list[str]:
    sentences = []
    start = 0
    for match in _CANDIDATE_END.finditer(text):
        if _ends_with_abbreviation(text[start : match.start() + 1]):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def _ends_with_abbreviation(candidate: str) -> bool:
    if not candidate.endswith("."):
        return False
    last_word = candidate.rsplit(maxsplit=1)[-1].lstrip("\"'“‘([")
    return bool(_INITIALS.fullmatch(last_word)) or last_word[:-1].lower() in _ABBREVIATIONS


def group_sentences(sentences: list[str], per_group: int = SENTENCES_PER_PASSAGE, overlap: int = 0) -> list[str]:
    """Groups of ``per_group`` sentences, each starting ``per_group - overlap`` after the previous one.

    No group is only overlap: the last one holds what is left after the previous group's end."""
    if not 0 <= overlap < per_group:
        raise ValueError(f"overlap must be at least 0 and less than the {per_group} sentences per passage")
    step = per_group - overlap
    groups = []
    for start in range(0, len(sentences), step):
        groups.append(" ".join(sentences[start : start + per_group]))
        if start + per_group >= len(sentences):
            break
    return groups


def passages_of(document: Document, per_passage: int = SENTENCES_PER_PASSAGE, overlap: int = 0) -> Iterator[Passage]:
    chunks = group_sentences(split_sentences(document.text), per_passage, overlap)
    for number, chunk in enumerate(chunks):
        yield Passage(
            id=f"{document.id}#{number}",
            doc_id=document.id,
            title=document.title,
            text=f"{document.title}: {chunk}" if document.title else chunk,
            source=document.source,
        )
