"""The passage store: passage records keyed by their faiss id, and the index's committed state, in one SQLite file.

SQLite is the commit point of an index (see index.py): one transaction changes the passages, records the
tombstones of removed ones and names the vector segments that match them, so the two can never disagree after a
crash.

The keyword index (``index/words.py``, tantivy, in the ``words/`` folder beside this file) follows each of the
store's transactions before the write returns, committed with the version SQLite counted for it; a store that
opens on a keyword index of another version reads its passages into it again. Nothing rebuilds it per query.
Staged passages are those of a background build read from the corpus but not embedded yet: keyword searches find
them at once, and the commit that adds a document's vectors removes its staged copy.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm import tqdm

from services.retrieval.chunker import Passage
from services.retrieval.index.words import WordIndex

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    row INTEGER PRIMARY KEY,  -- the passage's id in the faiss index; never reused, so ids survive deletes
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL,
    page INTEGER NOT NULL DEFAULT 0  -- from 1 in a paged document (a PDF); 0 in any other
);
CREATE INDEX IF NOT EXISTS passages_by_document ON passages (doc_id);
CREATE INDEX IF NOT EXISTS passages_by_title ON passages (title COLLATE NOCASE);
-- Tombstones: rows deleted from the store whose vectors are still in a segment file. Searches skip them;
-- compaction drops their vectors and then their tombstones.
CREATE TABLE IF NOT EXISTS dead_rows (row INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Staged passages: those of a background build read from the corpus but not embedded yet. Their rows are
# negative, so that the keyword index holds both kinds without their rows colliding.
_STAGED_SCHEMA = """
CREATE TABLE IF NOT EXISTS staged_passages (
    row INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    doc_id TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS staged_by_document ON staged_passages (doc_id);
"""
# What an older store kept its keyword index in (SQLite FTS5, kept by triggers); dropped when it is opened.
_OLD_KEYWORD_SCHEMA = """
DROP TRIGGER IF EXISTS passage_words_add;
DROP TRIGGER IF EXISTS passage_words_remove;
DROP TRIGGER IF EXISTS staged_words_add;
DROP TRIGGER IF EXISTS staged_words_remove;
DROP TABLE IF EXISTS passage_words;
DROP VIEW IF EXISTS keyword_passages;
"""
WORDS_FOLDER = "words"  # the keyword index's files, beside the store file
FILL_PROGRESS_FROM = 100_000  # passages: reading more than this many into the keyword index shows a progress bar


class StoreDamagedError(Exception):
    """SQLite could not read the store file."""


class PassageStore:
    """One connection shared by threads, serialised by a lock (reads are single-row lookups, writes are rare),
    and a second one for the passages of keyword hits: WAL lets it read beside the first, so a hybrid search's
    vector side fetches its passages while its keyword side does."""

    def __init__(self, connection: sqlite3.Connection, path: Path | None = None) -> None:
        self._connection = connection
        self._lock = threading.Lock()
        self._path = path
        self._words: sqlite3.Connection | None = None  # opened at the first keyword search
        self._words_lock = threading.Lock()
        found = connection.execute("SELECT value FROM state WHERE key = 'words'").fetchone()
        self._words_version = int(found[0]) if found else 0  # counted up by every change to the passages
        self.words = WordIndex(path.parent / WORDS_FOLDER if path is not None else None)
        if self.words.version != self._words_version:
            self._fill_words()

    @classmethod
    def open(cls, path: Path) -> PassageStore:
        """Opens (creating if needed) a store for reading and writing; damaged files raise StoreDamagedError."""
        try:
            connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # WAL lets reads go on during a write; synchronous=FULL makes each commit durable on return.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
            _add_page_column(connection)
            connection.executescript(_STAGED_SCHEMA + _OLD_KEYWORD_SCHEMA)
            problems = [row[0] for row in connection.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as error:
            raise StoreDamagedError(str(error)) from error
        if problems != ["ok"]:
            connection.close()
            raise StoreDamagedError("; ".join(problems[:3]))
        return cls(connection, path)

    def read_state(self) -> dict[str, Any] | None:
        with self._lock:
            found = self._connection.execute("SELECT value FROM state WHERE key = 'index'").fetchone()
        return json.loads(found[0]) if found else None

    def rows_of_documents(self, doc_ids: Iterable[str]) -> dict[str, list[int]]:
        doc_ids = list(doc_ids)
        found: dict[str, list[int]] = {}
        with self._lock:
            for start in range(0, len(doc_ids), 500):  # SQLite caps the number of ? placeholders
                chunk = doc_ids[start : start + 500]
                placeholders = ",".join("?" * len(chunk))
                for row, doc_id in self._connection.execute(
                    f"SELECT row, doc_id FROM passages WHERE doc_id IN ({placeholders})", chunk
                ):
                    found.setdefault(doc_id, []).append(row)
        return found

    def dead_rows(self) -> set[int]:
        with self._lock:
            return {row for (row,) in self._connection.execute("SELECT row FROM dead_rows")}

    def commit(
        self,
        state: dict[str, Any],
        added: Sequence[tuple[int, Passage]] = (),
        removed_rows: Sequence[int] = (),
        dead_rows: Sequence[int] = (),
        cleared_dead_rows: Sequence[int] = (),
    ) -> None:
        """One transaction: remove rows, add passages, mark rows dead (tombstones), forget tombstones whose
        vectors compaction dropped, record the new state."""
        records = [(row, p.id, p.doc_id, p.title, p.text, p.source, p.page) for row, p in added]
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                self._connection.executemany("DELETE FROM passages WHERE row = ?", [(r,) for r in removed_rows])
                self._connection.executemany("INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?, ?)", records)
                self._connection.executemany(  # their staged copies, now that they have vectors
                    "DELETE FROM staged_passages WHERE doc_id = ?", [(d,) for d in {p.doc_id for _, p in added}]
                )
                self._connection.executemany("INSERT INTO dead_rows VALUES (?)", [(r,) for r in dead_rows])
                self._connection.executemany("DELETE FROM dead_rows WHERE row = ?", [(r,) for r in cleared_dead_rows])
                self._connection.execute(
                    "INSERT OR REPLACE INTO state VALUES ('index', ?)", (json.dumps(state, sort_keys=True),)
                )
                version = self._count_words_version()
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._words_version = version
            self._apply_words(
                added=[(row, p.title, p.text) for row, p in added],
                removed_rows=removed_rows,
                unstaged_documents={p.doc_id for _, p in added},
            )

    def _apply_words(self, **change: Any) -> None:
        """Applies a change SQLite has committed to the keyword index. The commit stands whatever happens here;
        a keyword index that could not take it is read again from SQLite (and, failing that, at the next open,
        which sees its older version)."""
        try:
            self.words.apply(**change, version=self._words_version)
        except Exception:
            logger.exception("the keyword index could not take a commit; reading every passage into it again")
            try:
                self._fill_words(locked=True)
            except Exception:
                logger.exception("the keyword index could not be read again; it is read at the next open")

    def _count_words_version(self) -> int:
        """In a write transaction: the next version of the passages, recorded with the change it counts."""
        version = self._words_version + 1
        self._connection.execute("INSERT OR REPLACE INTO state VALUES ('words', ?)", (str(version),))
        return version

    def _fill_words(self, locked: bool = False) -> None:
        """Reads every passage, committed and staged, into the keyword index (one it does not agree with);
        ``locked``: the caller holds ``_lock``."""
        started = time.perf_counter()
        with contextlib.nullcontext() if locked else self._lock:
            total = self._connection.execute(
                "SELECT (SELECT COUNT(*) FROM passages) + (SELECT COUNT(*) FROM staged_passages)"
            ).fetchone()[0]
            records: Iterator[tuple[int, str, str, str | None]] = self._connection.execute(
                "SELECT row, title, text, NULL FROM passages"
                " UNION ALL SELECT row, title, text, doc_id FROM staged_passages"
            )
            progress = tqdm(
                records, total=total, desc="keyword index", unit="passage", disable=total < FILL_PROGRESS_FROM
            )
            count = self.words.fill(progress, self._words_version)
        if count:
            logger.info("keyword index: {} passages read into it in {:.1f} s", count, time.perf_counter() - started)

    def get(self, rows: Sequence[int]) -> list[Passage]:
        """The passages with these faiss ids, in the order asked; an unknown id is an error."""
        rows = [int(row) for row in rows]
        if not rows:
            return []
        placeholders = ",".join("?" * len(rows))
        with self._lock:
            found = self._connection.execute(
                f"SELECT row, id, doc_id, title, text, source, page FROM passages WHERE row IN ({placeholders})", rows
            ).fetchall()
        by_row = {row: Passage(*fields) for row, *fields in found}
        missing = [row for row in rows if row not in by_row]
        if missing:
            raise KeyError(f"passages {missing} are in the faiss index but not in the passage store")
        return [by_row[row] for row in rows]

    def passages_at(self, rows: Iterable[int]) -> dict[int, Passage]:
        """The passages of these rows, committed (rows from 0) and staged (negative), read in one transaction
        on the second connection; a row no passage has (removed since it was found) is left out."""
        rows = [int(row) for row in rows]
        if not rows:
            return {}
        passages: dict[int, Passage] = {}
        with self._words_lock:
            connection = self._words_connection()
            connection.execute("BEGIN")  # the passages from one state: a commit may move a staged one
            try:
                committed = [row for row in rows if row >= 0]
                staged = [row for row in rows if row < 0]
                for table, rows in (("passages", committed), ("staged_passages", staged)):
                    if rows:
                        placeholders = ",".join("?" * len(rows))
                        for row, *fields in connection.execute(
                            f"SELECT * FROM {table} WHERE row IN ({placeholders})", rows
                        ):
                            passages[row] = Passage(*fields)
            finally:
                connection.execute("COMMIT")
        return passages

    def _words_connection(self) -> sqlite3.Connection:
        """The keyword hits' connection (under ``_words_lock``); the main one for a store without a file."""
        if self._path is None:
            return self._connection
        if self._words is None:
            self._words = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            self._words.execute("PRAGMA query_only=1")
        return self._words

    def stage(self, passages: Sequence[Passage]) -> None:
        """Replaces the staged passages with these (one transaction): keyword searches find them from now on,
        and each is removed when a commit adds its document."""
        # rows -n..-1 in the passages' order, so a document's first passage is its lowest row, as in ``passages``
        records = [(row - len(passages), p.id, p.doc_id, p.title, p.text, p.source) for row, p in enumerate(passages)]
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                self._connection.execute("DELETE FROM staged_passages")
                self._connection.executemany("INSERT INTO staged_passages VALUES (?, ?, ?, ?, ?, ?)", records)
                version = self._count_words_version()
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._words_version = version
            self._apply_words(staged=[(row, title, text, doc_id) for row, _, doc_id, title, text, _ in records])

    def first_staged_passages_titled(self, title: str, limit: int) -> list[Passage]:
        """``first_passages_titled`` of the staged passages (documents a build has not embedded yet)."""
        qualified = title.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + " (%"
        with self._lock:
            found = self._connection.execute(
                "SELECT row, id, doc_id, title, text, source FROM staged_passages WHERE row IN"
                " (SELECT MIN(row) FROM staged_passages WHERE title = ? COLLATE NOCASE OR title LIKE ? ESCAPE '\\'"
                " GROUP BY doc_id) ORDER BY title = ? COLLATE NOCASE DESC, row LIMIT ?",
                (title, qualified, title, limit),
            ).fetchall()
        return [Passage(*fields) for _, *fields in found]

    def count_staged(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM staged_passages").fetchone()[0]

    def first_passages_titled(self, title: str, limit: int) -> list[Passage]:
        """The first passage of up to ``limit`` documents titled ``title`` (ASCII case
        ignored), or titled so with a qualifier in brackets ("Utopia (book)"): those titled exactly first."""
        qualified = title.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + " (%"
        with self._lock:
            found = self._connection.execute(
                "SELECT row, id, doc_id, title, text, source, page FROM passages WHERE row IN"
                " (SELECT MIN(row) FROM passages WHERE title = ? COLLATE NOCASE OR title LIKE ? ESCAPE '\\'"
                " GROUP BY doc_id)"  # a document's passages are stored in order: its lowest row is its first
                " ORDER BY title = ? COLLATE NOCASE DESC, row LIMIT ?",
                (title, qualified, title, limit),
            ).fetchall()
        return [Passage(*fields) for _, *fields in found]

    def list_documents(self, limit: int, after: str = "") -> list[tuple[str, str, str, int]]:
        """(id, title, source, passages) of up to ``limit`` documents whose id sorts after ``after``."""
        with self._lock:
            return self._connection.execute(
                "SELECT doc_id, MIN(title), MIN(source), COUNT(*) FROM passages WHERE doc_id > ?"
                " GROUP BY doc_id ORDER BY doc_id LIMIT ?",
                (after, limit),
            ).fetchall()

    def count_passages(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def count_documents(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(DISTINCT doc_id) FROM passages").fetchone()[0]

    def checkpoint(self) -> None:
        """Folds the write-ahead log into the main file, so a copied or measured folder is self-contained."""
        with self._lock:
            self._connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._words_lock:
            if self._words is not None:
                self._words.close()
                self._words = None
        with self._lock:
            self._connection.close()
            self.words.close()


def _add_page_column(connection: sqlite3.Connection) -> None:
    """Adds the page column to a store written before passages knew their page (their page reads 0)."""
    columns = {name for _, name, *_ in connection.execute("PRAGMA table_info(passages)")}
    if "page" not in columns:
        connection.execute("ALTER TABLE passages ADD COLUMN page INTEGER NOT NULL DEFAULT 0")
