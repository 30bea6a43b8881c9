"""Sentences of encyclopedic prose: the unit the retrieval service groups into passages and the orchestrator
cuts passages to. One splitter for both, so a passage's sentences are the ones it was built from."""

from __future__ import annotations

import re

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
