"""The web page's drop zone with documents as people have them, in a real headless Chromium: a PDF dropped on the
page is indexed, and the answer's source names the file and the page its passage is on.

The tiny model is random, so the test asserts the source the page shows, not what the answer says.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
import test_web
from conftest import start_gateway, start_orchestrator, start_scripted_orchestrator
from playwright.sync_api import Page, expect
from test_retrieval_formats import CATALOGUE, pdf_of
from test_web import ask, last_answer, open_page, screenshot, wait_until_answered

from nightcap.v1 import chat_pb2, common_pb2, retrieval_pb2
from services.retrieval.index import create_index, load_index
from services.retrieval.retriever import Retriever
from services.retrieval.server import start_retrieval_server

# The page tests' browser fixtures, and their skip where there is no Chromium.
playwright, browser, page = test_web.playwright, test_web.browser, test_web.page
pytestmark = test_web.pytestmark


@pytest.fixture(scope="module")
def gateway_over_an_empty_index(embedder, generation_address: str, tmp_path_factory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("web-formats")
    retriever = Retriever(
        embedder, load_index(create_index(folder / "index", embedder.name, embedder.dimension), writable=True)
    )
    retrieval = start_retrieval_server(retriever, "127.0.0.1:0")
    orchestrator = start_orchestrator(generation_address, retrieval.address)
    gateway = start_gateway(orchestrator.address, generation_address, retrieval.address)
    yield gateway.url
    gateway.stop()
    orchestrator.stop(grace=1.0)
    retrieval.stop(grace=None)
    retriever.index.close()


def drop_file(page: Page, name: str, data: bytes, mime: str) -> None:
    """Drops one file on the drop zone, as a drag from the desktop does."""
    if page.locator("#documents-panel").is_hidden():
        page.locator("#documents-toggle").click()
    page.evaluate(
        """([name, encoded, mime]) => {
            const bytes = Uint8Array.from(atob(encoded), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, {type: mime}));
            const zone = document.querySelector('#drop-zone');
            for (const type of ['dragenter', 'dragover', 'drop']) {
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }
        }""",
        [name, base64.b64encode(data).decode(), mime],
    )


def test_a_pdf_dropped_on_the_page_is_indexed_and_its_source_names_the_page(
    page: Page, gateway_over_an_empty_index: str
):
    open_page(page, gateway_over_an_empty_index)

    drop_file(page, "catalogue.pdf", pdf_of(*CATALOGUE), "application/pdf")
    expect(page.locator("#upload-text")).to_have_text("1 of 1 indexed.", timeout=60_000)
    expect(page.locator("#document-list .document-title")).to_have_text(["catalogue"])
    drop_file(page, "scan.pdf", pdf_of(""), "application/pdf")
    expect(page.locator("#upload-errors")).to_contain_text(
        "scan.pdf: no extractable text; scanned PDFs need OCR, which nightcap does not do"
    )

    ask(page, "What pressure is the Brannock valve rated for?")
    wait_until_answered(page)
    source = last_answer(page).locator("details.source").first
    expect(source.locator(".source-title")).to_have_text("catalogue")
    expect(source.locator(".source-page")).to_have_text("catalogue.pdf, p. 3")
    source.locator("summary").click()
    expect(source.locator(".source-passage")).to_contain_text("Brannock valve is rated for 40 bar")
    screenshot(page, "web-pdf-source-page.png")


def test_an_answer_citing_a_pdf_passage_names_its_page_on_the_marker_and_the_source(
    page: Page, generation_address: str, retrieval_address: str
):
    """An orchestrator that cites (the tiny model never does): "[1]" is the third page of a PDF."""
    passage = retrieval_pb2.Passage(
        id="catalogue.pdf#1", title="catalogue", source="catalogue.pdf", page=3, score=0.83,
        text="catalogue: The Brannock valve is rated for 40 bar of pressure.",
    )  # fmt: skip
    start = chat_pb2.ChatStart(sources=[passage], model="scripted:1", retrieval_query="Brannock valve")
    end = chat_pb2.ChatEnd(finish_reason=common_pb2.FINISH_REASON_EOS, context_used=True, cited=[1])
    orchestrator = start_scripted_orchestrator(
        [
            chat_pb2.ChatResponse(start=start),
            chat_pb2.ChatResponse(delta="It is rated for 40 bar [1]."),
            chat_pb2.ChatResponse(end=end),
        ]
    )
    gateway = start_gateway(orchestrator.address, generation_address, retrieval_address)
    try:
        open_page(page, gateway.url)
        ask(page, "What pressure is the Brannock valve rated for?")
        wait_until_answered(page)
        answer = last_answer(page)
        expect(answer.locator(".message-body button.cite")).to_have_attribute(
            "aria-label", "Source 1: catalogue.pdf, p. 3"
        )
        expect(answer.locator("details.source.cited .source-page")).to_have_text("catalogue.pdf, p. 3")
        screenshot(page, "web-pdf-page-cited.png")
    finally:
        gateway.stop()
        orchestrator.stop(grace=0)
