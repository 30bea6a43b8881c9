"""The records that cross the wire, each defined once: plain dataclasses beside the generated stubs.

Clients and services both import this module (as ``nightcap.records``), so neither repeats a field list and
``clients/`` never imports ``services/``. Protobuf stays at the edges: ``to_message`` and ``from_message``
convert a record to and from the message of the same fields, and a test checks that every record here still
has exactly its message's fields.
"""

from __future__ import annotations

from collections.abc import MutableSequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from google.protobuf.message import Message

# Default addresses of the three services (each may be changed with its NIGHTCAP_*_ADDRESS variable).
ORCHESTRATOR_ADDRESS = "127.0.0.1:50050"
GENERATION_ADDRESS = "127.0.0.1:50051"
RETRIEVAL_ADDRESS = "127.0.0.1:50052"
GATEWAY_ADDRESS = "127.0.0.1:8080"  # HTTP: the OpenAI-compatible API and the web page

DEFAULT_K = 3  # passages per search when the caller leaves k unset
MAX_K = 100  # the most passages one search returns: enough context for any prompt, small enough to stay fast


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
    """The record of the message's fields (unset fields read as their defaults, repeated fields as tuples)."""
    return record_type(**{field.name: _value(getattr(message, field.name)) for field in fields(record_type)})  # type: ignore[arg-type]


def _value(value: Any) -> Any:
    return tuple(value) if isinstance(value, MutableSequence) else value  # a repeated field's container


def to_message(record: Any, message_type: type[MessageType]) -> MessageType:
    """The message with the record's fields."""
    return message_type(**{field.name: getattr(record, field.name) for field in fields(record)})
