"""The web chat page in a real headless Chromium (Playwright driving Debian's /usr/bin/chromium), served by
a real gateway in front of the tiny stack: what a person sees and can do, and that nothing from the model
or a document ever runs as script.

The tiny model is random, so its answers are gibberish; the tests assert what a user would notice (text
streaming in, sources, the stop button, conversations kept) rather than what the answer says. A few states
the tiny stack cannot produce on demand (429, a deadline, a hostile answer) come from a mocked
/v1/chat/completions; the page itself is always the gateway's.
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import start_gateway, start_orchestrator, wait_for

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium): the page is untested"
)

from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WEB_DIR = ROOT / "services" / "gateway" / "web"
SCREENSHOTS = ROOT / "var" / "screenshots"
# Debian's Chromium in a container: no sandbox (we are root), no GPU, and no calls home.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
ADMIN_TOKEN = "admin-token-for-the-page-0001"
CHAT_TOKEN = "chat-token-for-the-page-00001"
# The tiny model samples: without a seed about one answer in ten is empty. With seed 1 its answer to "Where is
# Zurich?" runs to max tokens; with seed 3 it is empty (the model's first token is its end).
LONG_SEED, EMPTY_SEED = "1", "3"
HOSTILE_MARKUP = '<img src=x onerror="window.__pwned=1;alert(1)">'
HOSTILE_SCRIPT = "<script>window.__pwned=2;alert(2)</script>"


# --- the browser ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield chromium
    chromium.close()


@dataclass
class Watched:
    """What the page did that a person would not see: dialogs, console errors, uncaught exceptions, requests."""

    dialogs: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    chat_bodies: list[dict] = field(default_factory=list)


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser profile (empty localStorage) per test; ``page.watched`` records what it did."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(20_000)
    tab = context.new_page()
    watched = Watched()
    tab.watched = watched

    def on_dialog(dialog) -> None:
        watched.dialogs.append(dialog.message)
        dialog.dismiss()

    def on_request(request) -> None:
        watched.requests.append(request.url)
        if request.url.endswith("/v1/chat/completions") and request.method == "POST":
            watched.chat_bodies.append(json.loads(request.post_data))

    tab.on("dialog", on_dialog)
    tab.on("console", lambda message: message.type == "error" and watched.console_errors.append(message.text))
    tab.on("pageerror", lambda error: watched.page_errors.append(str(error)))
    tab.on("request", on_request)
    yield tab
    context.close()


def open_page(page: Page, url: str) -> None:
    page.goto(url)
    expect(page.locator("#model-name")).not_to_have_text("connecting…")


def ask(page: Page, question: str) -> None:
    page.locator("#message-input").fill(question)
    page.locator("#message-input").press("Enter")


def wait_until_answered(page: Page, timeout: float = 60_000) -> None:
    expect(page.locator("#send-button")).to_have_text("Send", timeout=timeout)


def last_answer(page: Page):
    return page.locator(".message.assistant").last


def set_setting(page: Page, name: str, value: str | bool) -> None:
    if page.locator("#settings-panel").is_hidden():
        page.locator("#settings-toggle").click()
    field_ = page.locator(f"#setting-{name.replace('_', '-')}")
    if isinstance(value, bool):
        field_.set_checked(value)
    else:
        field_.fill(value)


def use_token(page: Page, token: str) -> None:
    if page.locator("#token-form").is_hidden():
        page.locator("#token-toggle").click()
    page.locator("#token-input").fill(token)
    page.locator("#token-form button[type=submit]").click()


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name))


def sample_with_seed(page: Page, seed: str) -> None:
    """Sampled answers at the plain default temperature with this seed (a chat answered from the index is greedy
    by default, where a seed changes nothing): the seeds below were found so."""
    set_setting(page, "temperature", "0.6")
    set_setting(page, "seed", seed)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


# --- chatting ---------------------------------------------------------------------------------------------------


def test_an_answer_streams_in_with_the_zurich_source_which_opens_on_click(page: Page, gateway_url: str):
    open_page(page, gateway_url)
    expect(page.locator("#model-name")).to_have_text(get_json(f"{gateway_url}/v1/nightcap/config")["model"])
    expect(page.locator("#message-input")).to_be_focused()
    # With one passage and seed 6 the tiny model's answer runs the whole 700 tokens: a second or two of streaming.
    set_setting(page, "retrieval_k", "1")
    sample_with_seed(page, "6")
    set_setting(page, "max_tokens", "700")
    # Every length the answer's text had, as the browser drew it.
    page.evaluate(
        """() => { window.__lengths = []; new MutationObserver(() => {
            const body = document.querySelector('.message.assistant:last-child .message-body');
            if (body) window.__lengths.push(body.textContent.length);
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, characterData: true}); }"""
    )
    ask(page, "Where is Zurich?")
    answer = last_answer(page)
    expect(answer.locator(".source-title").first).to_have_text("Zurich")
    expect(page.locator("#send-button")).to_have_text("Stop")
    expect(answer.locator(".message-body")).not_to_have_text(re.compile(r"^(Waiting for the first token…)?$"))
    screenshot(page, "web-streaming-with-sources.png")
    source = answer.locator("details.source").first
    expect(source.locator(".source-passage")).to_be_hidden()
    source.locator("summary").click()  # while the answer streams: it stays open as text keeps arriving
    wait_until_answered(page)

    lengths = sorted(set(page.evaluate("window.__lengths")) - {0, len("Waiting for the first token…")})
    assert len(lengths) >= 3, f"the answer appeared in {len(lengths)} steps, not streamed: {lengths}"
    assert answer.get_attribute("data-state") in ("done", "length")
    expect(source.locator(".source-passage")).to_be_visible()
    expect(source.locator(".source-passage")).to_contain_text("Switzerland")
    expect(source.locator("a.source-link")).to_have_attribute("href", "https://en.wikipedia.org/wiki/Zurich")
    expect(source.locator("a.source-link")).to_have_attribute("rel", "noopener noreferrer")
    expect(source.locator(".source-score")).to_have_text(re.compile(r"score \d\.\d\d"))
    screenshot(page, "web-answer-source-open.png")
    assert not page.watched.console_errors and not page.watched.page_errors


def test_shift_enter_is_a_new_line_and_enter_sends(page: Page, gateway_url: str):
    open_page(page, gateway_url)
    box = page.locator("#message-input")
    box.type("first line")
    box.press("Shift+Enter")
    box.type("second line")
    assert box.input_value() == "first line\nsecond line"
    assert page.watched.chat_bodies == []
    box.press("Enter")
    expect(page.locator(".message.user .message-body")).to_have_text("first line\nsecond line")
    expect(box).to_have_value("")
    expect(box).to_be_focused()
    wait_until_answered(page)


def test_the_stop_button_cancels_the_generation_on_the_server(page: Page, gateway_url: str, generation_server):
    _, engine = generation_server
    open_page(page, gateway_url)
    set_setting(page, "temperature", "0")  # greedy: the same long answer every run, never an early end
    set_setting(page, "max_tokens", "700")
    set_setting(page, "retrieval", False)
    ask(page, "Tell me a very long story.")
    answer = last_answer(page)
    expect(answer.locator(".message-body")).not_to_have_text(re.compile(r"^(Waiting for the first token…)?$"))
    assert engine.active_sequences == 1
    page.locator("#send-button").click()

    expect(page.locator("#send-button")).to_have_text("Send")
    expect(answer.locator(".message-state")).to_have_text("Stopped.")
    assert wait_for(lambda: engine.active_sequences == 0, timeout=5), "the generation kept running after Stop"
    shown = answer.locator(".message-body").inner_text()
    page.wait_for_timeout(500)
    assert answer.locator(".message-body").inner_text() == shown, "text kept arriving after Stop"
    expect(page.locator("#message-input")).to_be_focused()


def test_conversations_survive_a_reload_and_stay_separate(page: Page, gateway_url: str):
    open_page(page, gateway_url)
    ask(page, "First: where is Zurich?")
    wait_until_answered(page)
    page.locator("#new-conversation").click()
    expect(page.locator(".message")).to_have_count(0)
    ask(page, "Second: what is the capital of France?")
    wait_until_answered(page)

    page.reload()
    open_page(page, gateway_url)
    titles = page.locator(".conversation-title")
    expect(titles).to_have_text(["Second: what is the capital of France?", "First: where is Zurich?"])
    expect(page.locator(".message.user .message-body")).to_have_text(["Second: what is the capital of France?"])
    expect(page.locator(".conversation.current .conversation-title")).to_have_text(re.compile("^Second"))
    titles.nth(1).click()
    expect(page.locator(".message.user .message-body")).to_have_text(["First: where is Zurich?"])
    expect(page.locator(".message.assistant")).to_have_count(1)
    expect(last_answer(page).locator(".source-title").first).to_have_text("Zurich")


def test_a_conversation_is_renamed_and_deleted_from_the_list(page: Page, gateway_url: str):
    open_page(page, gateway_url)
    ask(page, "Where is Geneva?")
    wait_until_answered(page)
    page.get_by_role("button", name="Rename “Where is Geneva?”").click()
    page.get_by_label("New name for “Where is Geneva?”").fill("Trip planning")
    page.keyboard.press("Enter")
    expect(page.locator(".conversation-title")).to_have_text(["Trip planning"])
    page.reload()
    expect(page.locator(".conversation-title")).to_have_text(["Trip planning"])

    delete = page.get_by_role("button", name="Delete “Trip planning”")
    delete.click()
    expect(page.locator(".conversation-title")).to_have_count(1)  # the first click only asks
    page.get_by_role("button", name="Confirm: Delete “Trip planning”").click()
    expect(page.locator(".conversation-title")).to_have_count(0)
    expect(page.locator(".message")).to_have_count(0)
    page.reload()
    expect(page.locator("#messages .empty-hint")).to_be_visible()
    expect(page.locator(".conversation-title")).to_have_count(0)


def test_regenerate_asks_again_and_edit_replaces_the_last_question(page: Page, gateway_url: str):
    open_page(page, gateway_url)
    ask(page, "Where is Zurich?")
    wait_until_answered(page)
    page.get_by_role("button", name="Regenerate the last answer").click()
    wait_until_answered(page)
    first, again = page.watched.chat_bodies
    assert again["messages"] == first["messages"] == [{"role": "user", "content": "Where is Zurich?"}]
    expect(page.locator(".message.assistant")).to_have_count(1)

    page.get_by_role("button", name="Edit your last question").click()
    page.get_by_label("Edit your question").fill("Where is Basel?")
    page.get_by_role("button", name="Send edited question").click()
    wait_until_answered(page)
    assert page.watched.chat_bodies[-1]["messages"] == [{"role": "user", "content": "Where is Basel?"}]
    expect(page.locator(".message.user .message-body")).to_have_text(["Where is Basel?"])
    expect(page.locator(".message.assistant")).to_have_count(1)


def test_a_follow_up_carries_the_earlier_answers_sources_beside_their_question(page: Page, gateway_url: str):
    open_page(page, gateway_url)
    sample_with_seed(page, LONG_SEED)
    ask(page, "Where is Zurich?")
    wait_until_answered(page)
    ask(page, "How many people live there?")
    wait_until_answered(page)
    first, follow_up = page.watched.chat_bodies
    question, answer, again = follow_up["messages"]
    assert question["content"] == "Where is Zurich?" and answer["role"] == "assistant" and "sources" not in again
    assert question["sources"], "the first turn's passages were not sent back with it"
    assert {"id", "title", "text", "url"} == set(question["sources"][0])
    assert "Zurich" in [source["title"] for source in question["sources"]]
    assert "sources" not in first["messages"][0]


def test_a_gateway_that_appends_sources_to_the_text_shows_them_once(
    page: Page, orchestrator_address: str, generation_address: str, retrieval_address: str
):
    gateway = start_gateway(orchestrator_address, generation_address, retrieval_address, citations="markdown")
    try:
        open_page(page, gateway.url)
        sample_with_seed(page, LONG_SEED)
        ask(page, "Where is Zurich?")
        wait_until_answered(page)
        expect(last_answer(page).locator(".source-title").first).to_have_text("Zurich")
        expect(last_answer(page).locator(".message-body")).not_to_be_empty()
        expect(last_answer(page).locator(".message-body")).not_to_contain_text("Sources:")
        ask(page, "How many people live there?")
        wait_until_answered(page)
        assert "Sources:" not in page.watched.chat_bodies[-1]["messages"][1]["content"]
    finally:
        gateway.stop()


def test_a_cited_source_is_linked_from_its_marker_and_marked_while_the_index_build_is_told_once(
    page: Page, cited_orchestrator_address: str, generation_address: str, retrieval_address: str
):
    """An orchestrator that cites (the tiny model never does): its answer says "[2]" and "[9]" of two sources."""
    gateway = start_gateway(cited_orchestrator_address, generation_address, retrieval_address)
    try:
        open_page(page, gateway.url)
        ask(page, "Where is Zurich?")
        wait_until_answered(page)
        answer = last_answer(page)
        cite = answer.locator(".message-body button.cite")
        expect(cite).to_have_count(1)
        expect(cite).to_have_text("[2]")
        expect(cite).to_have_attribute("aria-label", "Source 2: Zurich")
        expect(answer.locator(".message-body")).to_contain_text("Geneva is another [9].")  # no source 9: plain text
        geneva, zurich = answer.locator("details.source").all()
        expect(zurich).to_have_class(re.compile(r"\bcited\b"))
        expect(zurich.locator(".source-cited")).to_have_text("cited")
        expect(geneva).not_to_have_class(re.compile(r"\bcited\b"))
        expect(geneva.locator(".source-cited")).to_have_count(0)
        # told once, though the orchestrator's notice says it as well
        expect(answer.locator(".message-state")).to_have_text(
            "The index is still building: 4,000 of 10,033 documents indexed."
        )
        cite.click()
        expect(zurich.locator(".source-passage")).to_be_visible()
        expect(geneva.locator(".source-passage")).to_be_hidden()
        expect(zurich.locator("summary")).to_be_focused()
        screenshot(page, "web-cited-source.png")
        page.reload()
        open_page(page, gateway.url)
        expect(last_answer(page).locator("details.source.cited .source-title")).to_have_text("Zurich")
        assert not page.watched.console_errors and not page.watched.page_errors
    finally:
        gateway.stop()


def test_settings_show_the_servers_defaults_are_sent_and_are_kept(
    page: Page, orchestrator_address: str, generation_address: str, retrieval_address: str
):
    from services.gateway.translate import SamplingDefaults

    gateway = start_gateway(
        orchestrator_address,
        generation_address,
        retrieval_address,
        defaults=SamplingDefaults(0.35, 0.95, 20, 48, grounded_temperature=0.15),
    )
    try:
        open_page(page, gateway.url)
        page.locator("#settings-toggle").click()
        # answering from the index (retrieval on by default): the grounded temperature
        expect(page.locator("#setting-temperature")).to_have_value("0.15")
        expect(page.locator("#setting-temperature-hint")).to_have_text(
            re.compile("^Server default: 0.35 .*; 0.15 answering from the index$")
        )
        expect(page.locator("#setting-max-tokens-hint")).to_have_text("Server default: 48")
        expect(page.locator("#setting-retrieval-hint")).to_have_text("Server default: on")
        ask(page, "Where is Zurich?")
        wait_until_answered(page)
        sent = page.watched.chat_bodies[-1]
        assert (sent["temperature"], sent["top_p"], sent["top_k"], sent["max_tokens"]) == (0.15, 0.95, 20, 48)
        assert sent["retrieval"] is True and sent["stream"] is True and "seed" not in sent
        set_setting(page, "retrieval", False)  # a plain chat: the plain default again
        expect(page.locator("#setting-temperature")).to_have_value("0.35")
        set_setting(page, "retrieval", True)
        expect(page.locator("#setting-temperature")).to_have_value("0.15")

        set_setting(page, "temperature", "0.2")
        set_setting(page, "top_p", "0.9")
        set_setting(page, "max_tokens", "12")
        set_setting(page, "retrieval", False)
        set_setting(page, "retrieval_k", "2")
        set_setting(page, "system_prompt", "You are terse.")
        set_setting(page, "seed", "7")
        ask(page, "And Geneva?")
        wait_until_answered(page)
        sent = page.watched.chat_bodies[-1]
        assert (sent["temperature"], sent["top_p"], sent["max_tokens"], sent["retrieval_k"]) == (0.2, 0.9, 12, 2)
        assert sent["retrieval"] is False and sent["seed"] == 7
        assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
        expect(last_answer(page).locator(".source")).to_have_count(0)

        page.reload()
        page.locator("#settings-toggle").click()
        expect(page.locator("#setting-temperature")).to_have_value("0.2")
        expect(page.locator("#setting-system-prompt")).to_have_value("You are terse.")
        page.get_by_role("button", name="Reset to server defaults").click()
        expect(page.locator("#setting-temperature")).to_have_value("0.15")
        expect(page.locator("#setting-retrieval")).to_be_checked()
    finally:
        gateway.stop()


def test_without_a_retrieval_service_retrieval_cannot_be_turned_on(
    page: Page, orchestrator_address: str, generation_address: str
):
    gateway = start_gateway(orchestrator_address, generation_address, None)
    try:
        open_page(page, gateway.url)
        page.locator("#settings-toggle").click()
        expect(page.locator("#setting-retrieval")).to_be_disabled()
        expect(page.locator("#setting-retrieval")).not_to_be_checked()
        expect(page.locator("#setting-retrieval-hint")).to_have_text("This gateway has no retrieval service behind it.")
        ask(page, "Where is Zurich?")
        wait_until_answered(page)
        assert page.watched.chat_bodies[-1]["retrieval"] is False
        expect(last_answer(page).locator(".source")).to_have_count(0)
    finally:
        gateway.stop()


# --- states: each says what happened, none spins forever ---------------------------------------------------------


def sse(*events: dict | str) -> str:
    return "".join(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n" for event in events)


def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


def error_body(message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


MOCKED = {
    "busy": (
        {"status": 429, "headers": {"Retry-After": "7"}, "json": error_body("engine full", "rate_limit_error")},
        "The server is busy: try again in 7 s",
    ),
    "deadline": (
        {"status": 504, "json": error_body("the orchestrator did not answer within 600 s", "timeout")},
        "The answer ran past its deadline",
    ),
    "backend down": (
        {"status": 503, "json": error_body("generation at 127.0.0.1:1 is unavailable", "service_unavailable")},
        "A backend is down: generation at 127.0.0.1:1 is unavailable",
    ),
    "error mid-stream": (
        {
            "body": sse(
                chunk({"role": "assistant"}), chunk({"content": "Zur"}), error_body("generation died", "x"), "[DONE]"
            )
        },
        "generation died",
    ),
    "stream cut": (
        {"body": sse(chunk({"role": "assistant"}), chunk({"content": "Zur"}))},
        "The connection closed before the answer was complete.",
    ),
    "length": (
        {"body": sse(chunk({"role": "assistant"}), chunk({"content": "Zurich is"}), chunk({}, "length"), "[DONE]")},
        "Stopped at the max tokens limit.",
    ),
}


@pytest.mark.parametrize("case", list(MOCKED))
def test_each_failure_says_what_happened_and_the_page_stays_usable(page: Page, gateway_url: str, case: str):
    response, shown = MOCKED[case]
    if "body" in response:
        response = {"status": 200, "headers": {"Content-Type": "text/event-stream"}, "body": response["body"]}
    page.route("**/v1/chat/completions", lambda route: route.fulfill(**response))
    open_page(page, gateway_url)
    ask(page, "Where is Zurich?")
    wait_until_answered(page, timeout=10_000)
    expect(last_answer(page).locator(".message-state")).to_contain_text(shown)
    expect(page.locator("#message-input")).to_be_editable()
    expect(page.get_by_role("button", name="Regenerate the last answer")).to_be_visible()


def test_an_empty_answer_says_so_and_can_be_regenerated(page: Page, generation_address: str, retrieval_address: str):
    from services.orchestrator.grounding import Grounding

    # the seeds were found for the plain prompt: the tiny model's sampled answer depends on every prompt token
    orchestrator = start_orchestrator(generation_address, retrieval_address, grounding=Grounding.plain())
    gateway = start_gateway(orchestrator.address, generation_address, retrieval_address)
    try:
        open_page(page, gateway.url)
        sample_with_seed(page, EMPTY_SEED)
        ask(page, "Where is Zurich?")
        wait_until_answered(page)
        answer = last_answer(page)
        expect(answer).to_have_attribute("data-state", "empty")
        expect(answer.locator(".message-state")).to_have_text(re.compile("^The model returned an empty answer"))
        expect(answer.locator(".source-title").first).to_have_text("Zurich")
        sample_with_seed(page, LONG_SEED)
        page.get_by_role("button", name="Regenerate the last answer").click()
        wait_until_answered(page)
        expect(last_answer(page)).to_have_attribute("data-state", "length")
    finally:
        gateway.stop()
        orchestrator.stop(grace=1)


def test_a_backend_down_is_named_and_the_page_recovers_when_it_is_back(page: Page, tiny_loaded, retrieval_address: str):
    from services.common.server import free_port
    from services.generation.loading import start_engine
    from services.generation.server import start_generation_server

    generation = f"127.0.0.1:{free_port()}"
    orchestrator = start_orchestrator(generation, retrieval_address)
    gateway = start_gateway(orchestrator.address, generation, retrieval_address)
    engine = running = None
    try:
        open_page(page, gateway.url)
        banner = page.locator("#health-banner")
        sample_with_seed(page, LONG_SEED)
        expect(banner).to_contain_text("The generation backend is down")
        expect(page.locator("#model-name")).to_have_text("model unknown: generation does not answer")
        ask(page, "Where is Zurich?")
        wait_until_answered(page)
        expect(last_answer(page).locator(".message-state.error")).to_contain_text("generation")
        screenshot(page, "web-backend-down.png")

        engine = start_engine(tiny_loaded)
        running = start_generation_server(tiny_loaded, engine, generation, default_max_new_tokens=16)
        expect(banner).to_be_hidden(timeout=30_000)
        served = f"{tiny_loaded.name}:{tiny_loaded.version}" if tiny_loaded.version else tiny_loaded.name
        expect(page.locator("#model-name")).to_have_text(served)
        page.get_by_role("button", name="Regenerate the last answer").click()
        wait_until_answered(page)
        expect(last_answer(page)).to_have_attribute("data-state", re.compile("done|length"))
    finally:
        gateway.stop()
        orchestrator.stop(grace=1.0)
        if running:
            engine.shutdown(grace=1.0)
            running.stop(grace=1.0)


# --- your documents, tokens and roles ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def documents_url(embedder, generation_address: str, tmp_path_factory) -> Iterator[str]:
    """A gateway that asks for tokens, over an index of its own that starts empty and that the tests write."""
    from services.retrieval.index import create_index, load_index
    from services.retrieval.retriever import Retriever
    from services.retrieval.server import start_retrieval_server

    folder = tmp_path_factory.mktemp("web-docs")
    tokens_file = folder / "tokens"
    tokens_file.write_text(f"admin {ADMIN_TOKEN} page-admin\nchat {CHAT_TOKEN} page-chat\n")
    index = create_index(folder / "indexes" / "page", embedder.name, embedder.dimension)
    retriever = Retriever(embedder, load_index(index, writable=True))
    retrieval = start_retrieval_server(retriever, "127.0.0.1:0")
    orchestrator = start_orchestrator(generation_address, retrieval.address)
    gateway = start_gateway(orchestrator.address, generation_address, retrieval.address, tokens_file=tokens_file)
    yield gateway.url
    gateway.stop()
    orchestrator.stop(grace=1.0)
    retrieval.stop(grace=None)
    retriever.index.close()


def upload(page: Page, *files: tuple[str, str]) -> None:
    if page.locator("#documents-panel").is_hidden():
        page.locator("#documents-toggle").click()
    page.locator("#document-files").set_input_files(
        [{"name": name, "mimeType": "text/plain", "buffer": text.encode()} for name, text in files]
    )


def drop(page: Page, name: str, text: str) -> None:
    """Drops one file on the drop zone, as a drag from the desktop does."""
    if page.locator("#documents-panel").is_hidden():
        page.locator("#documents-toggle").click()
    page.evaluate(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, {type: 'text/markdown'}));
            const zone = document.querySelector('#drop-zone');
            for (const type of ['dragenter', 'dragover', 'drop']) {
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
            }
        }""",
        [name, text],
    )


