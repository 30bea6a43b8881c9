"""Searching an index: ``SearchView`` is the set of loaded segments and tombstones one search sees (a commit
swaps in a new one whole), and ``search_segments`` queries every segment, over-fetching by its tombstones, and
merges the per-segment top lists into the k best live passages for each query."""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from services.retrieval.chunker import Passage
from services.retrieval.index.manifest import Segment
from services.retrieval.store import PassageStore


@dataclass(frozen=True)
class Hit:
    passage: Passage
    score: float
    titled: bool = False  # found by its document's title (a search's ``title``), not by its vector
    row: int | None = None  # its row in the store (negative: staged, no vector yet); None when not known
    bm25: float | None = None  # found by its words: how well they match (higher is better); None otherwise


@dataclass(frozen=True)
class LoadedSegment:
    segment: Segment
    vectors: faiss.Index
    dead: int  # tombstones among this segment's rows: searches over-fetch by this many


@dataclass(frozen=True)
class SearchView:
    """What a search sees: swapped whole by a commit, so a search never sees half of one."""

    segments: tuple[LoadedSegment, ...]
    dead: frozenset[int]


def dead_in(segment: Segment, dead: frozenset[int] | set[int]) -> int:
    if not dead:
        return 0
    rows = np.fromiter(dead, dtype=np.int64, count=len(dead))
    return int(np.count_nonzero((rows >= segment.first_row) & (rows < segment.end_row)))


def search_segments(view: SearchView, store: PassageStore, queries: np.ndarray, k: int) -> list[list[Hit]]:
    results = []
    for best in best_rows(view, queries, k):
        passages = store.get([row for row, _ in best])
        results.append([Hit(p, score, row=row) for p, (row, score) in zip(passages, best, strict=True)])
    return results


def best_rows(view: SearchView, queries: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """The k best (row, cosine similarity) of every segment together, for each query, best first."""
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
        results.append(best)
    return results
