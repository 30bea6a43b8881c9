"""Files -> documents to index: plain text, Markdown, JSONL and Parquet; folders recursively.

Read on the client so any file the user can see can be sent to a retrieval service anywhere; the service
receives plain documents (id, title, text, source) and never touches the user's disk.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nightcap.records import Document

TEXT_SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown"}
RECORD_SUFFIXES = {".jsonl": "jsonl", ".parquet": "parquet"}
SUPPORTED = ", ".join(sorted({*TEXT_SUFFIXES, *RECORD_SUFFIXES}))
_HEADING = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)


class DocumentReadError(Exception):
    """A path that does not exist, a file type nightcap cannot read, or a file with no usable text."""


def read_documents(paths: Iterable[str | Path]) -> Iterator[Document]:
    """Documents from every path; folders are read recursively, skipping files of other types.

    Ids are the normalized path as given (plus ``:line`` / ``:row`` for records without an ``id``), so adding
    the same files again replaces what they added before."""
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise DocumentReadError(f"{given}: no such file or folder")
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and _kind(p)):
                yield from _read_file(file, _document_id(file))
        elif _kind(path) is None:
            raise DocumentReadError(
                f"{given}: unknown file type {path.suffix or '(none)'!r}; nightcap reads {SUPPORTED}"
            )
        else:
            yield from _read_file(path, _document_id(path))


def _kind(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return TEXT_SUFFIXES.get(suffix) or RECORD_SUFFIXES.get(suffix)


def _document_id(path: Path) -> str:
    return os.path.normpath(path)


def _read_file(path: Path, doc_id: str) -> Iterator[Document]:
    kind = _kind(path)
    if kind == "parquet":
        yield from _read_parquet(path, doc_id)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DocumentReadError(f"{path}: cannot read it as UTF-8 text ({error})") from error
    yield from documents_from_text(doc_id, text, str(path.resolve()))


def documents_from_text(name: str, text: str, source: str | None = None) -> list[Document]:
    """The documents of one text, Markdown or JSONL file's content, named ``name`` (its id, and the suffix
    says the type); ``source`` defaults to the name. What the HTTP gateway does with an uploaded file."""
    path = Path(name)
    kind = _kind(path)
    source = source or name
    if kind is None or kind == "parquet":
        readable = ", ".join(s for s in sorted({*TEXT_SUFFIXES, *RECORD_SUFFIXES}) if s != ".parquet")
        raise DocumentReadError(f"{name}: unknown file type {path.suffix or '(none)'!r}; send {readable}")
    if kind == "jsonl":
        return list(_read_jsonl_lines(name, text.splitlines(), source))
    title = path.stem
    if kind == "markdown":
        text = _FRONT_MATTER.sub("", text)
        heading = _HEADING.search(text)
        if heading:
            # the title is prefixed to every passage; kept in the text too, it would read "Title: # Title"
            title = heading.group(1)
            text = text[: heading.start()] + text[heading.end() :]
    if not text.strip():
        raise DocumentReadError(f"{name}: the file is empty; there is nothing to index")
    return [Document(id=name, text=text.strip(), title=title, source=source)]


def _record(name: str, doc_id: str, where: str, record: object, source: str) -> Document:
    if not isinstance(record, dict):
        raise DocumentReadError(f"{name} {where}: expected an object with a 'text' field")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DocumentReadError(f"{name} {where}: the 'text' field is missing or empty")
    return Document(
        id=str(record.get("id") or f"{doc_id}:{where.split()[-1]}"),
        text=text.strip(),
        title=str(record.get("title") or ""),
        source=str(record.get("source") or source),
    )


def _read_jsonl_lines(doc_id: str, lines: Iterable[str], source: str) -> Iterator[Document]:
    found = False
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DocumentReadError(f"{doc_id} line {number}: not JSON ({error})") from error
        found = True
        yield _record(doc_id, doc_id, f"line {number}", record, source)
    if not found:
        raise DocumentReadError(f"{doc_id}: the file is empty; there is nothing to index")


def _read_parquet(path: Path, doc_id: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for files that are not parquet
        raise DocumentReadError(f"{path}: not a readable parquet file ({error})") from error
    names = table.schema_arrow.names
    if "text" not in names:
        raise DocumentReadError(f"{path}: a parquet file needs a 'text' column (it has {', '.join(names)})")
    columns = [name for name in ("id", "title", "text", "source") if name in names]
    row = 0
    for batch in table.iter_batches(columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield _record(str(path), doc_id, f"row {row}", record, str(path.resolve()))
    if row == 0:
        raise DocumentReadError(f"{path}: the file has no rows; there is nothing to index")
