"""Ingest: documents -> passages -> vectors -> an index folder, with a progress bar and a timing report."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger
from tqdm import tqdm

from services.retrieval.chunker import SENTENCES_PER_PASSAGE, passages_of
from services.retrieval.corpus import Document
from services.retrieval.embedder import Embedder
from services.retrieval.index import IndexWriter

BATCH_SIZE = 64


@dataclass(frozen=True)
class BuildReport:
    folder: Path
    passages: int
    documents: int
    seconds: float

    @property
    def passages_per_second(self) -> float:
        return self.passages / self.seconds if self.seconds > 0 else 0.0


def build_index(
    documents: Iterable[Document],
    embedder: Embedder,
    destination: Path,
    batch_size: int = BATCH_SIZE,
    details: dict[str, Any] | None = None,
    progress: bool = True,
) -> BuildReport:
    """Writes a complete index to ``destination`` (replacing any there) or, on any failure, nothing."""
    started = time.perf_counter()
    documents = list(documents)
    passages = [passage for document in documents for passage in passages_of(document)]
    # Each batch is padded to its longest text; batching similar lengths encoded 1.3-1.8x faster here
    # (768 Wikipedia passages, 2 busy CPU cores). Faiss ids follow this order; passage ids do not change.
    passages.sort(key=lambda passage: len(passage.text))
    details = {"sentences_per_passage": SENTENCES_PER_PASSAGE, **(details or {})}
    with IndexWriter(destination, embedder.name, embedder.dimension, details) as writer:
        with tqdm(
            total=len(passages), desc=f"indexing {destination.name}", unit="passage", disable=not progress
        ) as bar:
            for start in range(0, len(passages), batch_size):
                batch = passages[start : start + batch_size]
                writer.add(batch, embedder.encode([passage.text for passage in batch], batch_size))
                bar.update(len(batch))
        manifest = writer.commit()
    report = BuildReport(destination, manifest.passages, manifest.documents, time.perf_counter() - started)
    logger.info(
        "built {}: {} passages from {} documents in {:.1f}s ({:.1f} passages/s)",
        destination,
        report.passages,
        report.documents,
        report.seconds,
        report.passages_per_second,
    )
    return report
