"""Build a whole index from a corpus at once (the default Wikipedia one): a new index in a hidden folder, fed
by the Ingestor in one commit, then renamed over the old one, so readers see the old index or the new one."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

from services.retrieval.corpus import Document
from services.retrieval.embedder import Embedder
from services.retrieval.index import (
    IndexSettings,
    WriterLock,
    create_index,
    load_index,
    move_into_place,
    remove_leftovers,
)
from services.retrieval.ingest import BATCH_SIZE, Chunking, Ingestor

__all__ = ["BATCH_SIZE", "BuildReport", "build_index"]

DEFAULT_SETTINGS = IndexSettings()
DEFAULT_CHUNKING = Chunking()


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
    settings: IndexSettings = DEFAULT_SETTINGS,
    chunking: Chunking = DEFAULT_CHUNKING,
) -> BuildReport:
    """Writes a complete index to ``destination`` (replacing any there) or, on any failure, nothing."""
    started = time.perf_counter()
    details = {"sentences_per_passage": chunking.sentences, "overlap": chunking.overlap, **(details or {})}
    lock = WriterLock(destination)
    remove_leftovers(destination)
    temporary = destination.parent / f".{destination.name}.building-{os.getpid()}-full"
    try:
        create_index(temporary, embedder.name, embedder.dimension, settings, details, replace_existing=True)
        index = load_index(temporary, settings, writable=True)
        try:
            report = Ingestor(embedder, index, chunking, batch_size, progress).add(documents)
        finally:
            index.close()
        move_into_place(temporary, destination, replace_existing=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    finally:
        (temporary.parent / f".{temporary.name}.lock").unlink(missing_ok=True)  # the temporary folder's lock
        lock.release()
    built = BuildReport(destination, report.passages_total, report.documents_total, time.perf_counter() - started)
    logger.info(
        "built {}: {} passages from {} documents in {:.1f}s ({:.1f} passages/s)",
        destination,
        built.passages,
        built.documents,
        built.seconds,
        built.passages_per_second,
    )
    return built
