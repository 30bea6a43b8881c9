"""A question as an FTS5 query: its words, quoted (so no user text is FTS5 syntax), joined by OR (so a
natural-language question matches passages that hold some of its words; bm25 ranks those holding the rare ones
first), without the words nearly every English passage holds."""

from __future__ import annotations

import re

# Words on which bm25 spends time (they match most passages) and gains nothing; a question made only of them is
# searched with them. A short list on purpose: a name or a number is never one.
_STOPWORD_LIST = """a about an and are as at be been but by can could did do does for from had has have he her his how
i if in into is it its me my no not of on or our she so tell than that the their them then there these they this to
us was we were what when where which who whom why will with would you your"""
STOPWORDS = frozenset(_STOPWORD_LIST.split())
MAX_TERMS = 32  # a pasted page is searched by its first words, not by thousands of OR terms
_WORD = re.compile(r"\w+", re.UNICODE)


def match_expression(query: str) -> str | None:
    """The FTS5 MATCH expression for ``query``, or None when it holds no word to search for."""
    words = list(dict.fromkeys(word.casefold() for word in _WORD.findall(query)))
    kept = [word for word in words if word not in STOPWORDS] or words
    if not kept:
        return None
    return " OR ".join('"' + word.replace('"', '""') + '"' for word in kept[:MAX_TERMS])
