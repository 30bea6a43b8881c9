"""Documents in, passages committed: validate, chunk, embed in length-sorted batches, commit in one step."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from loguru import logger
from tqdm import tqdm

from nightcap.records import AddReport, DeleteReport
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.retrieval.chunker import SENTENCES_PER_PASSAGE, Passage, passages_of
from services.retrieval.corpus import Document
from services.retrieval.embedder import Embedder
from services.retrieval.index import Change, PassageIndex

# Passages per encode call: one batch. The embedder serves one call at a time, so a search arriving during
# ingestion waits for at most one batch (about half a second on 2 CPU cores). The passages arrive sorted by
# length, so each batch pads little; `make bench` measures what the many calls cost against one big encode.
ENCODE_CALL = 32
BATCH_SIZE = 32  # sentence-transformers' own default; 32 and 64 measured the same here within noise


@dataclass(frozen=True)
class Chunking:
    sentences: int = SENTENCES_PER_PASSAGE
    overlap: int = 0

    def __post_init__(self) -> None:
        if self.sentences < 1 or not 0 <= self.overlap < self.sentences:
            raise ValueError(
                f"passages need at least 1 sentence and an overlap of 0 to sentences-1; got {self.sentences} "
                f"sentences with overlap {self.overlap}"
            )


class IngestStopped(Exception):
    """``add`` was told to stop between two encode batches: nothing of that call was committed."""


def validate_documents(documents: Iterable[Document]) -> list[Document]:
    """All of them, or an InvalidArgument naming the first bad one (so nothing is half-added)."""
    checked: list[Document] = []
    seen: set[str] = set()
    for number, document in enumerate(documents, 1):
        if not document.id.strip():
            raise InvalidArgument(f"document {number} has no id: every document needs a unique id")
        if not document.text.strip():
            raise InvalidArgument(f"document {document.id!r} is empty: it has no text to index")
        if document.id in seen:
            raise InvalidArgument(f"document id {document.id!r} appears twice in one call; ids must be unique")
        seen.add(document.id)
        checked.append(document)
    if not checked:
        raise InvalidArgument("no documents were sent")
    return checked


class Ingestor:
    def __init__(
        self,
        embedder: Embedder,
        index: PassageIndex,
        chunking: Chunking = Chunking(),
        batch_size: int = BATCH_SIZE,
        progress: bool = False,
    ) -> None:
        if embedder.dimension != index.manifest.dimension:
            raise FailedPrecondition(
                f"the embedder {embedder.name} makes {embedder.dimension}-dimensional vectors but the index at "
                f"{index.folder} holds {index.manifest.dimension}-dimensional ones from {index.manifest.embedder}"
            )
        self.embedder = embedder
        self.index = index
        self.chunking = chunking
        self.batch_size = batch_size
        self.progress = progress

    def add(self, documents: Iterable[Document], stop: threading.Event | None = None) -> AddReport:
        """Chunks, embeds and commits the documents as one transaction; an existing id is replaced. Once
        ``stop`` is set it raises IngestStopped before the next encode batch (a commit under way finishes)."""
        if self.index.read_only:
            raise FailedPrecondition(f"the index at {self.index.folder} is read-only; documents cannot be added")
        started = time.perf_counter()
        checked = validate_documents(documents)
        passages = [
            passage
            for document in checked
            for passage in passages_of(document, self.chunking.sentences, self.chunking.overlap)
        ]
        vectors = self.embed(passages, stop)
        commit = self.index.commit(Change(passages=passages, vectors=vectors))
        report = AddReport(
            documents_added=len(checked) - commit.documents_removed,
            documents_replaced=commit.documents_removed,
            passages_added=commit.passages_added,
            passages_removed=commit.passages_removed,
            passages_total=commit.manifest.passages,
            documents_total=commit.manifest.documents,
            seconds=time.perf_counter() - started,
        )
        logger.info(
            "committed {} documents ({} replaced): {} passages in {:.1f}s ({:.1f} passages/s); index now {} passages",
            len(checked),
            report.documents_replaced,
            report.passages_added,
            report.seconds,
            report.passages_per_second,
            report.passages_total,
        )
        return report

    def delete(self, ids: Sequence[str]) -> DeleteReport:
        if self.index.read_only:
            raise FailedPrecondition(f"the index at {self.index.folder} is read-only; documents cannot be deleted")
        wanted = list(dict.fromkeys(ids))
        if not wanted or not all(doc_id.strip() for doc_id in wanted):
            raise InvalidArgument("name the documents to delete by their ids (none, or an empty id, was given)")
        present = self.index.documents_present(wanted)
        missing = [doc_id for doc_id in wanted if doc_id not in present]
        if missing:
            shown = ", ".join(repr(doc_id) for doc_id in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise NotFound(f"{len(missing)} of the documents to delete are not in the index: {shown}; none deleted")
        commit = self.index.commit(Change(remove_documents=wanted))
        return DeleteReport(
            commit.documents_removed, commit.passages_removed, commit.manifest.passages, commit.manifest.documents
        )

    def embed(self, passages: Sequence[Passage], stop: threading.Event | None = None) -> np.ndarray:
        """Vectors in the passages' order, encoded shortest first so each batch pads little."""
        vectors = np.empty((len(passages), self.embedder.dimension), dtype=np.float32)
        order = sorted(range(len(passages)), key=lambda i: len(passages[i].text))
        with tqdm(total=len(passages), desc="embedding", unit="passage", disable=not self.progress) as bar:
            for start in range(0, len(order), ENCODE_CALL):
                if stop is not None and stop.is_set():
                    raise IngestStopped(f"stopped after embedding {start} of {len(passages)} passages")
                picked = order[start : start + ENCODE_CALL]
                vectors[picked] = self.embedder.encode([passages[i].text for i in picked], self.batch_size)
                bar.update(len(picked))
        return vectors
