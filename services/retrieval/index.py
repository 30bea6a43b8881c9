"""A passage index on disk that can be fed while it serves: faiss vector segments plus the passage store.

Layout of ``var/indexes/<name>/``:
  ``passages.sqlite``       the PassageStore, the tombstones of removed passages, and the committed state: which
                            segment files are current, counts, the embedder, the faiss factory
  ``vectors-<n>.faiss``     one segment: the vectors one commit added (ids are store rows, never reused); a
                            segment is written once and never changed
  ``trained-<n>.faiss``     IVF/PQ factories only: the empty index trained at the first commit, cloned for every
                            later segment so all segments share one quantizer and their scores compare
  ``manifest.json``         a readable copy of the committed state, rewritten after each commit (never read)

A commit costs what it adds: it writes one new segment file (its passages' vectors) and fsyncs it, then one SQLite
transaction adds the passages, turns removed passages into tombstones and appends the segment to the state. No
existing file is read or rewritten. A crash before the transaction leaves the new file an orphan (removed at the
next writable open); after it, the commit is whole. Searches query every segment and merge the per-segment top-k,
skipping tombstones. Compaction (``compact``, explicit or in the background past a segment threshold) merges the
segments into one, drops the tombstoned vectors, and commits that the same way.
A new index is made in a hidden sibling folder and renamed into place, so a folder that exists is complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import xxhash
from loguru import logger

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.paths import VarLayout
from services.retrieval.chunker import Passage
from services.retrieval.store import PassageStore, StoreDamagedError

DEFAULT_INDEX_NAME = "wikipedia-en"
INDEX_FACTORY = "IDMap2,Flat"
FORMAT_VERSION = 3
MIGRATABLE_FORMATS = (2,)  # format 2: one vectors file rewritten by every commit; becomes one segment
STORE_FILE = "passages.sqlite"
MANIFEST_FILE = "manifest.json"
# faiss trains IVF/PQ on a sample; 256 points per centroid is what its k-means uses at most anyway.
DEFAULT_TRAIN_SAMPLE = 262_144
# Vectors re-added per call while compacting: bounds the extra memory to this many decoded vectors.
COMPACT_CHUNK = 65_536


def vectors_file_name(number: int) -> str:
    return f"vectors-{number:08d}.faiss"


def trained_file_name(number: int) -> str:
    return f"trained-{number:08d}.faiss"


class IndexLoadError(FailedPrecondition):
    """The index is missing, unfinished or damaged; the message names the folder and how to rebuild it."""


@dataclass(frozen=True)
class IndexSettings:
    """How vectors are indexed: chosen when an index is created (factory) or each time it is opened."""

    factory: str = INDEX_FACTORY  # any faiss index_factory string: "IDMap2,Flat", "HNSW32", "IVF4096,Flat", ...
    search_params: str = ""  # faiss ParameterSpace string applied after loading, e.g. "nprobe=32" or "efSearch=128"
    train_sample: int = DEFAULT_TRAIN_SAMPLE
    mmap: bool = False  # map the segment files instead of reading them (faiss supports it for Flat, IVF and PQ)
    # Compact in the background once a commit leaves more segments than this (0: only when asked).
    compact_segments: int = 0


@dataclass(frozen=True)
class Segment:
    """One immutable vectors file: the rows ``first_row <= row < end_row`` that were added together (rows of
    later segments are always higher), ``vectors`` of them still in the file (tombstoned ones included)."""

    file: str
    bytes: int
    digest: str  # "xxh3_128:<hex>" (or "sha256:<hex>" for a file migrated from format 2)
    vectors: int
    first_row: int
    end_row: int


@dataclass(frozen=True)
class Manifest:
    """The committed state of an index, as the store records it."""

    embedder: str
    dimension: int
    passages: int
    documents: int
    segments: tuple[Segment, ...] = ()
    trained: Segment | None = None  # the empty trained index segments are cloned from (IVF/PQ), once trained
    factory: str = INDEX_FACTORY
    metric: str = "inner_product"
    generation: int = 0
    created: str = ""
    updated: str = ""
    dead_rows: int = 0  # tombstones: removed passages whose vectors are still in a segment
    next_row: int = 0
    next_file: int = 1
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the corpus and chunking that made it
    format: int = FORMAT_VERSION

    @property
    def vectors(self) -> int:
        return sum(segment.vectors for segment in self.segments)

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Manifest:
        state = dict(state)
        state["segments"] = tuple(Segment(**segment) for segment in state.get("segments", ()))
        if state.get("trained") is not None:
            state["trained"] = Segment(**state["trained"])
        return cls(**state)


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


@dataclass(frozen=True)
class CompactReport:
    segments_before: int
    segments_after: int
    vectors_dropped: int  # tombstoned vectors removed from disk
    bytes_before: int
    bytes_after: int
    seconds: float
    manifest: Manifest


@dataclass(frozen=True)
class _LoadedSegment:
    segment: Segment
    vectors: faiss.Index
    dead: int  # tombstones among this segment's rows: searches over-fetch by this many


@dataclass(frozen=True)
class _View:
    """What a search sees: swapped whole by a commit, so a search never sees half of one."""

    segments: tuple[_LoadedSegment, ...]
    dead: frozenset[int]


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
    """A loaded index: batched search over its segments, and commits that searches never see half of."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        view: _View,
        template: faiss.Index | None,
        store: PassageStore,
        settings: IndexSettings,
        writer: WriterLock | None = None,
    ) -> None:
        self.folder = folder
        self._writer = writer
        self.manifest = manifest
        self.settings = settings
        self._view = view
        self._template = template  # empty (trained) index each new segment is cloned from; None until needed
        self._store = store
        self._next_file = manifest.next_file
        self._write_lock = threading.Lock()  # one commit at a time
        self._swap_lock = threading.Lock()  # the store commit and the switch to the new view, together
        self._compact_lock = threading.Lock()  # one compaction at a time (commits go on beside it)
        self._background: threading.Thread | None = None
        self._closed = False

    @property
    def read_only(self) -> bool:
        return self._writer is None

    @property
    def segment_count(self) -> int:
        return len(self.manifest.segments)

    def set_search_params(self, search_params: str) -> None:
        """Applies faiss search parameters (e.g. ``nprobe=16``) to every segment, and to segments to come."""
        for loaded in self._view.segments:
            apply_search_params(loaded.vectors, search_params)
        self.settings = replace(self.settings, search_params=search_params)

    def search(self, query: np.ndarray, k: int) -> list[Hit]:
        return self.search_many(query.reshape(1, -1), k)[0]

    def search_many(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The k best passages for each row of ``queries`` (normalized vectors)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        try:
            return self._search_view(self._view, queries, k)
        except KeyError:  # a commit removed a found passage between the faiss search and the store lookup
            with self._swap_lock:
                return self._search_view(self._view, queries, k)

    def _search_view(self, view: _View, queries: np.ndarray, k: int) -> list[list[Hit]]:
        # faiss searches are safe from many threads and a commit never modifies a segment a search holds (it
        # swaps in a new view), so searches take no lock. Each segment over-fetches by its tombstones.
        found_scores, found_rows = [], []
        for loaded in view.segments:
            wanted = min(k + loaded.dead, loaded.vectors.ntotal)
            if wanted == 0:
                continue
            scores, rows = loaded.vectors.search(queries, wanted)
            found_scores.append(scores)
            found_rows.append(rows)
        if not found_scores:  # nothing added yet
            return [[] for _ in queries]
        scores, rows = np.hstack(found_scores), np.hstack(found_rows)
        # Merge the per-segment top lists: best first; a stable sort keeps faiss' order among equal scores.
        order = np.argsort(-scores, axis=1, kind="stable")
        results = []
        for query_rows, query_scores, query_order in zip(rows, scores, order, strict=True):
            best: list[tuple[int, float]] = []
            for at in query_order:
                row = int(query_rows[at])
                if row >= 0 and row not in view.dead:
                    best.append((row, float(query_scores[at])))
                    if len(best) == k:
                        break
            passages = self._store.get([row for row, _ in best])
            results.append([Hit(p, score) for p, (_, score) in zip(passages, best, strict=True)])
        return results

    def commit(self, change: Change) -> CommitReport:
        """Applies ``change`` durably: after this returns, a crash or restart keeps it; if it raises, nothing
        changed. Its cost is what it adds: one new segment file; removed passages become tombstones. Searches
        go on meanwhile against the previous state and switch over at once."""
        self._check_writable("documents cannot be changed")
        with self._write_lock:
            old = self.manifest
            # A document added again replaces the old one: its passages go first.
            replaced = self._store.rows_of_documents({*change.remove_documents, *(p.doc_id for p in change.passages)})
            removed_rows = [row for rows in replaced.values() for row in rows]
            written: list[Path] = []
            try:
                manifest, loaded, added, template = self._write_segment(old, change, written)
                manifest = replace(
                    manifest,
                    generation=old.generation + 1,
                    passages=old.passages + len(added) - len(removed_rows),
                    documents=old.documents - len(replaced) + len({p.doc_id for p in change.passages}),
                    updated=now(),
                    dead_rows=old.dead_rows + len(removed_rows),
                )
                dead = self._view.dead | set(removed_rows)
                segments = tuple(replace(s, dead=_dead_in(s.segment, dead)) for s in (*self._view.segments, *loaded))
                with self._swap_lock:
                    self._store.commit(manifest.to_state(), added, removed_rows, removed_rows)
                    self._view, self.manifest, self._template = _View(segments, frozenset(dead)), manifest, template
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            write_manifest_copy(self.folder, manifest)
        self._maybe_compact_in_background()
        return CommitReport(len(added), len(removed_rows), len(replaced), manifest)

    def _write_segment(
        self, old: Manifest, change: Change, written: list[Path]
    ) -> tuple[Manifest, tuple[_LoadedSegment, ...], list[tuple[int, Passage]], faiss.Index | None]:
        """Writes the new passages' vectors as one segment file (training the template first if it must be)."""
        if not change.passages:
            return old, (), [], self._template
        assert change.vectors is not None
        if change.vectors.shape != (len(change.passages), old.dimension):
            raise ValueError(
                f"got vectors of shape {change.vectors.shape} for {len(change.passages)} passages of "
                f"dimension {old.dimension}"
            )
        embeddings = np.ascontiguousarray(change.vectors, dtype=np.float32)
        template, trained = self._template, old.trained
        if template is None:
            template = empty_index(old.factory, old.dimension)
        if not template.is_trained:
            self._train(template, embeddings)
            trained = write_vectors(template, self.folder / trained_file_name(self._take_file_number()), 0, 0)
            written.append(self.folder / trained.file)
        vectors = faiss.clone_index(template)
        rows = np.arange(old.next_row, old.next_row + len(change.passages), dtype=np.int64)
        vectors.add_with_ids(embeddings, rows)
        path = self.folder / vectors_file_name(self._take_file_number())
        written.append(path)
        segment = write_vectors(vectors, path, old.next_row, old.next_row + len(rows))
        if self.settings.mmap:
            vectors = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        apply_search_params(vectors, self.settings.search_params)
        manifest = replace(
            old,
            segments=(*old.segments, segment),
            trained=trained,
            next_row=old.next_row + len(rows),
            next_file=self._next_file,
        )
        added = list(zip(rows.tolist(), change.passages, strict=True))
        return manifest, (_LoadedSegment(segment, vectors, 0),), added, template

    def _take_file_number(self) -> int:
        number = self._next_file
        self._next_file += 1
        return number

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

    def compact(self) -> CompactReport:
        """Merges every segment into one and drops the vectors of removed passages, durably and atomically
        (a crash at any moment leaves the index as it was before or after). Commits and searches go on
        meanwhile; segments committed during the merge stay as they are, after the merged one."""
        self._check_writable("it cannot be compacted")
        started = time.perf_counter()
        with self._compact_lock:
            with self._write_lock:
                snapshot, dead = self.manifest, self._view.dead
                number = self._take_file_number()
            before = sum(s.bytes for s in snapshot.segments)
            if len(snapshot.segments) <= 1 and not dead:
                logger.info("compaction of {}: nothing to do (one segment, no tombstones)", self.folder)
                return CompactReport(len(snapshot.segments), len(snapshot.segments), 0, before, before, 0.0, snapshot)
            logger.info(
                "compacting {}: {} segments, {} vectors, {} tombstones",
                self.folder,
                len(snapshot.segments),
                snapshot.vectors,
                len(dead),
            )
            merged, kept = self._merge(snapshot.segments, dead)
            written = self.folder / vectors_file_name(number)
            try:
                merged_loaded: tuple[_LoadedSegment, ...] = ()
                if kept:
                    first, end = snapshot.segments[0].first_row, snapshot.segments[-1].end_row
                    segment = write_vectors(merged, written, first, end)
                    if self.settings.mmap:
                        merged = faiss.read_index(str(written), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                    apply_search_params(merged, self.settings.search_params)
                    merged_loaded = (_LoadedSegment(segment, merged, 0),)
                with self._write_lock:
                    current = self.manifest
                    later = current.segments[len(snapshot.segments) :]
                    assert current.segments[: len(snapshot.segments)] == snapshot.segments  # only commits ran
                    manifest = replace(
                        current,
                        segments=(*(s.segment for s in merged_loaded), *later),
                        dead_rows=current.dead_rows - len(dead),
                        generation=current.generation + 1,
                        next_file=self._next_file,
                        updated=now(),
                    )
                    remaining = self._view.dead - dead
                    loaded = tuple(
                        replace(s, dead=_dead_in(s.segment, remaining))
                        for s in (*merged_loaded, *self._view.segments[len(snapshot.segments) :])
                    )
                    with self._swap_lock:
                        self._store.commit(manifest.to_state(), cleared_dead_rows=sorted(dead))
                        self._view, self.manifest = _View(loaded, remaining), manifest
            except BaseException:
                written.unlink(missing_ok=True)
                raise
            write_manifest_copy(self.folder, manifest)
            for old in snapshot.segments:
                (self.folder / old.file).unlink(missing_ok=True)
            after = sum(s.bytes for s in manifest.segments[: len(merged_loaded)])
            report = CompactReport(
                len(snapshot.segments),
                len(manifest.segments),
                snapshot.vectors - kept,
                before,
                after,
                time.perf_counter() - started,
                manifest,
            )
            logger.info(
                "compacted {}: {} segments -> {}, {} tombstoned vectors dropped, {:.1f} MB -> {:.1f} MB in {:.1f}s",
                self.folder,
                report.segments_before,
                report.segments_after,
                report.vectors_dropped,
                before / 2**20,
                after / 2**20,
                report.seconds,
            )
            return report

    def _merge(self, segments: Sequence[Segment], dead: frozenset[int]) -> tuple[faiss.Index, int]:
        """One index holding the live vectors of ``segments`` (each read into memory in turn, never mapped)."""
        template = self._template
        if template is None:
            template = empty_index(self.manifest.factory, self.manifest.dimension)
        merged = faiss.clone_index(template)
        dead_rows = np.fromiter(dead, dtype=np.int64, count=len(dead))
        if faiss.try_extract_index_ivf(merged) is not None:
            return merged, merge_inverted_lists(merged, [self.folder / s.file for s in segments], dead_rows)
        # Flat, HNSW, PQ: decoded vectors re-added (exact for Flat and HNSW; a decoded PQ vector encodes back to
        # its own code). HNSW has no merge_from, and a new graph is how its removed vectors really go.
        for segment in segments:
            ids, vectors = decode_segment(self.folder / segment.file)
            live = ~np.isin(ids, dead_rows)
            for start in range(0, len(ids), COMPACT_CHUNK):
                window = slice(start, start + COMPACT_CHUNK)
                if live[window].any():
                    merged.add_with_ids(vectors[window][live[window]], ids[window][live[window]])
            del vectors
        return merged, int(merged.ntotal)

    def _maybe_compact_in_background(self) -> None:
        threshold = self.settings.compact_segments
        if not threshold or len(self.manifest.segments) <= threshold:
            return
        if self._background is not None and self._background.is_alive():
            return

        def run() -> None:
            try:
                self.compact()
            except Exception as error:  # logged, never raised into a thread nobody joins for its result
                logger.error("background compaction of {} failed: {}", self.folder, error)

        logger.info("{} segments (threshold {}): compacting in the background", len(self.manifest.segments), threshold)
        self._background = threading.Thread(target=run, name="index-compaction", daemon=True)
        self._background.start()

    def wait_for_compaction(self, timeout: float | None = None) -> None:
        if self._background is not None:
            self._background.join(timeout)

    def _check_writable(self, consequence: str) -> None:
        if self._writer is None:
            raise FailedPrecondition(f"the index at {self.folder} was opened read-only; {consequence}")

    def list_documents(self, limit: int, after: str = "") -> list[tuple[str, str, str, int]]:
        """(id, title, source, passages) of the committed documents after ``after``, in id order."""
        return self._store.list_documents(limit, after)

    def documents_present(self, doc_ids: Sequence[str]) -> set[str]:
        return set(self._store.rows_of_documents(doc_ids))

    def bytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.is_file())

    def close(self) -> None:
        """Waits for a background compaction, then releases the store and the writer lock; twice is once."""
        if self._closed:
            return
        self._closed = True
        self.wait_for_compaction()
        if self._writer is not None:
            self._store.checkpoint()
            self._writer.release()
        self._store.close()


def _dead_in(segment: Segment, dead: frozenset[int] | set[int]) -> int:
    if not dead:
        return 0
    rows = np.fromiter(dead, dtype=np.int64, count=len(dead))
    return int(np.count_nonzero((rows >= segment.first_row) & (rows < segment.end_row)))


def empty_index(factory: str, dimension: int) -> faiss.Index:
    try:
        return faiss.index_factory(dimension, _with_id_map(factory), faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as error:
        raise InvalidArgument(
            f"faiss cannot make an index from the factory string {factory!r}: {str(error).strip()}"
        ) from error


def merge_inverted_lists(merged: faiss.Index, paths: Sequence[Path], dead_rows: np.ndarray) -> int:
    """Copies the live entries of IVF segments into ``merged`` (an empty IDMap2 over IVF from the same trained
    template), list by list and code by code: what compaction must not change, it does not re-encode.

    By hand because faiss' merge_from cannot drop entries and, through IndexIDMap2, mis-numbers the inner ids
    (faiss 1.15: remove_ids afterwards aborts on an assertion). IDMap2's contract is kept: inner ids run
    0..ntotal-1 and id_map[inner id] is the row."""
    wrapper = faiss.downcast_index(merged)
    target = faiss.extract_index_ivf(merged)
    rows_in_order: list[np.ndarray] = []
    count = 0
    for path in paths:
        segment = faiss.read_index(str(path))
        rows = faiss.vector_to_array(faiss.downcast_index(segment).id_map).astype(np.int64)
        lists = faiss.extract_index_ivf(segment).invlists
        for number in range(lists.nlist):
            size = lists.list_size(number)
            if size == 0:
                continue
            inner = faiss.rev_swig_ptr(lists.get_ids(number), size).copy()
            codes = faiss.rev_swig_ptr(lists.get_codes(number), size * lists.code_size).reshape(size, -1)
            keep = ~np.isin(rows[inner], dead_rows)
            kept = int(keep.sum())
            if kept == 0:
                continue
            # named arrays: swig_ptr holds no reference, so a temporary would be freed before faiss reads it
            new_ids = np.arange(count, count + kept, dtype=np.int64)
            kept_codes = np.ascontiguousarray(codes[keep])
            target.invlists.add_entries(number, kept, faiss.swig_ptr(new_ids), faiss.swig_ptr(kept_codes))
            rows_in_order.append(rows[inner[keep]])
            count += kept
        del segment
    target.ntotal = wrapper.ntotal = count
    if rows_in_order:
        faiss.copy_array_to_vector(np.concatenate(rows_in_order), wrapper.id_map)
    wrapper.construct_rev_map()
    return count


def decode_segment(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The row ids and (decoded) vectors a segment file holds, read into memory (never mapped)."""
    index = faiss.read_index(str(path))
    wrapper = faiss.downcast_index(index)
    if not isinstance(wrapper, faiss.IndexIDMap2 | faiss.IndexIDMap):
        raise ValueError(f"{path} does not hold an IDMap index")
    ids = faiss.vector_to_array(wrapper.id_map).astype(np.int64)
    inner = faiss.downcast_index(wrapper.index)
    ivf = faiss.try_extract_index_ivf(inner)
    if ivf is not None:
        ivf.make_direct_map()  # IVF lists know only their own order; reconstruction needs the map back
    vectors = inner.reconstruct_n(0, inner.ntotal) if inner.ntotal else np.empty((0, index.d), np.float32)
    return ids, vectors


def write_vectors(vectors: faiss.Index, path: Path, first_row: int, end_row: int) -> Segment:
    temporary = path.with_suffix(".partial")
    faiss.write_index(vectors, str(temporary))
    _fsync(temporary)
    os.replace(temporary, path)
    _fsync(path.parent)
    size, digest = describe_file(path)
    return Segment(path.name, size, digest, int(vectors.ntotal), first_row, end_row)


def write_manifest_copy(folder: Path, manifest: Manifest) -> None:
    temporary = folder / f".{MANIFEST_FILE}.partial"
    temporary.write_text(json.dumps(manifest.to_state(), indent=2) + "\n", encoding="utf-8")
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


def describe_file(path: Path, algorithm: str = "xxh3_128") -> tuple[int, str]:
    """Size and digest of a file. xxh3 hashes at memory speed (~10 GB/s; sha256 ~1 GB/s, which made opening
    a 1M-vector index cost seconds); format 2's sha256 digests are still checked as sha256."""
    digest = xxhash.xxh3_128() if algorithm == "xxh3_128" else hashlib.new(algorithm)
    with path.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return path.stat().st_size, f"{algorithm}:{digest.hexdigest()}"


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
    empty_index(settings.factory, dimension)  # refuses a factory faiss does not know before anything is written
    parent = destination.parent
    remove_leftovers(destination)
    temporary = parent / f".{destination.name}.building-{os.getpid()}"
    temporary.mkdir()
    try:
        manifest = Manifest(
            embedder=embedder,
            dimension=dimension,
            passages=0,
            documents=0,
            factory=settings.factory,
            created=now(),
            updated=now(),
            details=details or {},
        )
        store = PassageStore.open(temporary / STORE_FILE)
        store.commit(manifest.to_state())
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

    ``writable`` takes the index's writer lock (held until ``close``), clears what unfinished commits left and
    records a migrated older format (read-only opens migrate in memory only)."""

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
        migrated_from = state.get("format")
        if migrated_from in MIGRATABLE_FORMATS:
            state = _migrate_format_2(state)
        elif migrated_from != FORMAT_VERSION:
            raise refuse(f"has format {migrated_from}, this code reads {FORMAT_VERSION}")
        else:
            migrated_from = None
        try:
            manifest = Manifest.from_state(state)
        except TypeError as error:
            raise refuse(f"has a state this code cannot read ({error})") from error
        settings = settings or IndexSettings(factory=manifest.factory)
        if settings.factory != manifest.factory:
            settings = replace(settings, factory=manifest.factory)
        dead = frozenset(store.dead_rows())
        segments = tuple(
            _LoadedSegment(segment, _read_vectors(folder, segment, settings, refuse), _dead_in(segment, dead))
            for segment in manifest.segments
        )
        template = _read_vectors(folder, manifest.trained, replace(settings, mmap=False), refuse) if manifest.trained \
            else None  # fmt: skip
        if migrated_from is not None and segments and not empty_index(manifest.factory, manifest.dimension).is_trained:
            template = faiss.read_index(str(folder / segments[0].segment.file))  # in memory, even when mapped
            template.reset()  # keeps what training learned, drops the vectors
        vectors = sum(s.vectors.ntotal for s in segments)
        counts = (vectors, store.count_passages(), store.count_documents(), len(dead))
        expected = (manifest.passages + manifest.dead_rows, manifest.passages, manifest.documents, manifest.dead_rows)
        wrong_dimension = [s.segment.file for s in segments if s.vectors.d != manifest.dimension]
        if counts != expected or wrong_dimension or any(s.vectors.ntotal != s.segment.vectors for s in segments):
            raise refuse(
                f"is inconsistent: its {len(segments)} segments hold {counts[0]} vectors, the store "
                f"{counts[1]} passages of {counts[2]} documents and {counts[3]} tombstones, its state says "
                f"{manifest.passages} of {manifest.documents} with {manifest.dead_rows} tombstones"
                + (f"; {', '.join(wrong_dimension)} not of dimension {manifest.dimension}" if wrong_dimension else "")
            )
        for loaded in segments:
            apply_search_params(loaded.vectors, settings.search_params)
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
        if migrated_from is not None:
            manifest = _record_migration(folder, store, manifest, template, migrated_from)
        _remove_orphans(folder, manifest)
    return PassageIndex(folder, manifest, _View(segments, dead), template, store, settings, writer)


def _migrate_format_2(state: dict[str, Any]) -> dict[str, Any]:
    """Format 2 kept one vectors file holding every vector: it becomes the one segment of format 3."""
    state = dict(state)
    file, size, sha256 = state.pop("vectors_file"), state.pop("vectors_bytes"), state.pop("vectors_sha256")
    vectors = state["passages"] + state.get("dead_rows", 0)
    number = int(file.removeprefix("vectors-").removesuffix(".faiss"))
    state["segments"] = [
        {"file": file, "bytes": size, "digest": f"sha256:{sha256}", "vectors": vectors, "first_row": 0,
         "end_row": state.get("next_row", 0)}
    ] if vectors else []  # fmt: skip
    state.update(format=FORMAT_VERSION, next_file=number + 1, trained=None)
    return state


def _record_migration(
    folder: Path, store: PassageStore, manifest: Manifest, template: faiss.Index | None, old_format: int
) -> Manifest:
    if template is not None:
        trained = write_vectors(template, folder / trained_file_name(manifest.next_file), 0, 0)
        manifest = replace(manifest, trained=trained, next_file=manifest.next_file + 1)
    store.commit(manifest.to_state())
    write_manifest_copy(folder, manifest)
    logger.info("migrated the index at {} from format {} to {} (its vectors file is now one segment)",
                folder, old_format, FORMAT_VERSION)  # fmt: skip
    return manifest


def _read_vectors(folder: Path, segment: Segment, settings: IndexSettings, refuse: Any) -> faiss.Index:
    path = folder / segment.file
    algorithm = segment.digest.split(":", 1)[0]
    try:
        actual = describe_file(path, algorithm)
    except OSError as error:
        raise refuse(f"is missing {segment.file} ({error.strerror})") from error
    if actual != (segment.bytes, segment.digest):
        raise refuse(f"is damaged: {segment.file} is not the file its state describes ({actual[0]} bytes, {actual[1]})")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if settings.mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as error:
        raise refuse(f"could not be read: {segment.file}: {error}") from error


def _remove_orphans(folder: Path, manifest: Manifest) -> None:
    # Files of commits and compactions that never reached the store (a crash between the two writes), and
    # segments a compaction replaced but had not deleted yet.
    current = {segment.file for segment in manifest.segments} | ({manifest.trained.file} if manifest.trained else set())
    for pattern in ("vectors-*.faiss", "trained-*.faiss", "*.partial"):
        for path in folder.glob(pattern):
            if path.name not in current and not path.name.startswith("."):
                logger.info("removing {}: left by a commit or compaction that did not finish", path)
                path.unlink(missing_ok=True)
