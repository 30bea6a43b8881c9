"""A passage index on disk that can be fed while it serves: faiss vectors plus the passage store.

Layout of ``var/indexes/<name>/``:
  ``passages.sqlite``          the PassageStore, and the committed state: which vectors file is current, counts,
                               the embedder, the faiss factory
  ``vectors-<generation>.faiss`` the faiss index as of that commit (ids are store rows, never reused)
  ``manifest.json``            a readable copy of the committed state, rewritten after each commit (never read)

A commit writes the new vectors file and fsyncs it, then one SQLite transaction changes the passages and
points the state at the new file, then the old file is deleted. A crash before the transaction leaves the old
file current (the new one is an orphan, removed at the next open); after it, the new one. Never a half index.
A new index is made in a hidden sibling folder and renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from loguru import logger

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.paths import VarLayout
from services.retrieval.chunker import Passage
from services.retrieval.store import PassageStore, StoreDamagedError

DEFAULT_INDEX_NAME = "wikipedia-en"
INDEX_FACTORY = "IDMap2,Flat"
FORMAT_VERSION = 2
STORE_FILE = "passages.sqlite"
MANIFEST_FILE = "manifest.json"
# faiss trains IVF/PQ on a sample; 256 points per centroid is what its k-means uses at most anyway.
DEFAULT_TRAIN_SAMPLE = 262_144


def vectors_file_name(generation: int) -> str:
    return f"vectors-{generation:08d}.faiss"


class IndexLoadError(FailedPrecondition):
    """The index is missing, unfinished or damaged; the message names the folder and how to rebuild it."""


@dataclass(frozen=True)
class IndexSettings:
    """How vectors are indexed: chosen when an index is created (factory) or each time it is opened."""

    factory: str = INDEX_FACTORY  # any faiss index_factory string: "IDMap2,Flat", "HNSW32", "IVF4096,Flat", ...
    search_params: str = ""  # faiss ParameterSpace string applied after loading, e.g. "nprobe=32" or "efSearch=128"
    train_sample: int = DEFAULT_TRAIN_SAMPLE
    mmap: bool = False  # map the vectors file instead of reading it (faiss supports it for Flat, IVF and PQ)


@dataclass(frozen=True)
class Manifest:
    """The committed state of an index, as the store records it."""

    embedder: str
    dimension: int
    passages: int
    documents: int
    vectors_file: str
    vectors_bytes: int
    vectors_sha256: str
    factory: str = INDEX_FACTORY
    metric: str = "inner_product"
    generation: int = 0
    created: str = ""
    updated: str = ""
    dead_rows: int = 0
    next_row: int = 0
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the corpus and chunking that made it
    format: int = FORMAT_VERSION


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float


@dataclass(frozen=True)
class Change:
    """What one commit does: passages (with their vectors) to add, documents to remove first."""

    passages: Sequence[Passage] = ()
    vectors: np.ndarray | None = None
    remove_documents: Sequence[str] = ()


@dataclass(frozen=True)
class CommitReport:
    passages_added: int
    passages_removed: int
    documents_removed: int
    manifest: Manifest


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
        return (
            f"build it with `{command}`{make_up}, or start an empty one to feed with "
            f"`python -m services.retrieval serve --index {folder.name} --create`"
        )
    return "rebuild it (`python -m services.retrieval build-default` builds the default corpus under var/)"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class PassageIndex:
    """A loaded index: batched search, and commits that searches never see half of."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        vectors: faiss.Index,
        store: PassageStore,
        settings: IndexSettings,
        writer: WriterLock | None = None,
    ) -> None:
        self.folder = folder
        self._writer = writer
        self.manifest = manifest
        self.settings = settings
        self._vectors = vectors
        self._store = store
        self._dead = store.dead_rows()
        self._mapped = settings.mmap
        self._write_lock = threading.Lock()  # one commit at a time
        self._swap_lock = threading.Lock()  # the store commit and the switch to the new vectors, together

    @property
    def read_only(self) -> bool:
        return self._writer is None

    @property
    def vectors(self) -> faiss.Index:
        """The faiss index searched now (a commit replaces it with a new one)."""
        return self._vectors

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        return self.search_many(query.reshape(1, -1), k)[0]

    def search_many(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The k best passages for each row of ``queries`` (normalized vectors)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        try:
            return self._search_snapshot(self._vectors, self._dead, queries, k)
        except KeyError:  # a commit removed a found passage between the faiss search and the store lookup
            with self._swap_lock:
                return self._search_snapshot(self._vectors, self._dead, queries, k)

    def _search_snapshot(self, vectors: faiss.Index, dead: set[int], queries: np.ndarray, k: int) -> list[list[Hit]]:
        # faiss searches are safe from many threads and a commit never modifies the index a search holds (it
        # swaps in a new one), so searches take no lock. Removed-but-unremovable rows (HNSW) are over-fetched.
        if vectors.ntotal == 0:  # nothing added yet (an IVF index is not even trained)
            return [[] for _ in queries]
        wanted = min(k + len(dead), vectors.ntotal)
        scores, rows = vectors.search(queries, wanted)
        results = []
        for row_list, score_list in zip(rows, scores, strict=True):
            found = [
                (int(row), float(score))
                for row, score in zip(row_list, score_list, strict=True)
                if row >= 0 and int(row) not in dead
            ][:k]
            passages = self._store.get([row for row, _ in found])
            results.append([Hit(p, score) for p, (_, score) in zip(passages, found, strict=True)])
        return results

    def commit(self, change: Change) -> CommitReport:
        """Applies ``change`` durably: after this returns, a crash or restart keeps it; if it raises, nothing
        changed. Searches go on meanwhile against the previous state and switch over at once."""
        if self._writer is None:
            raise FailedPrecondition(f"the index at {self.folder} was opened read-only")
        with self._write_lock:
            old = self.manifest
            # A document added again replaces the old one: its passages go first.
            replaced = self._store.rows_of_documents({*change.remove_documents, *(p.doc_id for p in change.passages)})
            removed_rows = [row for rows in replaced.values() for row in rows]
            vectors = self._writable_copy()
            dead_now: list[int] = []
            if removed_rows:
                ids = np.asarray(removed_rows, dtype=np.int64)
                try:
                    vectors.remove_ids(ids)
                except RuntimeError:  # HNSW cannot remove vectors; searches skip these rows instead
                    dead_now = removed_rows
            added: list[tuple[int, Passage]] = []
            if change.passages:
                assert change.vectors is not None
                if change.vectors.shape != (len(change.passages), old.dimension):
                    raise ValueError(
                        f"got vectors of shape {change.vectors.shape} for {len(change.passages)} passages of "
                        f"dimension {old.dimension}"
                    )
                embeddings = np.ascontiguousarray(change.vectors, dtype=np.float32)
                if not vectors.is_trained:
                    self._train(vectors, embeddings)
                rows = np.arange(old.next_row, old.next_row + len(change.passages), dtype=np.int64)
                vectors.add_with_ids(embeddings, rows)
                added = list(zip(rows.tolist(), change.passages, strict=True))
            generation = old.generation + 1
            vectors_path = self.folder / vectors_file_name(generation)
            described = write_vectors(vectors, vectors_path)
            passages = old.passages + len(added) - len(removed_rows)
            documents_after = old.documents - len(replaced) + len({p.doc_id for p in change.passages})
            manifest = replace(
                old,
                generation=generation,
                passages=passages,
                documents=documents_after,
                vectors_file=vectors_path.name,
                vectors_bytes=described["bytes"],
                vectors_sha256=described["sha256"],
                updated=now(),
                dead_rows=old.dead_rows + len(dead_now),
                next_row=old.next_row + len(added),
            )
            apply_search_params(vectors, self.settings.search_params)
            try:
                with self._swap_lock:
                    self._store.commit(asdict(manifest), added, removed_rows, dead_now)
                    self._vectors, self.manifest = vectors, manifest
                    self._dead = self._dead | set(dead_now)
                    self._mapped = False
            except BaseException:
                vectors_path.unlink(missing_ok=True)
                raise
            (self.folder / old.vectors_file).unlink(missing_ok=True)
            write_manifest_copy(self.folder, manifest)
            return CommitReport(len(added), len(removed_rows), len(replaced), manifest)

    def _writable_copy(self) -> faiss.Index:
        if self._mapped:
            # A clone of a memory-mapped index shares the mapped arrays (faiss 1.15: removing ids from such a
            # clone of a Flat index crashes; an IVF one refuses to clone): read the file into memory instead.
            return faiss.read_index(str(self.folder / self.manifest.vectors_file))
        return faiss.clone_index(self._vectors)

    def _train(self, vectors: faiss.Index, sample: np.ndarray) -> None:
        if len(sample) > self.settings.train_sample:
            picks = np.random.default_rng(0).choice(len(sample), self.settings.train_sample, replace=False)
            sample = sample[np.sort(picks)]
        logger.info("training {} on {} vectors", self.manifest.factory, len(sample))
        try:
            vectors.train(sample)
        except RuntimeError as error:
            raise FailedPrecondition(
                f"the faiss index {self.manifest.factory!r} could not be trained on the {len(sample)} passages of "
                f"this first commit ({str(error).strip().splitlines()[-1]}); add more documents in the first call "
                f"or create the index with a smaller factory (e.g. IDMap2,Flat)"
            ) from error

    def documents_present(self, doc_ids: Sequence[str]) -> set[str]:
        return set(self._store.rows_of_documents(doc_ids))

    def bytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.is_file())

    def close(self) -> None:
        if self._writer is not None:
            self._store.checkpoint()
            self._writer.release()
        self._store.close()


