"""The keyword index: a tantivy index of the passages' words, derived from the passage store, in the index's
``words/`` folder.

SQLite stays the one commit point. Every store transaction that changes passages also counts up a version in
SQLite; the store then applies the same change here under the same lock and commits it with that version (a
marker document), before the write returns. When the store opens and the versions differ (a crash between the
two commits, a store written before this index existed), the index is emptied and read again from SQLite. A
keyword hit is a row whose passage is read from SQLite: a row removed a moment earlier is left out. A process
that finds the folder's index held by another process's writer keeps its own copy in memory.

tantivy rather than SQLite's FTS5 (which nightcap used before): FTS5's bm25 scores every passage that matches
and counts each query word's passages by reading its whole posting list, on every query, so at 1M passages a
question took 11 ms p50 (43 ms mean) beside a 2.4 ms IVF search; tantivy keeps each word's passage count in its
dictionary and stops early (block-max WAND), 0.9 ms p50 with the same recall@3 (docs/retrieval.md).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import tantivy
from loguru import logger

# Words on which bm25 spends time and gains nothing; a question made only of them is searched with them. A short
# list on purpose: a name or a number is never one.
_STOPWORD_LIST = """a about an and are as at be been but by can could did do does for from had has have he her his how
i if in into is it its me my no not of on or our she so tell than that the their them then there these they this to
us was we were what when where which who whom why will with would you your"""
STOPWORDS = frozenset(_STOPWORD_LIST.split())
MAX_TERMS = 32  # a pasted page is searched by its first words, not by thousands of terms
# Passages a word may be in and still select them. A word that more passages hold ranks the passages the rarer
# words select and does not bring in passages of its own: asked "Is the brass valve in Lima?" of a catalogue
# of brass valves, the keyword side answers with Lima, not with every valve. Measured on FTS5 at 100k passages,
# bm25's source recall@3 was 0.570 with this rule against 0.593 with every word selecting; the eval's single,
# keyword and opening questions keep every source in the top 3 over the default corpus with it.
COMMON_PASSAGES = 2000
# A title's words count twice (the title is indexed twice before the text): the document named in the question
# outranks one that mentions it. One field rather than a title field boosted: bm25 then saturates a word's count
# over title and text together, as FTS5's bm25 with column weights did; a separately boosted short title field
# outranked a catalogue page naming the one valve asked about with a page titled "Valve ratings".
TITLE_COUNT = 2
_WORD = re.compile(r"\w+", re.UNICODE)
_ANALYZER = "nightcap_words"
# tantivy's indexing threads and each one's memory before it writes a segment (its minimum is 15 MB). Reading 300k
# passages into it took 11.6 s with one thread and 6.0 s with two on a 2-core machine.
_WRITER_THREADS = max(1, min(4, os.cpu_count() or 1))
_WRITER_HEAP = 64 * 2**20
_MARKER_ROW = -(2**62)  # the document that holds the store version the index reflects (it has no words)


def _analyzer() -> tantivy.TextAnalyzer:
    """Words split at anything not a letter or digit, lowercased, accents folded ("Zürich" finds "Zurich"),
    English-stemmed ("located" finds "location"); tokens over 100 bytes (a pasted hash, a URL) are dropped."""
    return (
        tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
        .filter(tantivy.Filter.remove_long(100))
        .filter(tantivy.Filter.lowercase())
        .filter(tantivy.Filter.ascii_fold())
        .filter(tantivy.Filter.stemmer("english"))
        .build()
    )


def _schema() -> tantivy.Schema:
    builder = tantivy.SchemaBuilder()
    builder.add_integer_field("row", stored=True, indexed=True)  # the store's row; staged passages' are negative
    builder.add_integer_field("version", stored=True)  # the marker's: the store version committed with it
    builder.add_integer_field("staged", indexed=True)  # 1 for a staged passage (no vectors yet), else 0
    builder.add_text_field("staged_doc", tokenizer_name="raw")  # a staged passage's document id, else empty
    # the title TITLE_COUNT times, then the text; word counts without positions (no phrase is searched for)
    builder.add_text_field("words", tokenizer_name=_ANALYZER, index_option="freq")
    return builder.build()


def query_terms(query: str, analyze: Callable[[str], list[str]]) -> list[str]:
    """The index terms ``query`` searches for, in its order: its words without stopwords (all of them when it
    has nothing else), at most ``MAX_TERMS``, each as the index holds it."""
    words = list(dict.fromkeys(word.casefold() for word in _WORD.findall(query)))
    kept = [word for word in words if word not in STOPWORDS] or words
    terms: list[str] = []
    for word in kept[:MAX_TERMS]:
        terms += analyze(word)  # one word may be several terms ("foo_bar")
    return list(dict.fromkeys(terms))


def selecting_terms(terms: Sequence[str], passages_holding: Callable[[str], int]) -> list[str]:
    """The terms that select passages: those at most ``COMMON_PASSAGES`` passages hold, or every term when none
    is (or all are) that rare. The others only rank what these select."""
    rare = [term for term in terms if passages_holding(term) <= COMMON_PASSAGES]
    return rare or list(terms)


class WordIndex:
    """The passages' words, committed and staged, in one tantivy index. Writes come from the store (under its
    lock); searches may run on any thread beside them, each on the index as of its start."""

    def __init__(self, folder: Path | None = None) -> None:
        """``folder``: where the index's files are (made if missing); None, or a folder another process is
        writing: in memory."""
        self._schema = _schema()
        self._analyzer = _analyzer()
        self._index, self._writer = self._open(folder)
        self.folder = folder if self._on_disk else None  # None: in memory
        self._write_lock = threading.Lock()
        self._searcher = self._index.searcher()

    def _open(self, folder: Path | None) -> tuple[tantivy.Index, tantivy.IndexWriter]:
        self._on_disk = False
        if folder is not None:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                try:
                    index = tantivy.Index(self._schema, path=str(folder), reuse=True)
                except ValueError:  # written with another schema (an older nightcap): it is read again anyway
                    logger.info("keyword index at {}: another layout; made again", folder)
                    shutil.rmtree(folder)
                    folder.mkdir()
                    index = tantivy.Index(self._schema, path=str(folder), reuse=True)
                writer = self._prepared(index)
                self._on_disk = True
                return index, writer
            except ValueError as error:  # "LockBusy": another process's writer holds it
                logger.info(
                    "keyword index at {} is held by another process ({}); this one keeps it in memory", folder, error
                )
        index = tantivy.Index(self._schema)
        return index, self._prepared(index)

    def _prepared(self, index: tantivy.Index) -> tantivy.IndexWriter:
        index.register_tokenizer(_ANALYZER, self._analyzer)
        # searches see a commit when _commit reloads, before the write returns. tantivy's default policy also
        # reloads on its own after each commit, and the two contend: 17-57 ms a reload, against 0.2 ms alone.
        index.config_reader(reload_policy="Manual")
        return index.writer(_WRITER_HEAP * _WRITER_THREADS, _WRITER_THREADS)

    @property
    def version(self) -> int | None:
        """The store version this index was last committed with; None for an index never committed."""
        found = self._searcher.search(tantivy.Query.term_query(self._schema, "row", _MARKER_ROW), 1, count=False)
        if not found.hits:
            return None
        return self._searcher.doc(found.hits[0][1])["version"][0]

    def analyze(self, text: str) -> list[str]:
        return self._analyzer.analyze(text)

    def fill(self, rows: Iterable[tuple[int, str, str, str | None]], version: int) -> int:
        """Replaces everything with (row, title, text, staged document id or None) records and commits them with
        ``version``; returns how many."""
        count = 0
        with self._write_lock:
            self._writer.delete_all_documents()
            for row, title, text, staged_doc in rows:
                self._add(row, title, text, staged_doc)
                count += 1
            self._commit(version)
        return count

    def apply(
        self,
        added: Sequence[tuple[int, str, str]] = (),
        removed_rows: Sequence[int] = (),
        unstaged_documents: Iterable[str] = (),
        staged: Sequence[tuple[int, str, str, str]] | None = None,
        *,
        version: int,
    ) -> None:
        """One store transaction, committed with its ``version``: rows removed, staged copies of these
        documents removed, passages added, and (``staged`` not None) every staged passage replaced by (row,
        title, text, document id) records."""
        with self._write_lock:
            # a delete applies to what was added before it: deletes first, so the passages added here stay
            for row in removed_rows:
                self._writer.delete_documents_by_term("row", int(row))
            for doc_id in unstaged_documents:
                self._writer.delete_documents_by_term("staged_doc", doc_id)
            if staged is not None:
                self._writer.delete_documents_by_term("staged", 1)
                for row, title, text, doc_id in staged:
                    self._add(row, title, text, doc_id)
            for row, title, text in added:
                self._add(row, title, text, None)
            self._commit(version)

    def _add(self, row: int, title: str, text: str, staged_doc: str | None) -> None:
        self._writer.add_document(
            tantivy.Document(
                row=int(row),
                staged=int(staged_doc is not None),
                staged_doc=staged_doc or "",
                words="\n".join([title] * TITLE_COUNT + [text]),
            )
        )

    def _commit(self, version: int) -> None:
        self._writer.delete_documents_by_term("row", _MARKER_ROW)
        self._writer.add_document(tantivy.Document(row=_MARKER_ROW, version=version, staged=0, staged_doc=""))
        self._writer.commit()
        self._index.reload()
        self._searcher = self._index.searcher()

    def search(self, query: str, limit: int) -> list[tuple[int, float]]:
        """(row, bm25 score) of up to ``limit`` passages holding the query's words, best first (higher is
        better); the words of ``selecting_terms`` select, all of them rank."""
        searcher = self._searcher
        terms = query_terms(query, self.analyze)
        if not terms or limit <= 0:
            return []
        # a word's passage count from tantivy's dictionary (removed passages count until a merge drops them:
        # this only chooses which words select)
        selecting = selecting_terms(terms, lambda term: searcher.doc_freq("words", term))
        ranking = [self._term(term) for term in terms]
        if len(selecting) == len(terms):
            query_ = tantivy.Query.boolean_query([(tantivy.Occur.Should, q) for q in ranking])
        else:  # passages holding a selecting term, ranked by every term's score
            required = tantivy.Query.boolean_query([(tantivy.Occur.Should, self._term(t)) for t in selecting])
            required = tantivy.Query.const_score_query(required, 0.0)
            query_ = tantivy.Query.boolean_query(
                [(tantivy.Occur.Must, required), *((tantivy.Occur.Should, q) for q in ranking)]
            )
        found = searcher.search(query_, limit, count=False).hits
        return [(searcher.doc(address)["row"][0], score) for score, address in found]

    def _term(self, term: str) -> tantivy.Query:
        return tantivy.Query.term_query(self._schema, "words", term, index_option="freq")

    def close(self) -> None:
        with self._write_lock:
            self._writer = None  # type: ignore[assignment]