LIGHTHOUSE = (
    "quillon.md",
    "# The Quillon lighthouse\n\nThe Quillon lighthouse stands on a basalt reef. "
    "Its keeper, Marta Quist, painted it violet in 1931. Ships call it the violet lamp.",
)
BAKERY = ("bakery.txt", "The bakery on Mill Street sells rye bread. It opens at six in the morning.")


def test_without_a_token_the_page_asks_for_one_and_says_why_a_question_failed(page: Page, documents_url: str):
    open_page(page, documents_url)
    expect(page.locator("#token-form")).to_be_visible()
    expect(page.locator("#token-status")).to_have_text("This gateway needs a token (chat or admin).")
    page.locator("#message-input").click()
    ask(page, "Where is Zurich?")
    wait_until_answered(page)
    expect(last_answer(page).locator(".message-state.error")).to_contain_text("A valid token is needed")

    use_token(page, CHAT_TOKEN)
    expect(page.locator("#token-status")).to_have_text("A token is set for this tab.")
    page.get_by_role("button", name="Regenerate the last answer").click()
    wait_until_answered(page)
    expect(last_answer(page)).to_have_attribute("data-state", re.compile("done|length|empty"))
    assert page.evaluate("localStorage.getItem('nightcap.token')") is None, "the token outlived the session"


