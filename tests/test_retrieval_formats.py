"""Documents as people have them: PDF (page by page), Word and HTML files join text, Markdown, JSONL and Parquet in
`chatctl index add` and the gateway's /v1/documents; a PDF passage knows its page and its source reads
"report.pdf, p. 3"; a file nightcap cannot read is named with the reason, and nothing of its batch is indexed.

Every file is made by the test: PDFs with fpdf2 (and pypdf's writer to lock them), Word files with python-docx.
Real embedder, real faiss, real servers on 127.0.0.1 port 0.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docx
import httpx
import pytest
from conftest import start_gateway, start_orchestrator, start_scripted_orchestrator
from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

from clients.client import IndexClient
from clients.documents import NO_TEXT_LAYER, DocumentReadError, documents_of_file, read_documents
from nightcap.records import Document
from nightcap.v1 import chat_pb2, common_pb2, retrieval_pb2
from services.retrieval.chunker import Passage, passages_of
from services.retrieval.index import create_index, load_index
from services.retrieval.retriever import Retriever
from services.retrieval.server import start_retrieval_server
from services.retrieval.store import PassageStore

ROOT = Path(__file__).resolve().parents[1]
# A valve catalogue: page 2 is a drawing (no text), page 3 the valve the questions ask about.
CATALOGUE = [
    "The Kestrel pump moves water through the cooling loop. It runs quietly at night. It needs oil once a year.",
    "",
    "The Brannock valve is rated for 40 bar of pressure. It is cast in brass. Every Brannock valve is tested twice "
    "before it ships.",
]


def pdf_of(*pages: str) -> bytes:
    """A PDF with one page per string (an empty string: a page with a drawing and no text)."""
    pdf = FPDF()
    pdf.set_font("helvetica", size=12)
    for text in pages:
        pdf.add_page()
        if text:
            pdf.multi_cell(0, 8, text)
        else:
            pdf.rect(20, 20, 100, 60)
    return bytes(pdf.output())


def locked(pdf: bytes, password: str) -> bytes:
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf)))
    writer.encrypt(user_password=password, owner_password="owner-secret", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx_of(title: str, *paragraphs: str, table: list[list[str]] | None = None) -> bytes:
    document = docx.Document()
    document.add_heading(title, 1)
    for paragraph in paragraphs:
        document.add_paragraph(paragraph)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for row, cells in zip(grid.rows, table, strict=True):
            for cell, text in zip(row.cells, cells, strict=True):
                cell.text = text
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


HTML_PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>Opening hours</title>
<style>body { color: red }</style><script>var tracking = "the cookie banner";</script></head>
<body><nav><a href="/">Home</a> <a href="/shop">Shop</a></nav>
<h1>When the library opens</h1>
<p>The Ostend library opens at <b>nine</b> on weekdays.</p><p>On Sundays it stays closed.</p>
<ul><li>Caf\xc3\xa9 on the first floor</li><li>Free wifi</li></ul>
<footer>Copyright the town council</footer></body></html>"""


# --- reading files ------------------------------------------------------------------------------------------------


def test_a_pdf_is_read_page_by_page_and_each_passage_knows_its_page():
    [document] = documents_of_file("catalogue.pdf", pdf_of(*CATALOGUE))

    passages = list(passages_of(document, per_passage=2))

    assert document.title == "catalogue"
    assert [(p.id, p.page) for p in passages] == [
        ("catalogue.pdf#0", 1),
        ("catalogue.pdf#1", 1),
        ("catalogue.pdf#2", 3),
        ("catalogue.pdf#3", 3),
    ]
    # the first page's last sentence stands alone rather than sharing a passage with the third page's first
    assert passages[1].text == "catalogue: It needs oil once a year."
    assert all("Brannock" in p.text for p in passages if p.page == 3)
    assert not any("Brannock" in p.text for p in passages if p.page == 1)


def test_a_document_without_pages_has_page_zero():
    passages = list(passages_of(Document("notes.txt", "One sentence. Another one.", "notes")))

    assert [p.page for p in passages] == [0]


def test_a_word_file_is_read_in_order_with_its_tables_and_titled_by_its_heading():
    data = docx_of(
        "Valve ratings",
        "Each valve is rated for a pressure.",
        "The table lists them.",
        table=[["Brannock", "40 bar"], ["Tamsin", "25 bar"]],
    )

    [document] = documents_of_file("ratings.docx", data)

    assert document.title == "Valve ratings"
    assert (
        document.text
        == "Each valve is rated for a pressure.\nThe table lists them.\nBrannock | 40 bar\nTamsin | 25 bar"
    )


