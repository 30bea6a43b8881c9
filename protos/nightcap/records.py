"""The records that cross the wire, each defined once: plain dataclasses beside the generated stubs.

Clients and services both import this module (as ``nightcap.records``), so neither repeats a field list and
``clients/`` never imports ``services/``. Protobuf stays at the edges: ``to_message`` and ``from_message``
convert a record to and from the message of the same fields, and a test checks that every record here still
has exactly its message's fields.
"""

from __future__ import annotations

import typing
from collections.abc import MutableSequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any, TypeVar

from google.protobuf.message import Message

# Default addresses of the three services (each may be changed with its NIGHTCAP_*_ADDRESS variable).
ORCHESTRATOR_ADDRESS = "127.0.0.1:50050"
GENERATION_ADDRESS = "127.0.0.1:50051"
RETRIEVAL_ADDRESS = "127.0.0.1:50052"
GATEWAY_ADDRESS = "127.0.0.1:8080"  # HTTP: the OpenAI-compatible API and the web page

DEFAULT_K = 3  # passages per search when the caller leaves k unset
MAX_K = 100  # the most passages one search returns: enough context for any prompt, small enough to stay fast


# Ends each page of a paged document's text (a PDF's, as pdftotext writes them): the retrieval service cuts its
# passages page by page, and each passage knows its page.
PAGE_END = "\f"


@dataclass(frozen=True)
class Document:
    """A document to index (nightcap.v1.Document): chunked into passages by the retrieval service."""

    id: str
    text: str
    title: str = ""
    source: str = ""


@dataclass(frozen=True)
class Passage:
    """A retrieved passage (nightcap.v1.Passage); ``score`` is the similarity to the query, higher is closer."""

    id: str
    text: str
    title: str = ""
    source: str = ""
    score: float = 0.0
    titled: bool = False  # found by the search's document title (placed first), not only by its score
    page: int = 0  # the page it is on, from 1, in a paged document (a PDF); 0 in any other


# IndexBuild.state: filling the index now, finished, stopped by an error, or (no build running in the
# service, e.g. it was served without --build-default) stopped short of its total.
BUILDING, COMPLETE, FAILED, INCOMPLETE = "building", "complete", "failed", "incomplete"


@dataclass(frozen=True)
class IndexBuild:
    """A build filling a served index in commits (nightcap.v1.IndexBuild)."""

    state: str
    documents_done: int
    documents_total: int
    passages_done: int = 0
    passages_per_second: float = 0.0
    eta_s: float = 0.0
    elapsed_s: float = 0.0
    error: str = ""

    @property
    def fraction(self) -> float:
        return self.documents_done / self.documents_total if self.documents_total else 1.0

    def describe(self) -> str:
        """One line for a person: "index building: 4,000 of 10,033 documents (39%), 33.1 passages/s, ETA 4 min
        10 s", "index complete (10,033 documents)", "index build failed: ..."."""
        done = f"{self.documents_done:,} of {self.documents_total:,} documents ({self.fraction:.0%})"
        if self.state == BUILDING:
            rate = f", {self.passages_per_second:.1f} passages/s" if self.passages_per_second else ""
            eta = f", ETA {format_duration(self.eta_s)}" if self.eta_s else ""
            return f"index building: {done}{rate}{eta}"
        if self.state == COMPLETE:
            return f"index complete ({self.documents_total:,} documents)"
        if self.state == FAILED:
            return f"index build failed: {self.error} (after {done})"
        return f"index incomplete: {done}; no build is running (serve it with --build-default to finish it)"

    @property
    def notice(self) -> str:
        """What a person is told beside an answer searched while the build runs (or stopped short)."""
        if self.state != BUILDING:
            return self.describe()
        return f"the index is still building: {self.documents_done:,} of {self.documents_total:,} documents indexed"

    def repeated_in(self, notice: str) -> bool:
        """Whether ``notice`` already tells this build's progress (the orchestrator may word it there too)."""
        return f"{self.documents_done:,} of {self.documents_total:,} documents" in notice


def format_duration(seconds: float) -> str:
    """A duration for a person: "4 min 10 s", "1 h 2 min", "12 s"."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


@dataclass(frozen=True)
class IndexStats:
    """What a retrieval index holds (nightcap.v1.StatsResponse)."""

    passages: int
    documents: int
    dimension: int
    embedder: str
    index_type: str
    index_path: str
    bytes_on_disk: int
    format: str
    generation: int
    segments: int = 0  # vector segment files searched together
    tombstones: int = 0  # removed passages whose vectors wait for compaction
    build: IndexBuild | None = None  # the build filling it while it serves, if one did
    reranker: str = ""  # the cross-encoder that reorders its searches; "" for none


@dataclass(frozen=True)
class AddReport:
    """One committed AddDocuments call (nightcap.v1.AddDocumentsResponse)."""

    documents_added: int
    documents_replaced: int
    passages_added: int
    passages_removed: int
    passages_total: int
    documents_total: int
    seconds: float

    @property
    def passages_per_second(self) -> float:
        return self.passages_added / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class DeleteReport:
    """One committed DeleteDocuments call (nightcap.v1.DeleteDocumentsResponse)."""

    documents_deleted: int
    passages_removed: int
    passages_total: int
    documents_total: int


@dataclass(frozen=True)
class CompactReport:
    """One Compact call (nightcap.v1.CompactResponse): segments merged, removed passages' vectors dropped."""

    segments_before: int
    segments_after: int
    vectors_dropped: int
    bytes_before: int
    bytes_after: int
    seconds: float
    generation: int


Record = TypeVar("Record")
MessageType = TypeVar("MessageType", bound=Message)


def from_message(record_type: type[Record], message: Message) -> Record:
    """The record of the message's fields (unset fields read as their defaults, repeated fields as tuples, an
    unset message field as None, a set one as the record its annotation names)."""
    values = {}
    for field in fields(record_type):  # type: ignore[arg-type]
        value = getattr(message, field.name)
        if isinstance(value, Message):
            nested = _nested_record(record_type, field.name)
            value = from_message(nested, value) if message.HasField(field.name) else None
        values[field.name] = _value(value)
    return record_type(**values)


def _nested_record(record_type: type, name: str) -> type:
    """``IndexBuild`` for ``build: IndexBuild | None``: the one dataclass the field's annotation names."""
    hint = typing.get_type_hints(record_type)[name]
    return next(arg for arg in (*typing.get_args(hint), hint) if is_dataclass(arg))


def _value(value: Any) -> Any:
    return tuple(value) if isinstance(value, MutableSequence) else value  # a repeated field's container


def to_message(record: Any, message_type: type[MessageType]) -> MessageType:
    """The message with the record's fields (a None message field left unset)."""
    values = {field.name: getattr(record, field.name) for field in fields(record)}
    # protobuf takes a nested message's fields as a dict
    return message_type(**{k: asdict(v) if is_dataclass(v) else v for k, v in values.items() if v is not None})