def write_vectors(vectors: faiss.Index, path: Path) -> dict[str, Any]:
    temporary = path.with_suffix(".partial")
    faiss.write_index(vectors, str(temporary))
    _fsync(temporary)
    os.replace(temporary, path)
    _fsync(path.parent)
    return describe_file(path)


def write_manifest_copy(folder: Path, manifest: Manifest) -> None:
    temporary = folder / f".{MANIFEST_FILE}.partial"
    temporary.write_text(json.dumps(asdict(manifest), indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, folder / MANIFEST_FILE)


def apply_search_params(vectors: faiss.Index, search_params: str) -> None:
    if not search_params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(vectors, search_params)
    except RuntimeError as error:
        raise InvalidArgument(
            f"search parameters {search_params!r} do not apply to this index ({str(error).strip()}); "
            "use nprobe=N for IVF indexes, efSearch=N for HNSW"
        ) from error


def describe_file(path: Path) -> dict[str, Any]:
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


class WriterLock:
    """One process writes an index (by name) at a time: an flock on a file beside the folder, held while open."""

    def __init__(self, folder: Path) -> None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        self._file = (folder.parent / f".{folder.name}.lock").open("w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise IndexLoadError(
                f"another process is writing the retrieval index at {folder}; stop it, or open the index read-only"
            ) from None

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()


def create_index(
    destination: Path,
    embedder: str,
    dimension: int,
    settings: IndexSettings = IndexSettings(),
    details: dict[str, Any] | None = None,
    replace_existing: bool = False,
) -> Path:
    """Makes an empty index at ``destination`` atomically: a hidden sibling folder renamed into place."""
    try:
        vectors = faiss.index_factory(dimension, _with_id_map(settings.factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InvalidArgument(
            f"faiss cannot make an index from the factory string {settings.factory!r}: {str(error).strip()}"
        ) from error
    parent = destination.parent
    remove_leftovers(destination)
    temporary = parent / f".{destination.name}.building-{os.getpid()}"
    temporary.mkdir()
    try:
        described = write_vectors(vectors, temporary / vectors_file_name(0))
        manifest = Manifest(
            embedder=embedder,
            dimension=dimension,
            passages=0,
            documents=0,
            vectors_file=vectors_file_name(0),
            vectors_bytes=described["bytes"],
            vectors_sha256=described["sha256"],
            factory=settings.factory,
            created=now(),
            updated=now(),
            details=details or {},
        )
        store = PassageStore.open(temporary / STORE_FILE)
        store.commit(asdict(manifest))
        store.checkpoint()
        store.close()
        write_manifest_copy(temporary, manifest)
        _fsync(temporary)
        move_into_place(temporary, destination, replace_existing)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return destination


def remove_leftovers(destination: Path) -> None:
    """Deletes what interrupted builds of ``destination`` left beside it (hidden building/replaced folders)."""
    parent = destination.parent
    parent.mkdir(parents=True, exist_ok=True)
    for pattern in (f".{destination.name}.building-*", f".{destination.name}.replaced-*"):
        for leftover in parent.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def move_into_place(temporary: Path, destination: Path, replace_existing: bool) -> None:
    # rename(2) cannot replace a non-empty folder: move the old index aside first, delete it after.
    if destination.exists():
        if not replace_existing:
            raise FailedPrecondition(f"an index already exists at {destination}")
        aside = destination.parent / f".{destination.name}.replaced-{os.getpid()}"
        os.replace(destination, aside)
        os.replace(temporary, destination)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(temporary, destination)
    _fsync(destination.parent)


def _with_id_map(factory: str) -> str:
    # Store rows are the ids faiss returns; IDMap2 gives every index type add_with_ids and reconstruct.
    return factory if factory.startswith("IDMap") else f"IDMap2,{factory}"


def load_index(folder: Path, settings: IndexSettings | None = None, writable: bool = False) -> PassageIndex:
    """Opens the last committed state of an index or raises IndexLoadError saying what is wrong.

    ``writable`` takes the index's writer lock (held until ``close``) and clears what unfinished commits left."""

    def refuse(problem: str) -> IndexLoadError:
        return IndexLoadError(f"retrieval index at {folder} {problem}; {rebuild_hint(folder)}")

    if not folder.is_dir():
        raise refuse("does not exist")
    if not (folder / STORE_FILE).is_file():
        if (folder / "index.faiss").is_file():  # format 1 kept its state in manifest.json, not in the store
            raise refuse("was written by an older nightcap (format 1); rebuild it")
        raise refuse(f"is incomplete: it has no {STORE_FILE}")
    try:
        store = PassageStore.open(folder / STORE_FILE)
    except StoreDamagedError as error:
        raise refuse(f"is damaged: {STORE_FILE} could not be read ({error})") from error
    try:
        state = store.read_state()
        if state is None:
            raise refuse(f"is incomplete: {STORE_FILE} holds no committed state")
        try:
            manifest = Manifest(**state)
        except TypeError as error:
            raise refuse(f"has a state this code cannot read ({error})") from error
        if manifest.format != FORMAT_VERSION:
            raise refuse(f"has format {manifest.format}, this code reads {FORMAT_VERSION}")
        settings = settings or IndexSettings(factory=manifest.factory)
        if settings.factory != manifest.factory:
            settings = replace(settings, factory=manifest.factory)
        vectors = _read_vectors(folder, manifest, settings, refuse)
        counts = (vectors.ntotal, store.count_passages(), store.count_documents())
        expected = (manifest.passages + manifest.dead_rows, manifest.passages, manifest.documents)
        if counts != expected or vectors.d != manifest.dimension:
            raise refuse(
                f"is inconsistent: faiss holds {counts[0]} vectors of dimension {vectors.d}, the store "
                f"{counts[1]} passages of {counts[2]} documents, its state says {manifest.passages} of "
                f"{manifest.documents} at dimension {manifest.dimension}"
            )
        apply_search_params(vectors, settings.search_params)
    except BaseException:
        store.close()
        raise
    writer = None
    if writable:
        try:
            writer = WriterLock(folder)
        except BaseException:
            store.close()
            raise
        _remove_orphans(folder, manifest)
    return PassageIndex(folder, manifest, vectors, store, settings, writer)


def _read_vectors(folder: Path, manifest: Manifest, settings: IndexSettings, refuse: Any) -> faiss.Index:
    path = folder / manifest.vectors_file
    try:
        actual = describe_file(path)
    except OSError as error:
        raise refuse(f"is missing {manifest.vectors_file} ({error.strerror})") from error
    expected = {"bytes": manifest.vectors_bytes, "sha256": manifest.vectors_sha256}
    if actual != expected:
        raise refuse(f"is damaged: {manifest.vectors_file} is not the file its state describes ({actual})")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if settings.mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as error:
        raise refuse(f"could not be read: {manifest.vectors_file}: {error}") from error


def _remove_orphans(folder: Path, manifest: Manifest) -> None:
    # Vectors files of commits that never reached the store (a crash between the two writes).
    for path in [*folder.glob("vectors-*.faiss"), *folder.glob("vectors-*.partial")]:
        if path.name != manifest.vectors_file:
            logger.info("removing {}: left by a commit that did not finish", path)
            path.unlink(missing_ok=True)
