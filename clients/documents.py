"""Files -> documents to index: one reader per file type, chosen by the file's suffix, each returning documents.

Read on the client so any file the user can see can be sent to a retrieval service anywhere; the service
receives plain documents (id, title, text, source) and never touches the user's disk. chatctl reads paths with
``read_documents``; the HTTP gateway reads uploaded bytes with ``documents_of_file``: one reader for both.

The parsers, chosen for being well kept, permissively licensed and light:
- PDF: pypdf (BSD, pure Python). Read page by page; each page's text ends with a form feed, so the retrieval
  service's chunker knows the pages (a passage never straddles two, and it knows its page). pdfminer.six lays
  out text a little better but is slower and heavier; pymupdf is AGPL; markitdown returns one string per file
  (no pages) and pulls onnxruntime through magika.
- DOCX: python-docx (MIT): paragraphs and tables in document order.
- HTML: selectolax (MIT, the Lexbor engine, one wheel and no dependencies): the page's text without scripts,
  styles and navigation. trafilatura finds the main text of a crawled page better, but pulls a dozen packages
  for what a saved page or an export rarely needs.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from nightcap.records import PAGE_END, Document

MAX_FILE_BYTES = 64 * 2**20  # chatctl's default (--max-file-mb); the gateway has its own (--max-file-bytes)
NO_TEXT_LAYER = "no extractable text; scanned PDFs need OCR, which nightcap does not do"
_HEADING = re.compile(r"^#\s+(.+?)\s*#*\s*$", re.MULTILINE)
_FRONT_MATTER = re.compile(r"\A---\n.*?\n---\n", re.DOTALL)
_BLANK_LINES = re.compile(r"\n\s*\n+")
_SPACES = re.compile(r"[ \t\r\xa0]+")
_CHARSET = re.compile(rb"""<meta[^>]+charset=["']?([\w-]+)""", re.IGNORECASE)


class DocumentReadError(Exception):
    """A path that does not exist, a file type nightcap cannot read, a file too large, damaged, encrypted, or
    with no usable text. The message starts with the file's name."""


class FileTooLargeError(DocumentReadError):
    """A file over the size limit (chatctl's --max-file-mb, the gateway's --max-file-bytes)."""


def read_documents(paths: Iterable[str | Path], max_bytes: int = MAX_FILE_BYTES) -> Iterator[Document]:
    """Documents from every path; folders are read recursively, skipping files of other types.

    Ids are the normalized path as given (plus ``:line`` / ``:row`` for records without an ``id``), so adding
    the same files again replaces what they added before."""
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise DocumentReadError(f"{given}: no such file or folder")
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and reader_of(p.name)):
                yield from _read_path(file, max_bytes)
        else:
            yield from _read_path(path, max_bytes)


def _read_path(path: Path, max_bytes: int) -> list[Document]:
    name = os.path.normpath(path)
    _check_type(name)
    _check_size(name, path.stat().st_size, max_bytes)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DocumentReadError(f"{name}: cannot read it ({error})") from error
    return documents_of_file(name, data, str(path.resolve()), max_bytes)


def documents_of_file(
    name: str, data: bytes, source: str | None = None, max_bytes: int = MAX_FILE_BYTES
) -> list[Document]:
    """The documents of one file's bytes, named ``name`` (its id; its suffix says the type). ``source``
    defaults to the name. Every problem is a DocumentReadError naming the file; nothing is half read."""
    read = _check_type(name)
    _check_size(name, len(data), max_bytes)
    return read(name, data, source or name)


def reader_of(name: str) -> Callable[[str, bytes, str], list[Document]] | None:
    return READERS.get(Path(name).suffix.lower())


def _check_type(name: str) -> Callable[[str, bytes, str], list[Document]]:
    read = reader_of(name)
    if read is None:
        suffix = Path(name).suffix or "(none)"
        raise DocumentReadError(f"{name}: unknown file type {suffix!r}; nightcap reads {SUPPORTED}")
    return read