def test_a_chat_token_is_refused_on_documents_with_a_visible_message(page: Page, documents_url: str):
    open_page(page, documents_url)
    use_token(page, CHAT_TOKEN)
    page.locator("#documents-toggle").click()
    expect(page.locator("#documents-message")).to_contain_text("This token's role may not do that")
    upload(page, BAKERY)
    expect(page.locator("#upload-text")).to_have_text("0 of 1 indexed, 1 not.")
    expect(page.locator("#documents-message")).to_contain_text("needs the admin role")
    screenshot(page, "web-documents-refused.png")


def test_a_document_added_from_the_page_is_listed_then_cited_and_then_deleted(page: Page, documents_url: str):
    open_page(page, documents_url)
    use_token(page, ADMIN_TOKEN)
    upload(page, LIGHTHOUSE, BAKERY, ("empty.md", ""), ("slides.pdf", "%PDF"))
    expect(page.locator("#upload-text")).to_have_text("2 of 4 indexed, 2 not.", timeout=60_000)
    expect(page.locator("#upload-errors li")).to_have_count(2)
    expect(page.locator("#upload-errors")).to_contain_text("empty.md")
    expect(page.locator("#upload-errors")).to_contain_text("slides.pdf")
    documents = page.locator("#document-list .document-title")
    expect(documents).to_contain_text(["The Quillon lighthouse"])
    expect(page.locator("#documents-stats")).to_contain_text("2 documents")

    ask(page, "What colour did Marta Quist paint the Quillon lighthouse?")
    wait_until_answered(page)
    source = last_answer(page).locator("details.source").first
    expect(source.locator(".source-title")).to_have_text("The Quillon lighthouse")
    source.locator("summary").click()
    expect(source.locator(".source-passage")).to_contain_text("painted it violet in 1931")
    screenshot(page, "web-own-document-cited.png")

    page.get_by_role("button", name="Delete document quillon.md").click()
    page.get_by_role("button", name="Confirm: Delete document quillon.md").click()
    expect(page.locator("#documents-message")).to_contain_text("Deleted quillon.md")
    expect(documents).not_to_contain_text(["The Quillon lighthouse"])
    page.locator("#new-conversation").click()
    ask(page, "What colour did Marta Quist paint the Quillon lighthouse?")
    wait_until_answered(page)
    expect(last_answer(page).locator(".source-title")).not_to_contain_text(["The Quillon lighthouse"])
    page.get_by_role("button", name="Delete document bakery.txt").click()
    page.get_by_role("button", name="Confirm: Delete document bakery.txt").click()
    expect(page.locator("#documents-stats")).to_contain_text("0 documents")


