"""The open index: ``PassageIndex`` searches its segments and takes commits that searches never see half of,
and compacts them with commits going on beside it; ``Change`` is what one commit does and ``CommitReport`` what
it did. The locks and the swap of the searched view live here; the merge, the file writes and the search over
segments are in the sibling modules."""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import faiss
import numpy as np
from loguru import logger

from services.common.errors import FailedPrecondition
from services.retrieval.chunker import Passage
from services.retrieval.index.compaction import CompactReport, merge_segments
from services.retrieval.index.factory import apply_search_params, empty_index, keep_reconstructible
from services.retrieval.index.files import WriterLock, write_manifest_copy, write_vectors
from services.retrieval.index.manifest import IndexSettings, Manifest, now, trained_file_name, vectors_file_name
from services.retrieval.index.search import Hit, LoadedSegment, SearchView, best_rows, dead_in, search_segments
from services.retrieval.store import PassageStore


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


class PassageIndex:
    """A loaded index: batched search over its segments, and commits that searches never see half of."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        view: SearchView,
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
            return search_segments(self._view, self._store, queries, k)
        except KeyError:  # a commit removed a found passage between the faiss search and the store lookup
            with self._swap_lock:
                return search_segments(self._view, self._store, queries, k)

    def search_rows(self, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
        """``search_many`` without reading the passages: (row, cosine similarity), best first. ``hits`` reads
        them, for the rows a fusion keeps."""
        return best_rows(self._view, np.ascontiguousarray(queries, dtype=np.float32), k)

    def keyword_rows(self, query: str, k: int) -> list[tuple[int, float]]:
        """``keyword_search`` without reading the passages: (row, bm25), best first; staged rows are negative."""
        return self._store.words.search(query, k)

    def hits(self, found: Sequence[Sequence[tuple[int, float, float | None]]]) -> list[list[Hit]]:
        """(row, score, bm25) lists as Hits with their passages, all read in one go; a row whose passage a
        commit removed since it was found is left out."""
        passages = self._store.passages_at({row for rows in found for row, _, _ in rows})
        return [
            [Hit(passages[row], score, row=row, bm25=bm25) for row, score, bm25 in rows if row in passages]
            for rows in found
        ]

    def keyword_search(self, query: str, k: int) -> list[Hit]:
        """The k passages whose words best match ``query`` by bm25, committed or staged, best first. Their
        scores are NaN: bm25 (``Hit.bm25``) does not compare with the cosine similarity a Hit reports
        (``vectors_of`` has that)."""
        return self.hits([[(row, math.nan, bm25) for row, bm25 in self.keyword_rows(query, k)]])[0]

    def stage(self, passages: Sequence[Passage]) -> None:
        """Makes passages that have no vectors yet searchable by their words (a background build's corpus)."""
        self._check_writable("passages cannot be staged")
        self._store.stage(passages)

    def vectors_of(self, rows: Sequence[int]) -> dict[int, np.ndarray]:
        """The stored vectors of these rows, where the segment can give them back (Flat and HNSW can, IVF
        without a direct map cannot; staged rows have none)."""
        view, found = self._view, {}
        for row in rows:
            for loaded in view.segments:
                if loaded.segment.first_row <= row < loaded.segment.end_row and row not in view.dead:
                    with contextlib.suppress(RuntimeError):  # this index type keeps no way back from id to vector
                        found[row] = loaded.vectors.reconstruct(int(row))
                    break
        return found

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
                segments = tuple(replace(s, dead=dead_in(s.segment, dead)) for s in (*self._view.segments, *loaded))
                with self._swap_lock:
                    self._store.commit(manifest.to_state(), added, removed_rows, removed_rows)
                    self._view, self.manifest, self._template = (
                        SearchView(segments, frozenset(dead)),
                        manifest,
                        template,
                    )
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
            write_manifest_copy(self.folder, manifest)
        self._maybe_compact_in_background()
        return CommitReport(len(added), len(removed_rows), len(replaced), manifest)

    def _write_segment(
        self, old: Manifest, change: Change, written: list[Path]
    ) -> tuple[Manifest, tuple[LoadedSegment, ...], list[tuple[int, Passage]], faiss.Index | None]:
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
        keep_reconstructible(vectors)
        manifest = replace(
            old,
            segments=(*old.segments, segment),
            trained=trained,
            next_row=old.next_row + len(rows),
            next_file=self._next_file,
        )
        added = list(zip(rows.tolist(), change.passages, strict=True))
        return manifest, (LoadedSegment(segment, vectors, 0),), added, template

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
            template = self._template
            if template is None:
                template = empty_index(self.manifest.factory, self.manifest.dimension)
            merged, kept = merge_segments(self.folder, snapshot.segments, dead, template)
            written = self.folder / vectors_file_name(number)
            try:
                merged_loaded: tuple[LoadedSegment, ...] = ()
                if kept:
                    first, end = snapshot.segments[0].first_row, snapshot.segments[-1].end_row
                    segment = write_vectors(merged, written, first, end)
                    if self.settings.mmap:
                        merged = faiss.read_index(str(written), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
                    apply_search_params(merged, self.settings.search_params)
                    keep_reconstructible(merged)
                    merged_loaded = (LoadedSegment(segment, merged, 0),)
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
                        replace(s, dead=dead_in(s.segment, remaining))
                        for s in (*merged_loaded, *self._view.segments[len(snapshot.segments) :])
                    )
                    with self._swap_lock:
                        self._store.commit(manifest.to_state(), cleared_dead_rows=sorted(dead))
                        self._view, self.manifest = SearchView(loaded, remaining), manifest
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

    def first_passages_titled(self, title: str, limit: int) -> list[Passage]:
        """The first passage of each document titled ``title`` (or "``title`` (qualifier)"), exact titles first;
        then those of staged documents (a build's, not embedded yet)."""
        found = self._store.first_passages_titled(title, limit)
        if len(found) < limit:
            found += self._store.first_staged_passages_titled(title, limit - len(found))
        return found

    def documents_present(self, doc_ids: Sequence[str]) -> set[str]:
        return set(self._store.rows_of_documents(doc_ids))

    def bytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.folder.rglob("*") if path.is_file())  # words/ too

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
