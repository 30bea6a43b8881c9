"""The passage store: passage records keyed by their faiss id, in one SQLite file beside the index."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

from services.retrieval.chunker import Passage

_SCHEMA = """
CREATE TABLE passages (
    row INTEGER PRIMARY KEY,  -- the passage's id in the faiss index
    id TEXT NOT NULL UNIQUE,
    doc_id TEXT NOT NULL,
    title TEXT NOT NULL,
    text TEXT NOT NULL,
    source TEXT NOT NULL
)
"""


class PassageStore:
    """Writable while an index is built, read-only once it is served; one connection shared by threads."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._lock = threading.Lock()

    @classmethod
    def create(cls, path: Path) -> PassageStore:
        connection = sqlite3.connect(path, check_same_thread=False)
        connection.execute(_SCHEMA)
        return cls(connection)

    @classmethod
    def open_readonly(cls, path: Path) -> PassageStore:
        # immutable=1: a finished index never changes, so SQLite may skip locking and journal files.
        uri = f"{path.resolve().as_uri()}?mode=ro&immutable=1"
        return cls(sqlite3.connect(uri, uri=True, check_same_thread=False))

    def add(self, rows: Sequence[int], passages: Sequence[Passage]) -> None:
        records = [(row, p.id, p.doc_id, p.title, p.text, p.source) for row, p in zip(rows, passages, strict=True)]
        with self._lock:
            self._connection.executemany("INSERT INTO passages VALUES (?, ?, ?, ?, ?, ?)", records)

    def get(self, rows: Sequence[int]) -> list[Passage]:
        """The passages with these faiss ids, in the order asked; an unknown id is an error."""
        rows = [int(row) for row in rows]
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

    def count_passages(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(*) FROM passages").fetchone()[0]

    def count_documents(self) -> int:
        with self._lock:
            return self._connection.execute("SELECT COUNT(DISTINCT doc_id) FROM passages").fetchone()[0]

    def commit(self) -> None:
        with self._lock:
            self._connection.commit()

    def close(self) -> None:
        with self._lock:
            self._connection.close()