def test_a_long_document_list_comes_a_page_at_a_time(page: Page, documents_url: str):
    lines = [
        json.dumps({"id": f"bulk/{n:03}", "title": f"Note {n}", "text": f"Note {n} is short."}) for n in range(105)
    ]
    open_page(page, documents_url)
    use_token(page, ADMIN_TOKEN)
    try:
        upload(page, ("bulk.jsonl", "\n".join(lines)))
        expect(page.locator("#upload-text")).to_have_text("1 of 1 indexed.", timeout=90_000)
        expect(page.locator("#document-list li")).to_have_count(100)
        more = page.get_by_role("button", name="Show more (100 of 105 shown)")
        more.click()
        expect(page.locator("#document-list li")).to_have_count(105)
        expect(more).to_be_hidden()
    finally:
        for n in range(105):
            request = urllib.request.Request(
                f"{documents_url}/v1/documents/bulk%2F{n:03}",
                method="DELETE",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            urllib.request.urlopen(request, timeout=30).close()


# --- safety: untrusted text stays text ---------------------------------------------------------------------------


def test_a_hostile_document_shows_as_text_and_nothing_in_it_runs(page: Page, documents_url: str):
    hostile = (
        "zorblax.md",
        f"# Zorblax {HOSTILE_MARKUP}\n\nThe Zorblax festival {HOSTILE_SCRIPT} is held every spring. "
        f"Visitors of the Zorblax festival eat blue soup {HOSTILE_MARKUP} and [win](javascript:alert(3)).",
    )
    open_page(page, documents_url)
    use_token(page, ADMIN_TOKEN)
    drop(page, *hostile)
    expect(page.locator("#upload-text")).to_have_text("1 of 1 indexed.", timeout=60_000)
    expect(page.locator("#document-list")).to_contain_text(f"Zorblax {HOSTILE_MARKUP}")
    ask(page, "When is the Zorblax festival held?")
    wait_until_answered(page)
    source = last_answer(page).locator("details.source").first
    expect(source.locator(".source-title")).to_have_text(f"Zorblax {HOSTILE_MARKUP}")
    source.locator("summary").click()
    expect(source.locator(".source-passage")).to_contain_text(HOSTILE_SCRIPT)
    page.wait_for_timeout(300)

    assert page.evaluate("window.__pwned") is None
    assert page.watched.dialogs == []
    assert page.locator("#messages img, #messages script, #document-list img").count() == 0
    assert not any(url.endswith("/x") for url in page.watched.requests), "the hostile <img> was loaded"
    assert not page.watched.console_errors and not page.watched.page_errors
    page.get_by_role("button", name="Delete document zorblax.md").click()
    page.get_by_role("button", name="Confirm: Delete document zorblax.md").click()
    expect(page.locator("#documents-stats")).to_contain_text("0 documents")


def test_an_answer_that_repeats_markup_renders_as_text_with_only_safe_links(page: Page, gateway_url: str):
    answer = (
        f"Here it is: {HOSTILE_MARKUP} and {HOSTILE_SCRIPT} [1].\n\n"
        "- [a javascript link](javascript:alert(4))\n- [a data link](data:text/html,<script>alert(5)</script>)\n"
        "- [a real one](https://example.org/page)\n\n```html\n<iframe src=//evil.example></iframe>\n```"
    )
    source = {"index": 1, "id": "x#0", "title": HOSTILE_MARKUP, "url": "javascript:alert(6)", "score": 0.5,
              "snippet": HOSTILE_SCRIPT, "text": HOSTILE_SCRIPT}  # fmt: skip
    body = sse(
        chunk({"role": "assistant"}, nightcap={"sources": [source]}),
        chunk({"content": answer}),
        chunk({}, "stop", nightcap={"cited": [1], "notice": HOSTILE_MARKUP, "context_used": True}),
        "[DONE]",
    )
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body),
    )
    open_page(page, gateway_url)
    ask(page, "Repeat after me")
    wait_until_answered(page)
    message = last_answer(page)
    expect(message.locator(".message-body")).to_contain_text(f"Here it is: {HOSTILE_MARKUP} and {HOSTILE_SCRIPT}")
    expect(message.locator(".message-body pre code")).to_have_text("<iframe src=//evil.example></iframe>")
    links = message.locator("a")
    expect(links).to_have_count(1)
    expect(links).to_have_attribute("href", "https://example.org/page")
    message.locator("button.cite").click()
    expect(message.locator(".source-passage")).to_have_text(HOSTILE_SCRIPT)
    page.wait_for_timeout(300)
    assert message.locator("img, script, iframe").count() == 0
    assert page.evaluate("window.__pwned") is None
    assert page.watched.dialogs == []


