"""A question as an FTS5 query: its words, quoted (so no user text is FTS5 syntax), joined by OR (so a
natural-language question matches passages that hold some of its words; bm25 ranks those holding the rare ones
first), without the words nearly every English passage holds.

A word that many passages hold only ranks, it does not select: the query is ``(rare words) AND (every word)``,
so bm25 scores the passages holding one of the question's rare words, each still ranked by all of them. bm25
costs a lookup per matching passage, and an OR of "city", "family" or "world" matches a large part of an index.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Words on which bm25 spends time (they match most passages) and gains nothing; a question made only of them is
# searched with them. A short list on purpose: a name or a number is never one.
_STOPWORD_LIST = """a about an and are as at be been but by can could did do does for from had has have he her his how
i if in into is it its me my no not of on or our she so tell than that the their them then there these they this to
us was we were what when where which who whom why will with would you your"""
STOPWORDS = frozenset(_STOPWORD_LIST.split())
MAX_TERMS = 32  # a pasted page is searched by its first words, not by thousands of OR terms
# Passages a word may match and still select them. At 100k passages (the bench's texts and 300 of its questions,
# on a loaded 2-core machine), keyword search p50 went from 11.0 ms with every word selecting to 4.1 ms (the
# counting included) and bm25's source recall@3 from 0.593 to 0.570; 5000: 6.9 ms, 0.590; 500: 2.4 ms, 0.560;
# dropping common words instead of ranking by them lost more (0.500 at 2% of the passages). The eval's single,
# keyword and opening questions keep every source in the top 3 over the default corpus even at 200. Counted in
# passages, not as a share of the index, because passages are what bm25 pays for (and counting stops there).
COMMON_PASSAGES = 2000
_WORD = re.compile(r"\w+", re.UNICODE)


def match_expression(query: str, matches: Callable[[str, int], int] | None = None) -> str | None:
    """The FTS5 MATCH expression for ``query``, or None when it holds no word to search for. ``matches(phrase,
    at_most)``: how many passages a quoted word matches, counted up to ``at_most``; without it every word selects."""
    words = list(dict.fromkeys(word.casefold() for word in _WORD.findall(query)))
    kept = [word for word in words if word not in STOPWORDS] or words
    if not kept:
        return None
    phrases = ['"' + word.replace('"', '""') + '"' for word in kept[:MAX_TERMS]]
    rare = [p for p in phrases if matches is None or matches(p, COMMON_PASSAGES + 1) <= COMMON_PASSAGES]
    if not rare or len(rare) == len(phrases):  # nothing to select by, or nothing that only ranks
        return " OR ".join(phrases)
    return f"({' OR '.join(rare)}) AND ({' OR '.join(phrases)})"