def test_an_html_page_is_read_without_its_scripts_styles_navigation_and_footer():
    [document] = documents_of_file("hours.html", HTML_PAGE)

    assert document.title == "Opening hours"
    assert "The Ostend library opens at nine on weekdays." in document.text
    assert "Café on the first floor\nFree wifi" in document.text
    for hidden in ("cookie banner", "color: red", "Shop", "Copyright"):
        assert hidden not in document.text


def test_a_pdf_locked_only_against_editing_is_read_as_any_viewer_opens_it():
    [document] = documents_of_file("catalogue.pdf", locked(pdf_of(*CATALOGUE), password=""))

    assert "Brannock valve is rated for 40 bar" in document.text


BAD_FILES = {
    "scan.pdf": (lambda: pdf_of("", ""), f"scan.pdf: {NO_TEXT_LAYER}"),
    "locked.pdf": (lambda: locked(pdf_of(*CATALOGUE), "s3cret"), "locked.pdf: the PDF is encrypted with a password"),
    "broken.pdf": (lambda: pdf_of(*CATALOGUE)[:900], "broken.pdf: not a readable PDF, it may be damaged"),
    "broken.docx": (lambda: docx_of("x", "y")[:500], r"broken.docx: not a readable Word \(.docx\) file"),
    "big.txt": (lambda: b"All work and no play. " * 60_000, "big.txt: 1.3 MB is over the limit of 1.0 MB a file"),
    "sheet.xlsx": (
        lambda: b"PK\x03\x04",
        r"sheet.xlsx: unknown file type '.xlsx'; nightcap reads .docx, .htm, .html, .jsonl, .markdown, .md, "
        r".parquet, .pdf, .text, .txt",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_a_file_nightcap_cannot_read_is_named_with_the_reason(tmp_path: Path, name: str):
    make, message = BAD_FILES[name]
    (tmp_path / name).write_bytes(make())

    with pytest.raises(DocumentReadError, match=f"^{tmp_path / name}: ".replace("\\", "\\\\")) as raised:
        list(read_documents([tmp_path / name], max_bytes=2**20))

    assert raised.match(message)


# --- the passage store --------------------------------------------------------------------------------------------


def test_a_store_written_before_passages_had_pages_opens_and_keeps_pages_from_then_on(tmp_path: Path):
    path = tmp_path / "passages.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE passages (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, doc_id TEXT NOT NULL,"
        " title TEXT NOT NULL, text TEXT NOT NULL, source TEXT NOT NULL);"
        "INSERT INTO passages VALUES (0, 'zurich#0', 'zurich', 'Zurich', 'Zurich: A city.', 'wiki');"
    )
    old.commit()
    old.close()

    store = PassageStore.open(path)
    new = Passage("report.pdf#0", "report.pdf", "report", "report: The valve.", "report.pdf", page=3)
    store.commit({"generation": 1}, added=[(1, new)])
    assert store.get([0, 1]) == [Passage("zurich#0", "zurich", "Zurich", "Zurich: A city.", "wiki", page=0), new]
    store.close()
    assert PassageStore.open(path).get([1])[0].page == 3  # and again once the column exists


# --- chatctl index add over gRPC ------------------------------------------------------------------------------------


@pytest.fixture
def index_address(embedder, tmp_path: Path) -> Iterator[str]:
    folder = create_index(tmp_path / "indexes" / "mine", embedder.name, embedder.dimension)
    retriever = Retriever(embedder, load_index(folder, writable=True))
    running = start_retrieval_server(retriever, "127.0.0.1:0")
    yield running.address
    running.stop(grace=None)
    retriever.index.close()


def chatctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "clients.chatctl", *args], capture_output=True, text=True, timeout=120, cwd=cwd,
        env=environment,
    )  # fmt: skip