OPENS = 'rel="noopener noreferrer" target="_blank"'  # what every link gets
CITE = '<button class="cite">[%d]</button>'
MARKDOWN = {
    "**bold**, *italic*, _also_ and `code`": (
        "<p><strong>bold</strong>, <em>italic</em>, <em>also</em> and <code>code</code></p>"
    ),
    "snake_case_name and 2 * 3 * 4": "<p>snake_case_name and 2 * 3 * 4</p>",
    "\\*not italic\\*": "<p>*not italic*</p>",
    "line one\nline two\n\nnext paragraph": "<p>line one<br>line two</p><p>next paragraph</p>",
    "## A heading": "<h4>A heading</h4>",
    "- one\n- two\n  1. nested\n- three": "<ul><li>one</li><li>two<ol><li>nested</li></ol></li><li>three</li></ul>",
    "3. three\n4. four": '<ol start="3"><li>three</li><li>four</li></ol>',
    "```python\nprint('<b>')\n```": "<pre><code data-language=\"python\">print('&lt;b&gt;')</code></pre>",
    "```\nstill streaming": "<pre><code>still streaming</code></pre>",
    "> quoted **text**": "<blockquote><p>quoted <strong>text</strong></p></blockquote>",
    "---": "<hr>",
    "[docs](https://example.org/a?b=1)": f'<p><a href="https://example.org/a?b=1" {OPENS}>docs</a></p>',
    "see https://example.org/x.": f'<p>see <a href="https://example.org/x" {OPENS}>https://example.org/x</a>.</p>',
    "[x](javascript:alert(1)) [y](/relative) [z](data:text/html,hi)": (
        "<p>[x](javascript:alert(1)) [y](/relative) [z](data:text/html,hi)</p>"
    ),
    "Zurich [1], lakes [1, 2]; not [7]": f"<p>Zurich {CITE % 1}, lakes {CITE % 1}{CITE % 2}; not [7]</p>",
    "<img src=x onerror=alert(1)>": "<p>&lt;img src=x onerror=alert(1)&gt;</p>",
}


