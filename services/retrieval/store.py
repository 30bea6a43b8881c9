"""The passage store: passage records keyed by their faiss id, and the index's committed state, in one SQLite file.

SQLite is the commit point of an index (see index.py): one transaction changes the passages, records the
tombstones of removed ones and names the vector segments that match them, so the two can never disagree after a
crash.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from services.retrieval.chunker import Passage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS passages (
    row INTEGER PRIMARY KEY,  -- the passage's id in the faiss index; never reused, so ids survive deletes
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS passages_by_document ON passages (doc_id);
CREATE INDEX IF NOT EXISTS passages_by_title ON passages (title COLLATE NOCASE);
-- Tombstones: rows deleted from the store whose vectors are still in a segment file. Searches skip them;
-- compaction drops their vectors and then their tombstones.
CREATE TABLE IF NOT EXISTS dead_rows (row INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class StoreDamagedError(Exception):
    """SQLite could not read the store file."""


class PassageStore:
    """One connection shared by threads, serialised by a lock (reads are single-row lookups, writes are rare)."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path) -> PassageStore:
        """Opens (creating if needed) a store for reading and writing; damaged files raise StoreDamagedError."""
        try:
            connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            # WAL lets reads go on during a write; synchronous=FULL makes each commit durable on return.
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=FULL")
            connection.executescript(_SCHEMA)
            problems = [row[0] for row in connection.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as error:
            raise StoreDamagedError(str(error)) from error
        if problems != ["ok"]:
            connection.close()
            raise StoreDamagedError("; ".join(problems[:3]))
        return cls(connection)

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
        records = [(row, p.id, p.doc_id, p.title, p.text, p.source) for row, p in added]
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                self._connection.executemany("DELETE FROM passages WHERE row = ?", [(r,) for r in removed_rows])
                self._connection.executemany("INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?)", records)
                self._connection.executemany("INSERT INTO dead_rows VALUES (?)", [(r,) for r in dead_rows])
                self._connection.executemany("DELETE FROM dead_rows WHERE row = ?", [(r,) for r in cleared_dead_rows])
                self._connection.execute(
                    "INSERT OR REPLACE INTO state VALUES ('index', ?)", (json.dumps(state, sort_keys=True),)
                )
                self._connection.execute("COMMIT")
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise

    def get(self, rows: Sequence[int]) -> list[Passage]:
        """The passages with these faiss ids, in the order asked; an unknown id is an error."""
        rows = [int(row) for row in rows]
        if not rows:
            return []
        placeholders = ",".join("?" * len(rows))
        with self._lock:
            found = self._connection.execute(
                f"SELECT row, id, doc_id, title, text, source FROM passages WHERE row IN ({placeholders})", rows
            ).fetchall()
        by_row = {row: Passage(*fields) for row, *fields in found}
        missing = [row for row in rows if row not in by_row]
        if missing:
            raise KeyError(f"passages {missing} are in the faiss index but not in the passage store")
        return [by_row[row] for row in rows]

    def first_passages_titled(self, title: str, limit: int) -> list[Passage]:
        """The first passage of up to ``limit`` documents titled ``title`` (ASCII case
        ignored), or titled so with a qualifier in brackets ("Utopia (book)"): those titled exactly first."""
        qualified = title.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + " (%"
        with self._lock:
            found = self._connection.execute(
                "SELECT row, id, doc_id, title, text, source FROM passages WHERE row IN"
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
        with self._lock:
            self._connection.close()
