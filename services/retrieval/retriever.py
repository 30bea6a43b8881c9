"""Query text -> the k closest passages: the embedder and a loaded index, checked to belong together."""

from __future__ import annotations

from loguru import logger

from services.common.errors import InvalidArgument
from services.retrieval.embedder import Embedder
from services.retrieval.index import Hit, IndexLoadError, PassageIndex

DEFAULT_K = 3
MAX_K = 100  # documented in retrieval.proto; enough context for any prompt, small enough to stay fast


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

    def search(self, query: str, k: int = DEFAULT_K) -> list[Hit]:
        if not query.strip():
            raise InvalidArgument("query is empty: send the question or text to search for")
        if not 1 <= k <= MAX_K:
            raise InvalidArgument(f"k must be between 1 and {MAX_K} (or unset for {DEFAULT_K}); got {k}")
        return self.index.search(self.embedder.encode([query])[0], k)