def test_the_markdown_subset_becomes_these_elements(page: Page, gateway_url: str):
    open_page(page, gateway_url)
    rendered = page.evaluate(
        """async (cases) => {
            const { renderMarkdown } = await import('/web/markdown.js');
            const citation = (n) => {
                if (n > 2) return null;
                const button = document.createElement('button');
                button.className = 'cite';
                button.textContent = `[${n}]`;
                return button;
            };
            return cases.map((text) => {
                const holder = document.createElement('div');
                holder.append(renderMarkdown(text, { citation }));
                return holder.innerHTML;
            });
        }""",
        list(MARKDOWN),
    )
    assert dict(zip(MARKDOWN, rendered, strict=True)) == MARKDOWN


def test_the_content_security_policy_is_sent_and_blocks_inline_script(page: Page, gateway_url: str):
    response = page.goto(gateway_url)
    assert response.headers["content-security-policy"] == CSP
    violations = page.evaluate(
        """() => new Promise((resolve) => {
            const seen = [];
            document.addEventListener('securitypolicyviolation', (event) => seen.push(event.violatedDirective));
            const script = document.createElement('script');
            script.textContent = 'window.__inline = 1';
            document.body.append(script);
            const img = document.createElement('img');
            img.src = 'https://example.org/pixel.png';
            document.body.append(img);
            setTimeout(() => resolve(seen), 300);
        })"""
    )
    assert page.evaluate("window.__inline") is None
    assert {"script-src-elem", "img-src"} <= set(violations)


