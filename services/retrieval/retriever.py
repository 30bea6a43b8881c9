"""Query text -> the k closest passages, with concurrent queries batched into one encode and one faiss search."""

from __future__ import annotations

import queue
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from loguru import logger

from nightcap.records import DEFAULT_K, MAX_K, IndexStats
from services.common.errors import InvalidArgument, Unavailable
from services.retrieval.build_plan import recorded_build
from services.retrieval.chunker import Passage
from services.retrieval.embedder import Embedder
from services.retrieval.index import Hit, IndexLoadError, PassageIndex

MAX_BATCH = 64  # queries per encode; more only lengthens the wait of the first one
MAX_TITLE_CHARS = 500
MAX_TITLED = 8  # documents a title lookup scores ("Mercury (planet)", "Mercury (element)", ...)
_ARTICLE = re.compile(r"^(?:the|a|an)\s+", re.IGNORECASE)


class Searchable(Protocol):
    """What the servicer searches: a nightcap PassageIndex with its embedder, or an OpenChatKit index.
    ``titles``: per query, a document title it asks about ("" for none); indexes without titles ignore it."""

    read_only: bool
    embedder: Embedder

    def search_batch(self, queries: list[str], k: int, titles: list[str] | None = None) -> list[list[Hit]]: ...

    def stats(self) -> IndexStats: ...


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
    def __init__(self, embedder: Embedder, index: PassageIndex) -> None:
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

    def search(self, query: str, k: int = DEFAULT_K, title: str = "") -> list[Hit]:
        check_request(query, k, title)
        return self.search_batch([query], k, [title])[0]

    @property
    def read_only(self) -> bool:
        return self.index.read_only

    def search_batch(self, queries: list[str], k: int, titles: list[str] | None = None) -> list[list[Hit]]:
        vectors = self.embedder.encode(queries)
        found = self.index.search_many(vectors, k)
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
        )


@dataclass
class _Pending:
    query: str
    k: int
    result: Future
    title: str = ""


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

    def search(self, query: str, k: int = DEFAULT_K, timeout: float | None = None, title: str = "") -> list[Hit]:
        check_request(query, k, title)
        if self._closed:
            raise Unavailable("the retrieval service is shutting down")
        pending = _Pending(query, k, Future(), title)
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
            try:
                titles = [p.title for p in batch] if any(p.title for p in batch) else None
                found = self._searchable.search_batch([p.query for p in batch], max(p.k for p in batch), titles)
            except Exception as error:  # every caller of the batch gets the error, the worker goes on
                for pending in batch:
                    pending.result.set_exception(error)
                continue
            for pending, hits in zip(batch, found, strict=True):
                pending.result.set_result(hits[: pending.k])

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=10)
