"""A passage index on disk: faiss vectors, the passage store and a manifest, written atomically.

Layout of ``var/indexes/<name>/``: ``index.faiss`` (inner product over normalized vectors, ids = store rows),
``passages.sqlite`` (the PassageStore) and ``manifest.json`` (what built it, the counts, each file's size and
sha256). A build writes into a hidden sibling folder, writes the manifest last, fsyncs and renames the folder
into place, so a folder without a manifest, or whose files disagree with it, is an unfinished or damaged
build and is refused by ``load_index``, never served as if complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

import faiss
import numpy as np

from services.common.errors import FailedPrecondition
from services.common.paths import VarLayout
from services.retrieval.chunker import Passage
from services.retrieval.store import PassageStore

DEFAULT_INDEX_NAME = "wikipedia-en"
INDEX_FACTORY = "IDMap2,Flat"
FORMAT_VERSION = 1
FAISS_FILE = "index.faiss"
STORE_FILE = "passages.sqlite"
MANIFEST_FILE = "manifest.json"


class IndexLoadError(FailedPrecondition):
    """The index is missing, unfinished or damaged; the message names the folder and how to rebuild it."""


@dataclass(frozen=True)
class Manifest:
    embedder: str
    dimension: int
    passages: int
    documents: int
    files: dict[str, dict[str, Any]]  # file name -> {"bytes": int, "sha256": str}
    factory: str = INDEX_FACTORY
    metric: str = "inner_product"
    created: str = ""
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the corpus and chunking that made it
    format: int = FORMAT_VERSION


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


def index_folder(name_or_path: str | Path, layout: VarLayout) -> Path:
    """A bare name ("wikipedia-en") lives under var/indexes/; anything with a slash is a path."""
    text = str(name_or_path)
    if "/" in text or os.sep in text or text in (".", ".."):
        return Path(text).expanduser().resolve()
    return layout.indexes / text


def rebuild_hint(folder: Path) -> str:
    if folder.parent.name == "indexes":
        command = f"python -m services.retrieval build-default --name {folder.name} --var-dir {folder.parent.parent}"
        make_up = " (`make up` builds the default one)" if folder.name == DEFAULT_INDEX_NAME else ""
        return f"build it with `{command}`{make_up}"
    return "rebuild it (`python -m services.retrieval build-default` builds the default corpus under var/)"


class PassageIndex:
    """A loaded index: search by normalized query vectors, get passages with cosine scores."""

    def __init__(self, folder: Path, manifest: Manifest, vectors: faiss.Index, store: PassageStore) -> None:
        self.folder = folder
        self.manifest = manifest
        self._vectors = vectors
        self._store = store

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        # faiss searches are safe from many threads; the store serialises its own reads.
        scores, rows = self._vectors.search(query.reshape(1, -1), k)
        found = [(int(row), float(score)) for row, score in zip(rows[0], scores[0], strict=True) if row >= 0]
        passages = self._store.get([row for row, _ in found])
        return [Hit(passage, score) for passage, (_, score) in zip(passages, found, strict=True)]

    def close(self) -> None:
        self._store.close()


def load_index(folder: Path) -> PassageIndex:
    """Opens a complete index or raises IndexLoadError saying what is wrong and how to rebuild it."""

    def refuse(problem: str) -> IndexLoadError:
        return IndexLoadError(f"retrieval index at {folder} {problem}; {rebuild_hint(folder)}")

    if not folder.is_dir():
        raise refuse("does not exist")
    manifest = read_manifest(folder)
    for name in (FAISS_FILE, STORE_FILE):
        expected = manifest.files.get(name)
        if expected is None:
            raise refuse(f"has a manifest that does not list {name}")
        try:
            actual = _describe_file(folder / name)
        except OSError as error:
            raise refuse(f"is missing {name} ({error.strerror})") from error
        if actual != expected:
            raise refuse(f"is damaged: {name} is not the file its manifest describes ({actual} != {expected})")
    try:
        vectors = faiss.read_index(str(folder / FAISS_FILE))
        store = PassageStore.open_readonly(folder / STORE_FILE)
        counts = (vectors.ntotal, store.count_passages(), store.count_documents())
    except Exception as error:  # faiss raises RuntimeError, sqlite3 DatabaseError; both mean unreadable
        raise refuse(f"could not be read: {type(error).__name__}: {error}") from error
    expected_counts = (manifest.passages, manifest.passages, manifest.documents)
    if counts != expected_counts or vectors.d != manifest.dimension:
        store.close()
        raise refuse(
            f"is inconsistent: faiss holds {counts[0]} vectors of dimension {vectors.d}, the store "
            f"{counts[1]} passages of {counts[2]} documents, the manifest says {manifest.passages} of "
            f"{manifest.documents} at dimension {manifest.dimension}"
        )
    return PassageIndex(folder, manifest, vectors, store)


def read_manifest(folder: Path) -> Manifest:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise IndexLoadError(
            f"retrieval index at {folder} is incomplete: it has no {MANIFEST_FILE}, so the build that wrote it "
            f"did not finish; {rebuild_hint(folder)}"
        )
    try:
        manifest = Manifest(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise IndexLoadError(
            f"retrieval index at {folder} has an unreadable {MANIFEST_FILE} ({error}); {rebuild_hint(folder)}"
        ) from error
    if manifest.format != FORMAT_VERSION:
        raise IndexLoadError(
            f"retrieval index at {folder} has format {manifest.format}, this code reads {FORMAT_VERSION}; "
            f"{rebuild_hint(folder)}"
        )
    return manifest


def _describe_file(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class IndexWriter:
    """Builds an index in a hidden sibling of ``destination`` and renames it into place on ``commit``.

    One writer per index name at a time (a file lock); entering it removes what interrupted builds left.
    Leaving it without ``commit`` (an exception, Ctrl-C) deletes the unfinished folder.
    """

    def __init__(self, destination: Path, embedder: str, dimension: int, details: dict[str, Any] | None = None):
        self.destination = destination
        self._embedder = embedder
        self._dimension = dimension
        self._details = details or {}
        parent, name = destination.parent, destination.name
        self._lock_path = parent / f".{name}.lock"
        self._stale_patterns = (f".{name}.building-*", f".{name}.replaced-*")
        self._temp = parent / f".{name}.building-{os.getpid()}"
        self._lock_file: Any = None
        self._rows = 0
        self._documents: set[str] = set()
        self._committed = False

    def __enter__(self) -> IndexWriter:
        self.destination.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = self._lock_path.open("w")
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        for pattern in self._stale_patterns:
            for leftover in self.destination.parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)
        self._temp.mkdir()
        self._store = PassageStore.create(self._temp / STORE_FILE)
        self._vectors = faiss.index_factory(self._dimension, INDEX_FACTORY, faiss.METRIC_INNER_PRODUCT)
        return self

    def add(self, passages: Sequence[Passage], vectors: np.ndarray) -> None:
        if vectors.shape != (len(passages), self._dimension):
            raise ValueError(f"got {vectors.shape} vectors for {len(passages)} passages of dimension {self._dimension}")
        rows = np.arange(self._rows, self._rows + len(passages), dtype=np.int64)
        self._vectors.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), rows)
        self._store.add(rows.tolist(), passages)
        self._rows += len(passages)
        self._documents.update(passage.doc_id for passage in passages)

    def commit(self) -> Manifest:
        faiss.write_index(self._vectors, str(self._temp / FAISS_FILE))
        self._store.commit()
        self._store.close()
        manifest = Manifest(
            embedder=self._embedder,
            dimension=self._dimension,
            passages=self._rows,
            documents=len(self._documents),
            files={name: _describe_file(self._temp / name) for name in (FAISS_FILE, STORE_FILE)},
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            details=self._details,
        )
        for name in (FAISS_FILE, STORE_FILE):
            _fsync(self._temp / name)
        manifest_path = self._temp / MANIFEST_FILE
        manifest_path.write_text(json.dumps(asdict(manifest), indent=2) + "\n", encoding="utf-8")
        _fsync(manifest_path)
        _fsync(self._temp)
        self._move_into_place()
        self._committed = True
        return manifest

    def _move_into_place(self) -> None:
        # rename(2) cannot replace a non-empty folder: move the old index aside first, delete it after.
        parent = self.destination.parent
        aside = parent / f".{self.destination.name}.replaced-{os.getpid()}"
        if self.destination.exists():
            os.replace(self.destination, aside)
        os.replace(self._temp, self.destination)
        _fsync(parent)
        shutil.rmtree(aside, ignore_errors=True)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        try:
            if not self._committed:
                self._store.close()
                shutil.rmtree(self._temp, ignore_errors=True)
        finally:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