def test_chatctl_indexes_pdf_word_and_html_files_and_cites_the_pdfs_page(index_address: str, tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "catalogue.pdf").write_bytes(pdf_of(*CATALOGUE))
    (tmp_path / "docs" / "ratings.docx").write_bytes(docx_of("Valve ratings", "The Tamsin valve holds 25 bar."))
    (tmp_path / "docs" / "hours.html").write_bytes(HTML_PAGE)
    address = ["--address", index_address]

    added = chatctl("index", "add", "docs", "--quiet", *address, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert "added 3 documents" in added.stdout

    found = chatctl(
        "index", "search", "What pressure is the Brannock valve rated for?", "-k", "1", *address, cwd=tmp_path
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.startswith(f"[1] catalogue ({tmp_path / 'docs' / 'catalogue.pdf'}, p. 3, score ")
    hours = chatctl("index", "search", "When does the library open?", "-k", "1", *address, cwd=tmp_path)
    assert hours.stdout.startswith(f"[1] Opening hours ({tmp_path / 'docs' / 'hours.html'}, score ")  # no page


def test_chatctl_index_add_with_one_unreadable_pdf_names_it_and_indexes_nothing(index_address: str, tmp_path: Path):
    (tmp_path / "good.txt").write_text("The Kestrel pump runs quietly at night.")
    (tmp_path / "scan.pdf").write_bytes(pdf_of(""))

    result = chatctl("index", "add", "good.txt", "scan.pdf", "--address", index_address, cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.strip() == f"error: scan.pdf: {NO_TEXT_LAYER}"
    with IndexClient(index_address, timeout=30) as client:
        assert client.stats().documents == 0


def test_chatctl_max_file_mb_is_the_size_limit(index_address: str, tmp_path: Path):
    (tmp_path / "catalogue.pdf").write_bytes(pdf_of(*CATALOGUE))
    address = ["--address", index_address]

    refused = chatctl("index", "add", "catalogue.pdf", "--max-file-mb", "0.001", "--quiet", *address, cwd=tmp_path)
    accepted = chatctl("index", "add", "catalogue.pdf", "--max-file-mb", "1", "--quiet", *address, cwd=tmp_path)

    assert refused.returncode == 2 and "catalogue.pdf: " in refused.stderr and "over the limit" in refused.stderr
    assert accepted.returncode == 0, accepted.stderr


def test_chatctl_ask_names_the_page_of_the_pdf_passage_the_answer_cites(tmp_path: Path):
    """An orchestrator that cites (the tiny model never does): "[1]" is the third page of a PDF."""
    passage = retrieval_pb2.Passage(
        id="catalogue.pdf#1", title="catalogue", source="/docs/catalogue.pdf", page=3, score=0.83,
        text="catalogue: The Brannock valve is rated for 40 bar of pressure.",
    )  # fmt: skip
    end = chat_pb2.ChatEnd(finish_reason=common_pb2.FINISH_REASON_EOS, context_used=True, cited=[1])
    turn = [
        chat_pb2.ChatResponse(start=chat_pb2.ChatStart(sources=[passage], model="scripted:1")),
        chat_pb2.ChatResponse(delta="It is rated for 40 bar [1]."),
        chat_pb2.ChatResponse(end=end),
    ]
    orchestrator = start_scripted_orchestrator(turn)
    try:
        asked = chatctl("ask", "What is the Brannock valve rated for?", "--address", orchestrator.address, cwd=tmp_path)
    finally:
        orchestrator.stop(grace=0)

    assert asked.returncode == 0, asked.stderr
    assert "cited: [1] catalogue, p. 3\n" in asked.stdout
    assert "[1] catalogue (/docs/catalogue.pdf, p. 3, score 0.83) — cited" in asked.stdout


# --- the gateway's /v1/documents ------------------------------------------------------------------------------------


@contextlib.contextmanager
def documents_stack(embedder, generation_address: str, tmp_path: Path, **gateway_settings) -> Iterator[str]:
    """A stack over an empty index of its own, opened for writing: the gateway's base URL."""
    folder = create_index(tmp_path / "indexes" / "mine", embedder.name, embedder.dimension)
    index = load_index(folder, writable=True)
    retrieval = start_retrieval_server(Retriever(embedder, index), "127.0.0.1:0")
    orchestrator = start_orchestrator(generation_address, retrieval.address)
    running = start_gateway(orchestrator.address, generation_address, retrieval.address, **gateway_settings)
    try:
        yield running.url
    finally:
        running.stop()
        orchestrator.stop(grace=1)
        retrieval.stop(grace=1)
        index.close()


@pytest.fixture
def documents_gateway(embedder, generation_address: str, tmp_path: Path) -> Iterator[str]:
    """Files over 64 KB are refused."""
    with documents_stack(embedder, generation_address, tmp_path, max_file_bytes=64 * 1024) as url:
        yield url


def test_a_file_may_be_larger_than_any_other_request_body(embedder, generation_address: str, tmp_path: Path):
    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_of(*CATALOGUE))))
    writer.add_attachment("drawing.bin", os.urandom(600 * 1024))  # a PDF's bulk is mostly not its text
    out = io.BytesIO()
    writer.write(out)
    pdf = out.getvalue()
    assert 600 * 1024 < len(pdf) < 1024 * 1024
    limits = {"max_body_bytes": 256 * 1024, "max_file_bytes": 1024 * 1024}
    with documents_stack(embedder, generation_address, tmp_path, **limits) as url, httpx.Client(base_url=url) as client:
        added = client.post("/v1/documents", json={"files": [as_upload("catalogue.pdf", pdf)]}, timeout=120)
        assert added.status_code == 200, added.text
        assert added.json()["passages_added"] >= 2  # its pages with text

        chat = {"messages": [{"role": "user", "content": "x" * 300 * 1024}], "max_tokens": 1}
        refused = client.post("/v1/chat/completions", json=chat)
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"
        assert "--max-body-bytes" in refused.json()["error"]["message"]

        huge = client.post("/v1/documents", json={"files": [as_upload("huge.txt", b"word " * 400_000)]})
        error = huge.json()["error"]  # 2 MB as base64 is over one 1 MiB file's body: refused as it arrives
        assert huge.status_code == 413 and "--max-file-bytes" in error["message"], huge.text


