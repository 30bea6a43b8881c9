"""Documents -> passages of about three sentences, the unit OpenChatKit's Wikipedia index retrieves.

Each passage's text starts with its document title, when it has one
("Zurich: It is in north-central Switzerland..."), so a
passage that says "It" or "The city" still embeds, and reads in a prompt, as being about its article.

A paged document (a PDF, as the client's reader sends it) has each page's text ended by a form feed, as
pdftotext writes them: its passages are cut page by page, so none straddles two pages, and each knows its page.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from nightcap.records import PAGE_END
from services.common.sentences import split_sentences
from services.retrieval.corpus import Document

SENTENCES_PER_PASSAGE = 3


@dataclass(frozen=True)
class Passage:
    """A retrievable piece of a document; ``id`` is stable across rebuilds, e.g. "Zurich#0". ``page`` is the
    page it is on, from 1, in a paged document; 0 in any other."""

    id: str
    doc_id: str
    title: str
    text: str
    source: str
    page: int = 0


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
    """Numbered through the whole document ("report.pdf#0", "#1", ...), page after page."""
    number = 0
    for page, text in pages_of(document.text):
        for chunk in group_sentences(split_sentences(text), per_passage, overlap):
            yield Passage(
                id=f"{document.id}#{number}",
                doc_id=document.id,
                title=document.title,
                text=f"{document.title}: {chunk}" if document.title else chunk,
                source=document.source,
                page=page,
            )
            number += 1


def pages_of(text: str) -> list[tuple[int, str]]:
    """(page, text) of each page, from 1, when the text is paged; else [(0, text)]."""
    if PAGE_END not in text:
        return [(0, text)]
    return list(enumerate(text.split(PAGE_END), 1))