def _check_size(name: str, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise FileTooLargeError(f"{name}: {_size(size)} is over the limit of {_size(max_bytes)} a file")


def _size(size: int) -> str:
    if size >= 2**20:
        return f"{size / 2**20:.1f} MB"
    return f"{size / 2**10:.0f} KB" if size >= 2**10 else f"{size} bytes"


# --- one reader per type: (name, bytes, source) -> documents --------------------------------------------------


def read_text(name: str, data: bytes, source: str) -> list[Document]:
    return [_document(name, _utf8(name, data).strip(), Path(name).stem, source)]


def read_markdown(name: str, data: bytes, source: str) -> list[Document]:
    text = _FRONT_MATTER.sub("", _utf8(name, data))
    title = Path(name).stem
    heading = _HEADING.search(text)
    if heading:
        # the title is prefixed to every passage; kept in the text too, it would read "Title: # Title"
        title = heading.group(1)
        text = text[: heading.start()] + text[heading.end() :]
    return [_document(name, text.strip(), title, source)]


def read_jsonl(name: str, data: bytes, source: str) -> list[Document]:
    documents = []
    for number, line in enumerate(_utf8(name, data).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise DocumentReadError(f"{name} line {number}: not JSON ({error})") from error
        documents.append(_record(name, f"line {number}", record, source))
    if not documents:
        raise DocumentReadError(f"{name}: the file is empty; there is nothing to index")
    return documents


def read_parquet(name: str, data: bytes, source: str) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(io.BytesIO(data))
    except Exception as error:  # pyarrow raises ArrowInvalid / OSError for files that are not parquet
        raise DocumentReadError(f"{name}: not a readable parquet file ({error})") from error
    names = table.schema_arrow.names
    if "text" not in names:
        raise DocumentReadError(f"{name}: a parquet file needs a 'text' column (it has {', '.join(names)})")
    columns = [column for column in ("id", "title", "text", "source") if column in names]
    records = [record for batch in table.iter_batches(columns=columns) for record in batch.to_pylist()]
    if not records:
        raise DocumentReadError(f"{name}: the file has no rows; there is nothing to index")
    return [_record(name, f"row {row}", record, source) for row, record in enumerate(records, 1)]


def read_pdf(name: str, data: bytes, source: str) -> list[Document]:
    """One document; its text is the pages' text, each ended by PAGE_END (an empty page stays a page)."""
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        # A PDF locked only against editing opens with the empty password, as every viewer opens it.
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentReadError(
                f"{name}: the PDF is encrypted with a password; nightcap takes no passwords: index a copy saved "
                "without one"
            )
        pages = [(page.extract_text() or "").replace(PAGE_END, " ") for page in reader.pages]
    except DocumentReadError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as error:
        # pypdf meets damage deep in a file as whatever Python error the bad bytes cause
        raise DocumentReadError(f"{name}: not a readable PDF, it may be damaged ({error})") from error
    if not any(page.strip() for page in pages):
        raise DocumentReadError(f"{name}: {NO_TEXT_LAYER}")
    # a PDF's lines are where the layout wrapped them, not where its sentences end: one line per page
    text = "".join(" ".join(page.split()) + PAGE_END for page in pages)
    return [Document(id=name, text=text, title=Path(name).stem, source=source)]


def read_docx(name: str, data: bytes, source: str) -> list[Document]:
    """Paragraphs and table rows in document order; titled by the document's title property, else its first
    Title or Heading 1 paragraph (then left out of the text), else the file name."""
    import docx
    from docx.table import Table

    if data.startswith(b"\xd0\xcf\x11\xe0"):  # an OLE compound file: what Word writes encrypted, or an old .doc
        raise DocumentReadError(
            f"{name}: the Word file is encrypted with a password (or is an old .doc renamed); nightcap reads "
            "unencrypted .docx only"
        )
    try:
        document = docx.Document(io.BytesIO(data))
        title = (document.core_properties.title or "").strip()
        lines = []
        for block in document.iter_inner_content():
            if isinstance(block, Table):
                lines += [" | ".join(cell.text.strip() for cell in row.cells) for row in block.rows]
            elif not title and block.style is not None and block.style.name in ("Title", "Heading 1"):
                title = block.text.strip()
            else:
                lines.append(block.text)
    except Exception as error:  # zipfile, lxml and python-docx's own errors for a file that is not a .docx
        raise DocumentReadError(f"{name}: not a readable Word (.docx) file, it may be damaged ({error})") from error
    return [_document(name, _tidy("\n".join(lines)), title or Path(name).stem, source)]


# Elements that end a line of text; what is inside them (inline elements) keeps its own spacing.
_HTML_BLOCKS = "p,div,li,h1,h2,h3,h4,h5,h6,tr,br,pre,blockquote,dt,dd,section,article,figcaption,caption,hr"
_HTML_HIDDEN = "script,style,noscript,template,svg,nav,header,footer,aside,form"


def read_html(name: str, data: bytes, source: str) -> list[Document]:
    """The page's visible text, without scripts, styles, navigation, headers and footers; titled by <title>,
    else its first <h1>, else the file name."""
    from selectolax.lexbor import LexborHTMLParser

    tree = LexborHTMLParser(_html_text(data))
    title_node = tree.css_first("title") or tree.css_first("h1")
    title = _SPACES.sub(" ", title_node.text()).strip() if title_node is not None else ""
    for node in tree.css(_HTML_HIDDEN):
        node.decompose()
    for node in tree.css(_HTML_BLOCKS):
        node.insert_after("\n")
    for node in tree.css("td,th"):
        node.insert_after(" ")
    body = tree.body or tree.root
    text = body.text(separator="") if body is not None else ""
    return [_document(name, _tidy(text), title or Path(name).stem, source)]


READERS: dict[str, Callable[[str, bytes, str], list[Document]]] = {
    ".txt": read_text,
    ".text": read_text,
    ".md": read_markdown,
    ".markdown": read_markdown,
    ".jsonl": read_jsonl,
    ".parquet": read_parquet,
    ".pdf": read_pdf,
    ".docx": read_docx,
    ".html": read_html,
    ".htm": read_html,
}
SUPPORTED = ", ".join(sorted(READERS))


# --- shared by the readers -------------------------------------------------------------------------------------


def _document(name: str, text: str, title: str, source: str) -> Document:
    if not text.strip():
        raise DocumentReadError(f"{name}: the file is empty: it has no text to index")
    return Document(id=name, text=text, title=title, source=source)


def _utf8(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DocumentReadError(f"{name}: cannot read it as UTF-8 text ({error})") from error


def _html_text(data: bytes) -> str:
    """Decoded as its <meta charset> says, else UTF-8, else Windows-1252 (what browsers assume)."""
    declared = _CHARSET.search(data[:4096])
    for encoding in (declared.group(1).decode("ascii") if declared else "utf-8", "utf-8"):
        try:
            return data.decode(encoding)
        except (LookupError, UnicodeDecodeError):
            continue
    return data.decode("cp1252", errors="replace")


def _tidy(text: str) -> str:
    """Runs of spaces as one, blank lines as one; the line breaks kept (they end headings and list items)."""
    lines = (_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def _record(name: str, where: str, record: object, source: str) -> Document:
    if not isinstance(record, dict):
        raise DocumentReadError(f"{name} {where}: expected an object with a 'text' field")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DocumentReadError(f"{name} {where}: the 'text' field is missing or empty")
    return Document(
        id=str(record.get("id") or f"{name}:{where.split()[-1]}"),
        text=text.strip(),
        title=str(record.get("title") or ""),
        source=str(record.get("source") or source),
    )
