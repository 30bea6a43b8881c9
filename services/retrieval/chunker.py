"""Documents -> passages of about three sentences, the unit OpenChatKit's Wikipedia index retrieves.

Each passage's text starts with its document title, when it has one
("Zurich: It is in north-central Switzerland..."), so a
passage that says "It" or "The city" still embeds, and reads in a prompt, as being about its article.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from services.common.sentences import split_sentences
from services.retrieval.corpus import Document

SENTENCES_PER_PASSAGE = 3


@dataclass(frozen=True)
class Passage:
    """A retrievable piece of a document; ``id`` is stable across rebuilds, e.g. "Zurich#0"."""

    id: str
    doc_id: str
    title: str
    text: str
    source: str


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
