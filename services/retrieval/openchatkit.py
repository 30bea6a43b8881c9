"""OpenChatKit's Wikipedia index (``wikipedia-3sentence-level-retrieval-index``), read as it was published.

The folder holds ``knn.index`` (faiss, raw mean-pooled facebook/contriever-msmarco vectors, inner product) and
``wikipedia-en-sentences.parquet`` (one ``text_snippet`` per faiss id, in order). A search takes each hit and,
as OpenChatKit's ``retrieval/wikipedia.py`` does, grows it with up to ``w`` adjacent snippets on each side while
their cosine similarity to the hit stays above ``w_th`` (defaults k=1, w=5, w_th=0.5). It is read-only.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from services.retrieval.chunker import Passage
from services.retrieval.embedder import Embedder
from services.retrieval.index import Hit, IndexLoadError
from services.retrieval.retriever import IndexStats

HUB_DATASET = "ChristophSchuhmann/wikipedia-3sentence-level-retrieval-index"
OPENCHATKIT_EMBEDDER = "facebook/contriever-msmarco"
INDEX_FILE = "knn.index"
SNIPPETS_FILE = "wikipedia-en-sentences.parquet"
SNIPPET_COLUMN = "text_snippet"
SOURCE = "wikipedia-3sentence-level-retrieval-index"


@dataclass(frozen=True)
class Expansion:
    w: int = 5  # adjacent snippets tried on each side of a hit
    w_th: float = 0.5  # cosine similarity to the hit that a neighbour must exceed to be added


def find_openchatkit_files(folder: Path) -> Path | None:
    """The folder holding knn.index and the parquet: ``folder`` itself or its ``files/`` (OpenChatKit's layout)."""
    for candidate in (folder, folder / "files"):
        if (candidate / INDEX_FILE).is_file() and (candidate / SNIPPETS_FILE).is_file():
            return candidate
    return None


class SnippetTable:
    """Random access to one column of a large parquet file, a row group at a time (the English Wikipedia file
    does not fit in memory as a DataFrame, which is how OpenChatKit read it)."""

    def __init__(self, path: Path, column: str = SNIPPET_COLUMN, cached_groups: int = 8) -> None:
        self._file = pq.ParquetFile(path, memory_map=True)
        if column not in self._file.schema_arrow.names:
            raise IndexLoadError(f"{path} has no {column!r} column (it has {', '.join(self._file.schema_arrow.names)})")
        self._column = column
        self._starts = [0]
        for group in range(self._file.num_row_groups):
            self._starts.append(self._starts[-1] + self._file.metadata.row_group(group).num_rows)
        self._cache: OrderedDict[int, list[str]] = OrderedDict()
        self._cached_groups = cached_groups
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, row: int) -> str:
        if not 0 <= row < len(self):
            raise IndexError(row)
        group = bisect.bisect_right(self._starts, row) - 1
        with self._lock:
            texts = self._cache.get(group)
            if texts is None:
                texts = self._file.read_row_group(group, columns=[self._column]).column(0).to_pylist()
                self._cache[group] = texts
                if len(self._cache) > self._cached_groups:
                    self._cache.popitem(last=False)
            self._cache.move_to_end(group)
        return texts[row - self._starts[group]]


class OpenChatKitIndex:
    """Searchable like a nightcap index; the embedder must be the one the index was built with (contriever)."""

    read_only = True

    def __init__(self, folder: Path, embedder: Embedder, expansion: Expansion = Expansion(), mmap: bool = True) -> None:
        files = find_openchatkit_files(folder)
        if files is None:
            raise IndexLoadError(
                f"{folder} is not an OpenChatKit index: it needs {INDEX_FILE} and {SNIPPETS_FILE} (or a files/ "
                "folder holding them); `python -m services.retrieval prepare-openchatkit` downloads them"
            )
        if embedder.normalize:
            raise ValueError(
                "OpenChatKit's index holds raw mean-pooled vectors: load the embedder with normalize=False"
            )
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
        try:
            self._vectors = faiss.read_index(str(files / INDEX_FILE), flags)
        except RuntimeError as error:
            raise IndexLoadError(f"could not read {files / INDEX_FILE}: {error}") from error
        self.snippets = SnippetTable(files / SNIPPETS_FILE)
        if self._vectors.ntotal != len(self.snippets):
            raise IndexLoadError(
                f"OpenChatKit index at {files} is inconsistent: {INDEX_FILE} holds {self._vectors.ntotal} vectors, "
                f"{SNIPPETS_FILE} {len(self.snippets)} snippets"
            )
        if self._vectors.d != embedder.dimension:
            raise IndexLoadError(
                f"OpenChatKit index at {files} holds {self._vectors.d}-dimensional vectors but the embedder "
                f"{embedder.name} makes {embedder.dimension}-dimensional ones; serve it with --embedder "
                f"{OPENCHATKIT_EMBEDDER}"
            )
        self.folder = files
        self.embedder = embedder
        self.expansion = expansion

    @property
    def passages(self) -> int:
        return self._vectors.ntotal

    @property
    def dimension(self) -> int:
        return self._vectors.d

    def bytes_on_disk(self) -> int:
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.is_file())

    def search_batch(self, queries: list[str], k: int, titles: list[str] | None = None) -> list[list[Hit]]:
        # OpenChatKit's snippets keep no titles: a title lookup finds nothing, the vector search answers
        scores, rows = self._vectors.search(self.embedder.encode(queries), k)
        return [
            [
                self._expanded_hit(int(row), float(score))
                for row, score in zip(row_list, score_list, strict=True)
                if row >= 0
            ]
            for row_list, score_list in zip(rows, scores, strict=True)
        ]

    def _expanded_hit(self, row: int, score: float) -> Hit:
        first, last = self.expand(row)
        text = " ".join(self.snippets[r].strip() for r in range(first, last + 1))
        passage = Passage(id=f"snippet-{row}", doc_id=str(row), title="", text=text, source=SOURCE)
        return Hit(passage, score)

    def expand(self, row: int) -> tuple[int, int]:
        """The first and last snippet row of the hit at ``row`` grown by its similar neighbours."""
        w, threshold = self.expansion.w, self.expansion.w_th
        if w == 0:
            return row, row
        window = list(range(max(0, row - w), min(len(self.snippets), row + w + 1)))
        vectors = self.embedder.encode([self.snippets[r] for r in window])
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True).clip(min=1e-12)
        similarity = dict(zip(window, vectors @ vectors[window.index(row)], strict=True))
        first = last = row
        while first - 1 in similarity and similarity[first - 1] > threshold:
            first -= 1
        while last + 1 in similarity and similarity[last + 1] > threshold:
            last += 1
        return first, last

    def stats(self) -> IndexStats:
        return IndexStats(
            passages=self.passages,
            documents=self.passages,
            dimension=self.dimension,
            embedder=self.embedder.name,
            index_type=type(faiss.downcast_index(self._vectors)).__name__,
            index_path=str(self.folder),
            bytes_on_disk=self.bytes_on_disk(),
            format="openchatkit",
            generation=0,
            segments=1,
            tombstones=0,
        )

    def close(self) -> None:
        pass
