"""What an index is on disk, as data: the file names and format constants, the settings an index is opened
with, its immutable segments and the committed state (``Manifest``) the store records, and the error raised
when a folder does not hold a usable index. No file is read or written here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from services.common.errors import FailedPrecondition

DEFAULT_INDEX_NAME = "wikipedia-en"
INDEX_FACTORY = "IDMap2,Flat"
FORMAT_VERSION = 3
MIGRATABLE_FORMATS = (2,)  # format 2: one vectors file rewritten by every commit; becomes one segment
STORE_FILE = "passages.sqlite"
MANIFEST_FILE = "manifest.json"
# faiss trains IVF/PQ on a sample; 256 points per centroid is what its k-means uses at most anyway.
DEFAULT_TRAIN_SAMPLE = 262_144


def vectors_file_name(number: int) -> str:
    return f"vectors-{number:08d}.faiss"


def trained_file_name(number: int) -> str:
    return f"trained-{number:08d}.faiss"


class IndexLoadError(FailedPrecondition):
    """The index is missing, unfinished or damaged; the message names the folder and how to rebuild it."""


@dataclass(frozen=True)
class IndexSettings:
    """How vectors are indexed: chosen when an index is created (factory) or each time it is opened."""

    factory: str = INDEX_FACTORY  # any faiss index_factory string: "IDMap2,Flat", "HNSW32", "IVF4096,Flat", ...
    search_params: str = ""  # faiss ParameterSpace string applied after loading, e.g. "nprobe=32" or "efSearch=128"
    train_sample: int = DEFAULT_TRAIN_SAMPLE
    mmap: bool = False  # map the segment files instead of reading them (faiss supports it for Flat, IVF and PQ)
    # Compact in the background once a commit leaves more segments than this (0: only when asked).
    compact_segments: int = 0


@dataclass(frozen=True)
class Segment:
    """One immutable vectors file: the rows ``first_row <= row < end_row`` that were added together (rows of
    later segments are always higher), ``vectors`` of them still in the file (tombstoned ones included)."""

    file: str
    bytes: int
    digest: str  # "xxh3_128:<hex>" (or "sha256:<hex>" for a file migrated from format 2)
    vectors: int
    first_row: int
    end_row: int


@dataclass(frozen=True)
class Manifest:
    """The committed state of an index, as the store records it."""

    embedder: str
    dimension: int
    passages: int
    documents: int
    segments: tuple[Segment, ...] = ()
    trained: Segment | None = None  # the empty trained index segments are cloned from (IVF/PQ), once trained
    factory: str = INDEX_FACTORY
    metric: str = "inner_product"
    generation: int = 0
    created: str = ""
    updated: str = ""
    dead_rows: int = 0  # tombstones: removed passages whose vectors are still in a segment
    next_row: int = 0
    next_file: int = 1
    details: dict[str, Any] = field(default_factory=dict)  # e.g. the corpus and chunking that made it
    format: int = FORMAT_VERSION

    @property
    def vectors(self) -> int:
        return sum(segment.vectors for segment in self.segments)

    def to_state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Manifest:
        state = dict(state)
        state["segments"] = tuple(Segment(**segment) for segment in state.get("segments", ()))
        if state.get("trained") is not None:
            state["trained"] = Segment(**state["trained"])
        return cls(**state)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
