"""What a compaction computes: ``merge_segments`` builds one index holding the live vectors of several
segments, by copying IVF inverted lists code by code (``merge_inverted_lists``) or by re-adding decoded vectors
(``decode_segment``) for the other index types. ``PassageIndex.compact`` takes the snapshot, writes the merged
segment and commits it; ``CompactReport`` is what it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from services.retrieval.index.manifest import Manifest, Segment

# Vectors re-added per call while compacting: bounds the extra memory to this many decoded vectors.
COMPACT_CHUNK = 65_536


@dataclass(frozen=True)
class CompactReport:
    segments_before: int
    segments_after: int
    vectors_dropped: int  # tombstoned vectors removed from disk
    bytes_before: int
    bytes_after: int
    seconds: float
    manifest: Manifest


def merge_segments(
    folder: Path, segments: Sequence[Segment], dead: frozenset[int], template: faiss.Index
) -> tuple[faiss.Index, int]:
    """One index holding the live vectors of ``segments`` (each read into memory in turn, never mapped), built
    on a clone of ``template``: the empty (trained) index every segment was made from."""
    merged = faiss.clone_index(template)
    dead_rows = np.fromiter(dead, dtype=np.int64, count=len(dead))
    if faiss.try_extract_index_ivf(merged) is not None:
        return merged, merge_inverted_lists(merged, [folder / s.file for s in segments], dead_rows)
    # Flat, HNSW, PQ: decoded vectors re-added (exact for Flat and HNSW; a decoded PQ vector encodes back to
    # its own code). HNSW has no merge_from, and a new graph is how its removed vectors really go.
    for segment in segments:
        ids, vectors = decode_segment(folder / segment.file)
        live = ~np.isin(ids, dead_rows)
        for start in range(0, len(ids), COMPACT_CHUNK):
            window = slice(start, start + COMPACT_CHUNK)
            if live[window].any():
                merged.add_with_ids(vectors[window][live[window]], ids[window][live[window]])
        del vectors
    return merged, int(merged.ntotal)


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
