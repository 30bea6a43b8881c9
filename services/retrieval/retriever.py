"""Query text -> the k best passages, with concurrent queries batched into one encode and one faiss search.

A search is ``hybrid`` (the vector and keyword rankings fused by their scaled scores), ``vector`` or ``keyword``;
an optional cross-encoder then reorders the top of it. Whatever ranks them, each passage reports its cosine
similarity to the query, so a score floor and the orchestrator's weighted fusion of searches mean one thing.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
from loguru import logger

from nightcap.records import DEFAULT_K, MAX_K, IndexStats
from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.retrieval.build_plan import recorded_build
from services.retrieval.chunker import Passage
from services.retrieval.embedder import Embedder
from services.retrieval.index import Hit, IndexLoadError, PassageIndex
from services.retrieval.reranker import Reranker

MAX_BATCH = 64  # queries per encode; more only lengthens the wait of the first one
MAX_TITLE_CHARS = 500
MAX_TITLED = 8  # documents a title lookup scores ("Mercury (planet)", "Mercury (element)", ...)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)

HYBRID, VECTOR, KEYWORD = "hybrid", "vector", "keyword"
SEARCH_MODES = (HYBRID, VECTOR, KEYWORD)
# Passages each ranking contributes to a fusion, and that a reranker reads: deep enough that a passage ranked
# low by one side and high by the other still meets its other score, shallow enough to cost little (a Flat
# search of 20 costs what a search of 3 does; a cross-encoder pays per passage).
CANDIDATES = 20
# The vector side's share of a fused score (Weaviate's alpha); the keyword side has the rest.
VECTOR_WEIGHT = 0.5


class Searchable(Protocol):
    """What the servicer searches: a nightcap PassageIndex with its embedder, or an OpenChatKit index.
    ``titles``: per query, a document title it asks about ("" for none); indexes without titles ignore it."""

    read_only: bool
    embedder: Embedder

    def search_batch(self, queries: list[str], k: int, titles: list[str] | None = None) -> list[list[Hit]]: ...

    def stats(self) -> IndexStats: ...


def search_modes(searchable: Searchable) -> tuple[str, ...]:
    """The modes ``searchable`` answers: an index without a keyword index (OpenChatKit's) only ``vector``."""
    return getattr(searchable, "search_modes", (VECTOR,))


def relative_score_fusion(
    vector: list[tuple[int, float]], keyword: list[tuple[int, float]], vector_weight: float = VECTOR_WEIGHT
) -> list[tuple[int, float, float | None]]:
    """The rows of both rankings, (row, cosine similarity) and (row, bm25), by a weighted sum of their scores,
    each side's scaled to 0..1 over its own candidates (min-max; a passage one side did not find gets 0 there; a
    staged one, which has no vector yet, is scored by its words alone). Returns (row, cosine or NaN when only its
    words found it, bm25 or None when only its vector did), best first; ties keep the vector order.

    Scores, not ranks (reciprocal rank fusion), because a rare term's match is a large bm25 margin that ranks
    throw away: asked "What pressure is V-2234 rated for?" of six valves that differ by number, the vectors put
    V-2231 first and V-2234 second, bm25 put V-2234 far ahead, and RRF still ranked V-2231 first."""
    fused: dict[int, float] = defaultdict(float)
    cosines: dict[int, float] = {}
    bm25s: dict[int, float] = {}
    for (row, cosine), scaled in zip(vector, _min_max([cosine for _, cosine in vector]), strict=True):
        fused[row] += vector_weight * scaled
        cosines[row] = cosine
    for (row, bm25), scaled in zip(keyword, _min_max([bm25 for _, bm25 in keyword]), strict=True):
        # a staged passage (negative row) has no vector for the vectors to judge it by (yet): its words judge it
        fused[row] += (1.0 if row < 0 else 1.0 - vector_weight) * scaled
        bm25s[row] = bm25
    rows = list(dict.fromkeys([*cosines, *bm25s]))  # the vector order first: a stable sort keeps it among ties
    return [(row, cosines.get(row, math.nan), bm25s.get(row)) for row in sorted(rows, key=lambda row: -fused[row])]


def _min_max(scores: list[float]) -> list[float]:
    # the best candidate gets 1, the last 0 (Weaviate's relativeScoreFusion). Scaling bm25 by its best score
    # instead (it has a true zero) found 31 of the eval's 36 number questions in the top 3, min-max 34.
    if not scores:
        return []
    low, high = min(scores), max(scores)
    return [1.0 if high == low else (score - low) / (high - low) for score in scores]


def check_request(query: str, k: int, title: str = "") -> None:
    if not query.strip():
        raise InvalidArgument("query is empty: send the question or text to search for")
    if not 1 <= k <= MAX_K:
        raise InvalidArgument(f"k must be between 1 and {MAX_K} (or unset for {DEFAULT_K}); got {k}")
    if len(title) > MAX_TITLE_CHARS:
        raise InvalidArgument(
            f"title is {len(title)} characters; a document title to look up is at most {MAX_TITLE_CHARS}"
        )


def look_up_title(index: PassageIndex, title: str) -> tuple[list[Passage], list[bool]]:
    """The first passage of each document titled ``title`` (as given, else with a qualifier in brackets, else
    without a leading "the / a / an"), and which of them carry the title exactly (those come first)."""
    looked_up, passages = title, index.first_passages_titled(title, MAX_TITLED)
    if not passages and (bare := _ARTICLE.sub("", title)) != title:
        looked_up, passages = bare, index.first_passages_titled(bare, MAX_TITLED)
    return passages, [p.title.casefold() == looked_up.casefold() for p in passages]


def titled_first(passages: list[Passage], exact: list[bool], scores: np.ndarray, found: list[Hit], k: int) -> list[Hit]:
    """``found`` with the looked-up ``passages`` ahead of it, k in all: exact titles first, then qualified
    ones by score. Each keeps its own score against the query (so a score floor still applies to it).

    A "What is X?" search ranks X's opening passage below passages that repeat the question's words, or misses
    it: "What is The Four Seasons?" found the article on the seasons, not "The Four Seasons (Vivaldi)", whose
    first sentence answers it."""
    qualified = sorted((i for i in range(len(passages)) if not exact[i]), key=lambda i: -scores[i])
    order = [*(i for i in range(len(passages)) if exact[i]), *qualified]
    leads = [Hit(passages[i], float(scores[i]), titled=True) for i in order][:k]
    ids = {hit.passage.id for hit in leads}
    return [*leads, *(hit for hit in found if hit.passage.id not in ids)][:k]


class Retriever:
    search_modes = SEARCH_MODES

    def __init__(self, embedder: Embedder, index: PassageIndex, reranker: Reranker | None = None) -> None:
        manifest = index.manifest
        if embedder.dimension != manifest.dimension:
            raise IndexLoadError(
                f"retrieval index at {index.folder} holds {manifest.dimension}-dimensional vectors from "
                f"{manifest.embedder}, but the embedder {embedder.name} makes {embedder.dimension}-dimensional "
                f"ones; serve it with --embedder {manifest.embedder}, or rebuild it for this one "
                f"(build-default --embedder {embedder.name} --force)"
            )
        if embedder.name != manifest.embedder:
            logger.warning(
                "index {} was built with {} but queries are embedded with {}; results may be poor",
                index.folder,
                manifest.embedder,
                embedder.name,
            )
        self.embedder = embedder
        self.index = index
        self.reranker = reranker
        # A hybrid search's keyword side runs here while the vector side runs on the caller's thread: SQLite and
        # faiss both release the GIL, so the two take about as long as the slower one, not their sum.
        self._keywords = ThreadPoolExecutor(1, thread_name_prefix="keyword-search")

    def search(
        self, query: str, k: int = DEFAULT_K, title: str = "", mode: str = HYBRID, rerank: bool | None = None
    ) -> list[Hit]:
        check_request(query, k, title)
        return self.search_batch([query], k, [title], mode, rerank)[0]

    @property
    def read_only(self) -> bool:
        return self.index.read_only

    def search_batch(
        self,
        queries: list[str],
        k: int,
        titles: list[str] | None = None,
        mode: str = HYBRID,
        rerank: bool | None = None,
    ) -> list[list[Hit]]:
        """``rerank``: reorder the top ``CANDIDATES`` with the reranker; None: whenever there is one."""
        if rerank and self.reranker is None:
            raise FailedPrecondition(
                "this retrieval service has no reranker: start it with --reranker, or search without rerank"
            )
        reranker = self.reranker if rerank is not False else None
        vectors = self.embedder.encode(queries)  # keyword searches too: a hit reports its cosine similarity
        depth = k if mode == VECTOR and reranker is None else max(k, CANDIDATES)
        if mode == VECTOR:
            found = self.index.search_many(vectors, depth)
        else:  # both sides by row; only the passages the fusion keeps are read (the reranker reads every one)
            keyword = self._keywords.submit(self._keyword_rows, queries, depth)
            by_vector = self.index.search_rows(vectors, depth) if mode != KEYWORD else [[] for _ in queries]
            kept = depth if reranker is not None else k
            fused = [relative_score_fusion(v, w)[:kept] for v, w in zip(by_vector, keyword.result(), strict=True)]
            found = self.index.hits(fused)
        if reranker is not None:
            found = [self._reranked(query, hits) for query, hits in zip(queries, found, strict=True)]
        found = self._with_cosines([hits[:k] for hits in found], vectors)
        looked_up = {
            i: look_up_title(self.index, title.strip()) for i, title in enumerate(titles or []) if title.strip()
        }
        looked_up = {i: match for i, match in looked_up.items() if match[0]}
        if looked_up:  # every looked-up passage of the batch in one encode, scored against its own query
            lead_vectors = self.embedder.encode([p.text for passages, _ in looked_up.values() for p in passages])
            start = 0
            for i, (passages, exact) in looked_up.items():
                scores = lead_vectors[start : start + len(passages)] @ vectors[i]
                start += len(passages)
                found[i] = titled_first(passages, exact, scores, found[i], k)
        return found

    def _keyword_rows(self, queries: list[str], depth: int) -> list[list[tuple[int, float]]]:
        return [self.index.keyword_rows(query, depth) for query in queries]

    def _reranked(self, query: str, hits: list[Hit]) -> list[Hit]:
        assert self.reranker is not None
        scores = self.reranker.score(query, [hit.passage.text for hit in hits])
        return [hits[i] for i in np.argsort(-scores, kind="stable")]

    def _with_cosines(self, found: list[list[Hit]], vectors: np.ndarray) -> list[list[Hit]]:
        """Fills in the cosine similarity of hits found by their words only: from the vectors the index holds,
        else (staged passages, not embedded yet) by embedding their text, all of the batch in one encode."""
        missing = [(i, j) for i, hits in enumerate(found) for j, hit in enumerate(hits) if math.isnan(hit.score)]
        if not missing:
            return found
        rows = [found[i][j].row for i, j in missing]
        stored = self.index.vectors_of([row for row in rows if row is not None and row >= 0])
        unstored = [key for key, row in zip(missing, rows, strict=True) if row not in stored]
        encoded = self.embedder.encode([found[i][j].passage.text for i, j in unstored]) if unstored else []
        embedded = dict(zip(unstored, encoded, strict=True))
        found = [list(hits) for hits in found]
        for (i, j), row in zip(missing, rows, strict=True):
            vector = stored[row] if row in stored else embedded[(i, j)]
            found[i][j] = replace(found[i][j], score=float(vector @ vectors[i]))
        return found

    def stats(self) -> IndexStats:
        manifest = self.index.manifest
        return IndexStats(
            passages=manifest.passages,
            documents=manifest.documents,
            dimension=manifest.dimension,
            embedder=manifest.embedder,
            index_type=manifest.factory,
            index_path=str(self.index.folder),
            bytes_on_disk=self.index.bytes_on_disk(),
            format="nightcap",
            generation=manifest.generation,
            segments=len(manifest.segments),
            tombstones=manifest.dead_rows,
            build=recorded_build(manifest.details, manifest.documents, manifest.passages),
            reranker=self.reranker.name if self.reranker is not None else "",
        )


@dataclass
class _Pending:
    query: str
    k: int
    result: Future
    title: str = ""
    mode: str = VECTOR
    rerank: bool | None = None


class QueryBatcher:
    """Serves many concurrent searches with one worker thread: whatever queued while it was busy becomes the
    next batch, so one caller waits no extra time and a hundred share one encode instead of taking turns."""

    def __init__(self, searchable: Searchable, max_batch: int = MAX_BATCH) -> None:
        self._searchable = searchable
        self._max_batch = max_batch
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="query-batcher", daemon=True)
        self._worker.start()

    def search(
        self,
        query: str,
        k: int = DEFAULT_K,
        timeout: float | None = None,
        title: str = "",
        mode: str = VECTOR,
        rerank: bool | None = None,
    ) -> list[Hit]:
        """``mode``: one of the searchable's ``search_modes`` (the servicer checks it); ``rerank``: as
        ``Retriever.search_batch`` takes it (None: the searchable's default)."""
        check_request(query, k, title)
        if self._closed:
            raise Unavailable("the retrieval service is shutting down")
        pending = _Pending(query, k, Future(), title, mode, rerank)
        self._queue.put(pending)
        return pending.result.result(timeout)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            # one search per kind the batch asks for
            for mode, rerank in dict.fromkeys((p.mode, p.rerank) for p in batch):
                self._search([p for p in batch if (p.mode, p.rerank) == (mode, rerank)], mode, rerank)

    def _search(self, batch: list[_Pending], mode: str, rerank: bool | None) -> None:
        try:
            titles = [p.title for p in batch] if any(p.title for p in batch) else None
            queries, k = [p.query for p in batch], max(p.k for p in batch)
            if search_modes(self._searchable) == (VECTOR,):  # an index that knows no other mode, nor a reranker
                found = self._searchable.search_batch(queries, k, titles)
            else:
                found = self._searchable.search_batch(queries, k, titles, mode, rerank)  # type: ignore[call-arg]
        except Exception as error:  # every caller of the batch gets the error, the worker goes on
            for pending in batch:
                pending.result.set_exception(error)
            return
        for pending, hits in zip(batch, found, strict=True):
            pending.result.set_result(hits[: pending.k])

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=10)