# The browser APIs that parse a string as HTML or run it as code: none may appear in the page's modules.
STRING_TO_MARKUP_OR_CODE = re.compile(r"\b(innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(|new Function)")


def test_no_module_of_the_page_builds_markup_from_strings():
    scripts = {path.name: path.read_text() for path in WEB_DIR.glob("*.js")}
    assert {"app.js", "api.js", "store.js", "markdown.js"} <= set(scripts)
    for name, text in scripts.items():
        assert not STRING_TO_MARKUP_OR_CODE.findall(text), f"{name} parses a string as markup or code"
    html = (WEB_DIR / "index.html").read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)", html) == [], "inline <script> in index.html"
    assert " style=" not in html and not re.search(r"\son[a-z]+=", html)
    assert "http://" not in html and "https://" not in html, "index.html loads something from elsewhere"


# --- keyboard, screen readers, weight and speed ------------------------------------------------------------------


def test_every_control_has_a_name_and_focus_is_visible(page: Page, gateway_url: str):
    open_page(page, gateway_url)
    ask(page, "Where is Zurich?")
    wait_until_answered(page)
    page.locator("#settings-toggle").click()
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('button, input, textarea, select, summary')]
            .filter((node) => node.checkVisibility())
            .filter((node) => !(node.labels?.length || node.getAttribute('aria-label') || node.textContent.trim()))
            .map((node) => node.outerHTML.slice(0, 80))"""
    )
    assert unnamed == []
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none"), "the focused control shows no outline"


def test_the_page_weighs_under_300_kb():
    total = sum(path.stat().st_size for path in WEB_DIR.rglob("*") if path.is_file())
    assert total <= 300 * 1024, f"the page's files weigh {total} bytes"


def test_enter_draws_the_first_token_as_a_bare_fetch_reads_it(page: Page, gateway_url: str, capsys):
    """Enter to the first token drawn, beside a bare fetch to its first content chunk: both arrive, every time.
    The times are printed, not asserted (a timed test would only measure this machine's load)."""
    open_page(page, gateway_url)
    set_setting(page, "max_tokens", "4")
    set_setting(page, "retrieval", False)
    sample_with_seed(page, LONG_SEED)  # never an empty answer, whose first token would never come
    bare, shown = [], []
    for _ in range(5):
        bare.append(
            page.evaluate(
                """async () => {
                    const started = performance.now();
                    const response = await fetch('/v1/chat/completions', {method: 'POST',
                        headers: {'Content-Type': 'application/json'},
                        body: JSON.stringify({messages: [{role: 'user', content: 'Hi'}], stream: true,
                                              max_tokens: 4, retrieval: false, seed: 1})});
                    const reader = response.body.getReader();
                    const decoder = new TextDecoder();
                    let text = '';
                    for (;;) {
                        const {value, done} = await reader.read();
                        if (done) return null;
                        text += decoder.decode(value, {stream: true});
                        if (text.includes('"content"')) { reader.cancel(); return performance.now() - started; }
                    }
                }"""
            )
        )
        page.locator("#new-conversation").click()
        page.locator("#message-input").fill("Hi")
        shown.append(
            page.evaluate(
                """() => new Promise((resolve) => {
                    const log = document.querySelector('#messages');
                    let started = 0;
                    const observer = new MutationObserver(() => {
                        const body = log.querySelector('.message.assistant .message-body');
                        if (body && body.textContent && !body.querySelector('.waiting')) {
                            observer.disconnect();
                            resolve(performance.now() - started);
                        }
                    });
                    observer.observe(log, {subtree: true, childList: true, characterData: true});
                    setTimeout(() => resolve(null), 20000);
                    started = performance.now();
                    document.querySelector('#message-input').dispatchEvent(
                        new KeyboardEvent('keydown', {key: 'Enter', bubbles: true}));
                })"""
            )
        )
        wait_until_answered(page)
    assert None not in bare and None not in shown, f"an answer had no first token: {bare}, {shown}"
    with capsys.disabled():
        added = statistics.median(shown) - statistics.median(bare)
        print(f"\nfirst token: bare fetch {bare} ms, page {shown} ms; the page adds {added:.0f} ms (median)")


# --- the embedded default, end to end ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_the_embedded_default_answers_where_is_zurich_on_the_page(
    page: Page, default_generation_address: str, retrieval_address: str
):
    orchestrator = start_orchestrator(default_generation_address, retrieval_address, max_new_tokens=48)
    gateway = start_gateway(orchestrator.address, default_generation_address, retrieval_address)
    try:
        open_page(page, gateway.url)
        expect(page.locator("#model-name")).to_have_text("smollm2-135m-instruct:1")
        set_setting(page, "temperature", "0")
        set_setting(page, "max_tokens", "48")
        page.locator("#settings-toggle").click()
        ask(page, "Where is Zurich?")
        answer = last_answer(page)
        expect(answer.locator(".source-title").first).to_have_text("Zurich")
        expect(answer.locator(".message-body")).to_have_text(re.compile(r"^Zurich.{40}"))  # a sentence in
        screenshot(page, "web-default-model-streaming.png")
        wait_until_answered(page, timeout=120_000)
        expect(answer.locator(".message-body")).to_contain_text("Switzerland")
        answer.locator("details.source summary").first.click()
        expect(answer.locator(".source-passage").first).to_contain_text("largest city in Switzerland")
        screenshot(page, "web-default-model-answer.png")
    finally:
        gateway.stop()
        orchestrator.stop(grace=1.0)