def as_upload(name: str, data: bytes) -> dict[str, str]:
    return {"name": name, "content": base64.b64encode(data).decode(), "encoding": "base64"}


def test_an_uploaded_pdf_is_indexed_and_its_source_names_the_page(documents_gateway: str):
    with httpx.Client(base_url=documents_gateway, timeout=120) as client:
        added = client.post("/v1/documents", json={"files": [as_upload("catalogue.pdf", pdf_of(*CATALOGUE))]})
        assert added.status_code == 200, added.text
        assert added.json()["ids"] == ["catalogue.pdf"]

        question = {"messages": [{"role": "user", "content": "What is the Brannock valve rated for?"}], "max_tokens": 4}
        answer = client.post("/v1/chat/completions", json=question)
        first = answer.json()["nightcap"]["sources"][0]
        assert (first["title"], first["url"], first["page"]) == ("catalogue", "catalogue.pdf", 3)
        assert "Brannock valve is rated for 40 bar" in first["text"]


@pytest.mark.parametrize(
    ("name", "status", "code", "message"),
    [
        ("scan.pdf", 400, "unreadable_file", f"scan.pdf: {NO_TEXT_LAYER}"),
        ("locked.pdf", 400, "unreadable_file", "locked.pdf: the PDF is encrypted with a password"),
        ("broken.docx", 400, "unreadable_file", "broken.docx: not a readable Word (.docx) file"),
        ("big.txt", 413, "file_too_large", "big.txt: 1.3 MB is over the limit of 64 KB a file (--max-file-bytes)"),
        ("sheet.xlsx", 400, "unreadable_file", "sheet.xlsx: unknown file type '.xlsx'; nightcap reads .docx"),
    ],
)
def test_an_unreadable_upload_is_named_with_the_reason_and_its_batch_adds_nothing(
    documents_gateway: str, name: str, status: int, code: str, message: str
):
    good = as_upload("notes.md", b"# Pumps\nThe Kestrel pump runs quietly at night.")
    bad = as_upload(name, BAD_FILES[name][0]())

    with httpx.Client(base_url=documents_gateway, timeout=60) as client:
        refused = client.post("/v1/documents", json={"files": [good, bad]})
        error = refused.json()["error"]
        assert (refused.status_code, error["type"], error["code"], error["param"]) == (
            status,
            "invalid_request_error",
            code,
            "files[1]",
        )
        assert error["message"].startswith(message)
        assert client.get("/v1/documents").json()["stats"]["documents"] == 0


def test_the_markdown_sources_list_names_the_page():
    from services.gateway import translate

    passage = retrieval_pb2.Passage(id="catalogue.pdf#1", title="catalogue", source="catalogue.pdf", page=3)
    found = translate.sources(chat_pb2.ChatStart(sources=[passage]))

    assert translate.sources_markdown(found, cited=[1]) == "\n\nSources:\n[1] catalogue (catalogue.pdf, p. 3) (cited)"


def test_content_that_is_not_base64_is_refused_by_name(documents_gateway: str):
    upload = {"name": "catalogue.pdf", "content": "not base64!", "encoding": "base64"}

    with httpx.Client(base_url=documents_gateway, timeout=60) as client:
        refused = client.post("/v1/documents", json={"files": [upload]})

    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "files[0].content"
    assert refused.json()["error"]["message"] == "catalogue.pdf: the content is not base64"
