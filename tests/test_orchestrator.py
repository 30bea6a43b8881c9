"""The three services together, through the client library: retrieval, prompt formats, history
trimming, bad input and backends that are down."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import start_orchestrator, train_tiny_tokenizer

from clients import (
    ChatClient,
    ChatFinished,
    ChatStarted,
    Document,
    IndexClient,
    Message,
    NightcapError,
    SamplingParams,
    TextDelta,
)
from nightcap.records import Passage
from nightcap.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    chat_pb2,
    chat_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
)
from services.common.errors import SERVER_KEY
from services.common.server import ServiceBinding, free_port, start_server
from services.orchestrator.backends import GenerationBackend, RetrievalBackend
from services.orchestrator.conversation import ChatOrchestrator, PreparedTurn, QueryMode, TurnRequest
from services.orchestrator.grounding import (
    Grounding,
    asked_about,
    asked_subject,
    cited,
    cut_passages,
    leads,
    sentences_of,
)
from services.orchestrator.prompts import (
    ADMISSION,
    ChatTemplatePrompt,
    ContextPassage,
    ContextStyle,
    OpenChatKitPrompt,
    Turn,
    context_block,
)
from services.orchestrator.server import ChatServicer, _end

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def client(orchestrator_address: str):
    with ChatClient(orchestrator_address, timeout=60) as client:
        yield client


@contextlib.contextmanager
def orchestrator_client(generation_address: str, retrieval_address: str, **kwargs):
    running = start_orchestrator(generation_address, retrieval_address, **kwargs)
    try:
        with ChatClient(running.address, timeout=60) as client:
            yield client
    finally:
        running.stop(grace=1)


@pytest.fixture(scope="module")
def plain_client(generation_address: str, retrieval_address: str):
    """An orchestrator with the prompt before grounding: passages unnumbered, each given once, whole."""
    with orchestrator_client(generation_address, retrieval_address, grounding=Grounding.plain()) as client:
        yield client


def test_a_turn_streams_start_then_text_then_end(client):
    events = list(client.chat("Where is Zurich?", params=GREEDY))
    assert isinstance(events[0], ChatStarted)
    assert isinstance(events[-1], ChatFinished)
    assert all(isinstance(e, TextDelta) for e in events[1:-1])
    assert events[-1].finish_reason in {"length", "eos", "stop_sequence"}
    assert events[-1].completion_tokens >= len(events) - 2 > 0
    assert events[-1].context_used is False


def test_retrieval_puts_the_zurich_passage_first_and_in_the_prompt(client):
    reply = client.ask("Where is Zurich?", retrieval=True, k=2, params=GREEDY)
    sources = reply.started.sources
    assert [s.title for s in sources][:1] == ["Zurich"]
    assert 1 <= len(sources) <= 2  # the sentence cut drops a passage none of whose sentences fit the budget
    assert sources[0].source.endswith("/wiki/Zurich")
    assert sources[0].text in reply.started.prompt
    assert reply.finished.context_used is True
    assert reply.finished.notice == ""


def test_openchatkit_prompt_format_for_a_gpt_neox_without_chat_template(client):
    history = [Message("user", "Hello."), Message("assistant", "Hello human.")]
    reply = client.ask("Where is Zurich?", history=history, params=GREEDY)
    assert reply.started.prompt == "<human>: Hello.\n<bot>: Hello human.\n<human>: Where is Zurich?\n<bot>:"
    assert "<human>:" not in reply.text  # the format's stop sequence is applied


def test_history_is_trimmed_oldest_first_so_the_prompt_fits(client):
    history = []
    for n in range(80):
        history += [Message("user", f"Question {n} about Zurich and Geneva?"), Message("assistant", f"Answer {n}.")]
    reply = client.ask("What about Paris?", history=history, params=SamplingParams(max_new_tokens=40))
    assert reply.started.history_messages_dropped > 0
    assert reply.started.history_messages_dropped % 2 == 0  # whole turns go
    assert reply.finished.prompt_tokens + 40 <= 1024
    assert "Question 0 " not in reply.started.prompt
    assert "Answer 79." in reply.started.prompt
    assert reply.started.prompt.endswith("<human>: What about Paris?\n<bot>:")


def test_a_message_that_cannot_fit_is_invalid_argument(client):
    with pytest.raises(NightcapError) as caught:
        client.ask("Zurich " * 1500, params=GREEDY)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "context window of 1024 tokens" in caught.value.message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"message": "   "}, "the message is empty"),
        ({"params": SamplingParams(max_new_tokens=0)}, "max_new_tokens must be at least 1"),
        ({"params": SamplingParams(max_new_tokens=1024)}, "leaves no room for a prompt"),
        ({"params": SamplingParams(temperature=-1.0)}, "temperature must be >= 0"),
        ({"params": SamplingParams(top_p=1.5)}, "top_p must be in (0, 1]"),
        ({"params": SamplingParams(top_k=-3)}, "top_k must be >= 0"),
        ({"retrieval": True, "k": 0}, "retrieval_k must be between 1 and 100"),
        ({"retrieval": True, "k": 101}, "retrieval_k must be between 1 and 100"),
    ],
)
def test_bad_input_is_invalid_argument_and_the_stack_keeps_serving(client, kwargs, message):
    kwargs = {"message": "Where is Zurich?", **kwargs}
    with pytest.raises(NightcapError) as caught:
        client.ask(**kwargs)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.message
    after = client.ask("Hi", params=GREEDY)
    assert after.finished.completion_tokens > 0 and after.finished.finish_reason in {"length", "eos", "stop_sequence"}


def test_an_unknown_role_is_refused_by_the_client_library(client):
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        client.ask("Hi", history=[Message("robot", "beep")])


def test_chat_answers_without_context_when_retrieval_is_down(generation_address):
    dead = f"127.0.0.1:{free_port()}"
    running = start_orchestrator(generation_address, dead)
    try:
        with ChatClient(running.address, timeout=60) as client:
            reply = client.ask("Where is Zurich?", retrieval=True, params=GREEDY)
            status = client.status()
    finally:
        running.stop(grace=1)
    assert reply.started.sources == []
    assert reply.finished.context_used is False
    assert "retrieval unavailable" in reply.finished.notice and dead in reply.finished.notice
    assert reply.finished.completion_tokens > 0
    by_name = {b.name: b for b in status.backends}
    assert by_name["retrieval"].health == "UNAVAILABLE"
    assert by_name["generation"].health == "SERVING"
    assert status.index is None and status.model is not None


def test_an_orchestrator_that_does_not_answer_is_unavailable_with_its_address():
    dead = f"127.0.0.1:{free_port()}"
    with ChatClient(dead, timeout=10) as client, pytest.raises(NightcapError) as caught:
        client.ask("Where is Zurich?")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert dead in str(caught.value)


def test_status_reports_every_backend_the_model_and_the_index(client):
    status = client.status()
    assert status.orchestrator_health == "SERVING"
    assert {b.name: b.health for b in status.backends} == {"generation": "SERVING", "retrieval": "SERVING"}
    assert status.model["architecture"] == "GPTNeoXForCausalLM"
    assert status.index["dimension"] == 384 and status.index["passages"] > 0


def cancelled_requests(engine) -> float:
    return engine.metrics.registry.get_sample_value("nightcap_generation_requests_total", {"outcome": "cancelled"}) or 0


def test_closing_a_chat_stream_cancels_its_generation_and_frees_its_slot(client, generation_server):
    _, engine = generation_server
    before = cancelled_requests(engine)
    events = client.chat("Tell me about Zurich.", params=SamplingParams(max_new_tokens=900))
    next(events)
    next(events)
    assert engine.active_sequences == 1
    events.close()
    deadline = time.monotonic() + 5
    while engine.active_sequences and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_sequences == 0
    assert cancelled_requests(engine) == before + 1  # stopped by the cancel, not by running out of tokens


def test_a_deadline_that_passes_is_deadline_exceeded(client):
    with pytest.raises(NightcapError) as caught:
        client.ask("Tell me about Zurich.", params=SamplingParams(max_new_tokens=200), timeout=0.05)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_template_renders_exactly_as_transformers_does(tiny_loaded):
    turns = [Turn("system", "Be brief."), Turn("user", "Hi"), Turn("assistant", "Hello."), Turn("user", "Zurich?")]
    tokenizer = tiny_loaded.tokenizer
    expected = tokenizer.apply_chat_template(
        [{"role": t.role, "content": t.content} for t in turns],
        chat_template=CHATML,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert ChatTemplatePrompt(CHATML).render(turns) == expected


def test_a_passage_without_a_title_is_given_as_its_text_alone():
    passages = [
        ContextPassage("", "Zurich is in Switzerland.", "notes.txt"),
        ContextPassage("Bern", "Bern: city.", ""),
    ]
    assert context_block(passages) == "Zurich is in Switzerland.\nBern: city."


def test_numbered_context_asks_for_citations_in_both_formats():
    passages = [
        ContextPassage("Zurich", "Zurich is in Switzerland.", "wiki"),
        ContextPassage("Bern", "Bern: city.", ""),
    ]
    turn = Turn("user", "Where is Zurich?", tuple(passages))
    style = ContextStyle(numbered=True, cite=True, admit=True)
    chatml = ChatTemplatePrompt(CHATML, style=style).render([turn])
    openchatkit = OpenChatKitPrompt(style).render([turn])
    for prompt in (chatml, openchatkit):
        assert "Zurich: Zurich is in Switzerland. [1]\nBern: city. [2]" in prompt
        assert "like [1]" in prompt and ADMISSION in prompt
    quiet = ChatTemplatePrompt(CHATML, style=ContextStyle(numbered=True)).render([turn])
    assert "Switzerland. [1]" in quiet and "like [1]" not in quiet and ADMISSION not in quiet
    assert chatml.index("Where is Zurich?") < chatml.index("Zurich: Zurich")  # context follows the question
    assert openchatkit.index("city. [2]") < openchatkit.index("<human>: Where is Zurich?")


def test_context_follows_the_question_or_comes_as_a_human_turn():
    passages = [ContextPassage("Zurich", "Zurich is in Switzerland.", "wiki")]
    chatml = ChatTemplatePrompt(CHATML).render([Turn("user", "Where is Zurich?", tuple(passages))])
    assert chatml == (
        "<|im_start|>user\nWhere is Zurich?\n\nRelevant information:\nZurich: Zurich is in Switzerland.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    openchatkit = OpenChatKitPrompt().render([Turn("user", "Where is Zurich?", tuple(passages))])
    assert openchatkit == (
        "<human>: Answer the question using the context below when it is relevant.\n"
        "Zurich: Zurich is in Switzerland.\n<human>: Where is Zurich?\n<bot>:"
    )


# --- a conversation: the query it searches, passages given once, the cost of a turn ---------------------


def ask_zurich_then_population(client, **kwargs):
    first = client.ask("Where is Zurich?", retrieval=True, k=2, params=GREEDY)
    history = first.as_history("Where is Zurich?")
    return first, client.ask("How many people live there?", history=history, retrieval=True, k=2, **kwargs)


def test_a_follow_up_searches_with_the_earlier_question_and_finds_its_article(client):
    _, follow_up = ask_zurich_then_population(client, params=GREEDY)
    query = follow_up.started.retrieval_query
    assert "How many people live there?" in query and "Where is Zurich?" in query
    assert follow_up.started.retrieved_ids[0].startswith("Zurich#")


def test_a_follow_ups_mixed_searches_rank_by_vector_and_a_lone_search_by_the_services_default(
    generation_address, retrieval_address, log_lines
):
    """The recent mode sums cosine similarities over the turns' searches, a sum in vector space: its searches
    ask for vector ranking, or keyword where that was asked for; a first turn's lone search takes the service's
    default (hybrid). The follow-up's own words ("How many people live there?") would find passages by words."""

    def modes() -> list[str]:
        found = [line.split(" mode=")[1].split()[0] for line in log_lines if line.startswith("search id=")]
        log_lines.clear()
        return found

    for search_mode, mixed in (
        (retrieval_pb2.SEARCH_MODE_UNSPECIFIED, "vector"),
        (retrieval_pb2.SEARCH_MODE_KEYWORD, "keyword"),
    ):
        orchestrator = ChatOrchestrator(
            GenerationBackend(generation_address), RetrievalBackend(retrieval_address, search_mode=search_mode)
        )
        with chat_server(orchestrator) as client:
            first = client.ask("Where is Zurich?", retrieval=True, k=2, params=GREEDY)
            lone = modes()
            client.ask("How many people live there?", history=first.as_history("Where is Zurich?"), retrieval=True,
                       k=2, params=GREEDY)  # fmt: skip
            assert modes() == [mixed, mixed]
        assert lone == ["hybrid" if mixed == "vector" else "keyword"]


def test_the_last_message_alone_is_searched_in_last_mode(generation_address, retrieval_address):
    running = start_orchestrator(generation_address, retrieval_address, query_mode="last")
    try:
        with ChatClient(running.address, timeout=60) as client:
            _, follow_up = ask_zurich_then_population(client, params=GREEDY)
    finally:
        running.stop(grace=1)
    assert follow_up.started.retrieval_query == "How many people live there?"
    assert not follow_up.started.retrieved_ids[0].startswith("Zurich#")  # the flaw the mix fixes


def test_passages_given_in_an_earlier_turn_are_not_given_again_by_the_plain_prompt(plain_client):
    first, follow_up = ask_zurich_then_population(plain_client, params=GREEDY)
    again = [s for s in first.started.sources if s.id in follow_up.started.retrieved_ids]
    assert again  # found again ...
    zurich = again[0]
    assert zurich.id not in [s.id for s in follow_up.started.sources]  # ... but not given again
    assert follow_up.started.prompt.count(zurich.text) == 1  # it stays beside the first question
    assert len(follow_up.started.sources) == 2  # the new turn still gets k new passages
    assert follow_up.finished.context_used


def test_an_earlier_turns_passage_that_is_again_a_best_hit_is_repeated_beside_the_follow_up(client):
    first, follow_up = ask_zurich_then_population(client, params=GREEDY)
    zurich = first.started.sources[0]
    assert zurich.title == "Zurich"
    repeated = [s for s in follow_up.started.sources if s.id == zurich.id]
    assert repeated, [s.id for s in follow_up.started.sources]  # given again, beside the new question
    prompt = follow_up.started.prompt  # OpenChatKit's format (the tiny model's): context precedes its question
    first_question_at = prompt.index("Where is Zurich?")
    assert prompt.index(zurich.text) < first_question_at  # still beside the first question: its KV stays reusable
    assert first_question_at < prompt.index(repeated[0].text, first_question_at) < prompt.index("live there?")


def test_the_grounded_prompt_numbers_the_passages_and_asks_for_citations(client):
    reply = client.ask("Where is Zurich?", retrieval=True, k=2, params=GREEDY)
    prompt = reply.started.prompt
    assert "cite the one you use, like [1]" in prompt
    assert ADMISSION not in prompt  # off by default: SmolLM2-135M answered every question with it
    for number, source in enumerate(reply.started.sources, 1):
        assert f"{source.text} [{number}]" in prompt


def test_a_llama_folder_with_its_own_chat_template_gets_the_same_grounding(templated_llama_address, retrieval_address):
    """`--model FOLDER`: numbering, repetition, cut and the no-source reply belong to the orchestrator, not to
    the default model's format."""
    with orchestrator_client(templated_llama_address, retrieval_address) as llama:
        first, follow_up = ask_zurich_then_population(llama, params=GREEDY)
        unknown = llama.ask("How many people live in Torvalune?", retrieval=True, params=GREEDY)
    prompt = first.started.prompt
    assert prompt.startswith("[INST] Where is Zurich?") and prompt.endswith(" [/INST]")  # the folder's template
    assert "cite the one you use, like [1]" in prompt
    for number, source in enumerate(first.started.sources, 1):
        assert f"{source.text} [{number}]" in prompt
    zurich = first.started.sources[0]
    assert zurich.title == "Zurich" and len(zurich.text) < 400  # cut to its best sentences
    later = follow_up.started.prompt
    assert later.startswith(prompt)  # the first turn is unchanged: its KV stays reusable
    repeated = [s for s in follow_up.started.sources if s.id == zurich.id]
    assert repeated and later.index("live there?") < later.index(repeated[0].text, len(prompt))
    assert unknown.text == "The documents do not say: none of the passages found mentions Torvalune."


def test_a_question_about_a_name_no_passage_mentions_is_answered_that_no_source_matched(client, plain_client):
    reply = client.ask("How many people live in Torvalune?", retrieval=True, params=GREEDY)
    assert reply.text == "The documents do not say: none of the passages found mentions Torvalune."
    assert reply.started.sources == [] and reply.started.retrieved_ids  # searched, and nothing given
    assert "Torvalune" in reply.finished.notice and reply.finished.context_used is False
    answered = client.ask("How many people live in Zürich?", retrieval=True, params=GREEDY)  # accents aside
    assert answered.started.sources and not answered.text.startswith("The documents do not say")
    plain = plain_client.ask("How many people live in Torvalune?", retrieval=True, params=GREEDY)
    assert plain.started.sources and plain.finished.completion_tokens > 0  # the plain prompt asks the model


def test_a_phone_number_no_passage_mentions_is_answered_that_no_source_matched(client):
    reply = client.ask("What is the phone number of the tourist office in Zurich?", retrieval=True, params=GREEDY)
    assert reply.text.startswith("The documents do not say: none of the passages found mentions phone")
    assert reply.started.sources == [] and reply.started.retrieved_ids and reply.finished.completion_tokens == 0
    answered = client.ask("Where is Zurich?", retrieval=True, params=GREEDY)
    assert answered.started.sources and answered.finished.completion_tokens > 0


def test_passages_are_cut_to_the_sentences_that_answer_the_question(generation_address, retrieval_address):
    question = "How many people live in Zurich?"
    with orchestrator_client(generation_address, retrieval_address, grounding=Grounding(context_tokens=8)) as cut:
        reply = cut.ask(question, retrieval=True, k=2, params=GREEDY)
    with orchestrator_client(generation_address, retrieval_address, grounding=Grounding(cut=False)) as whole:
        uncut = whole.ask(question, retrieval=True, k=2, params=GREEDY)
    assert uncut.started.sources[0].title == "Zurich" and "largest city" in uncut.started.sources[0].text
    # a budget below one sentence keeps the best sentence alone: the population, not the passage's first line
    assert [s.title for s in reply.started.sources] == ["Zurich"]
    assert "population of 436,551" in reply.started.sources[0].text
    assert "largest city" not in reply.started.sources[0].text
    assert reply.started.sources[0].text in reply.started.prompt
    assert len(reply.started.prompt) < len(uncut.started.prompt)


def test_a_kept_sentence_that_points_back_brings_the_one_before_it_just_after_it():
    """The answer first (a small model copies what comes first), then what "It" refers to."""
    shanghai = Passage(
        "Shanghai#0",
        "Shanghai: Shanghai is a municipality in China. It has a population of 30,050,000. The port is busy.",
        title="Shanghai",
    )
    sentences = sentences_of([shanghai])
    scores = np.array([0.2, 0.9, 0.1])  # the population sentence answers the question
    [cut] = cut_passages([shanghai], sentences, scores, budget=100, count=lambda text: len(text.split()))
    assert cut.text.startswith("Shanghai: It has a population of 30,050,000. Shanghai is a municipality in China.")
    [alone] = cut_passages([shanghai], sentences, scores, budget=1, count=lambda text: len(text.split()))
    assert alone.text == "Shanghai: It has a population of 30,050,000. Shanghai is a municipality in China."


def test_a_what_is_question_keeps_the_opening_sentence_of_the_document_it_names_first():
    """Ranked against "What is Utopia?", the sentence that repeats the question's word wins over the lead that
    answers it; the lead of the document titled so is taken first, other documents' leads are not."""
    utopia = Passage(
        "Utopia#0",
        "Utopia: Utopia is a work of fiction by Thomas More. A utopia is an imagined community. It is perfect.",
        title="Utopia",
    )
    later = Passage("Utopia#3", "Utopia: More wrote it in Latin. It was printed in 1516.", title="Utopia")
    other = Passage("Dystopia#0", "Dystopia: A dystopia is the opposite of a utopia. It is grim.", title="Dystopia")
    passages = [other, later, utopia]
    sentences = sentences_of(passages)
    scores = np.array([0.8, 0.1, 0.2, 0.1, 0.3, 0.9, 0.2])  # the "A utopia is ..." sentence ranks first
    assert asked_subject("What is Utopia?") == asked_subject("Tell me about utopia.") == "utopia"
    assert asked_subject("Who was Thomas More?") == "thomas more"
    assert asked_subject("What is the population of Utopia?") == "the population of utopia"
    assert asked_subject("How many people live there?") == ""
    # the title the search looks up: a name as written, not a common noun or a word that points back
    assert asked_about("What is The Four Seasons?") == "The Four Seasons"
    assert asked_about("What is the capital?") == asked_about("Where is it?") == asked_about("Who was He?") == ""
    first = leads(passages, sentences, asked_subject("What is Utopia?"))
    assert [sentences[i].text for i in first] == ["Utopia is a work of fiction by Thomas More."]
    assert leads(passages, sentences, asked_subject("What is the population of Utopia?")) == []
    words = lambda text: len(text.split())  # noqa: E731
    [alone] = cut_passages(passages, sentences, scores, budget=1, count=words, first=first)
    assert alone.text == "Utopia: Utopia is a work of fiction by Thomas More."
    [ranked] = cut_passages(passages, sentences, scores, budget=1, count=words)
    assert ranked.text == "Utopia: A utopia is an imagined community."
    cut = cut_passages(passages, sentences, scores, budget=30, count=words, first=first)
    assert cut[0].text.startswith("Utopia: Utopia is a work of fiction by Thomas More. A utopia is")
    assert [p.id for p in cut] == ["Utopia#0", "Dystopia#0", "Utopia#3"]
    # a title as asked wins over one without its article; without one that matches, "the" is not part of the name
    novella = Passage("The Metamorphosis#0", "The Metamorphosis: It is a novella by Kafka.", title="The Metamorphosis")
    biology = Passage("Metamorphosis#0", "Metamorphosis: Metamorphosis is a biological process.", title="Metamorphosis")
    both = [biology, novella]
    opening = sentences_of(both)
    assert [opening[i].text for i in leads(both, opening, asked_subject("What is The Metamorphosis?"))] == [
        "It is a novella by Kafka."
    ]
    assert [opening[i].passage for i in leads(both, opening, asked_subject("What is metamorphosis?"))] == [0]
    assert [opening[i].passage for i in leads([biology], opening[:1], asked_subject("What is the metamorphosis?"))] == [
        0
    ]


SEASONS = [
    Document(
        "season",
        "The four seasons are spring, summer, autumn and winter. What are the four seasons? Each of the four"
        " seasons has its own weather.",
        "Season",
    ),
    Document(
        "vivaldi",
        "The Four Seasons is a group of four violin concertos by Antonio Vivaldi. Each one gives a musical"
        " expression to a season of the year. They were written around 1718.",
        "The Four Seasons (Vivaldi)",
    ),
    Document("zurich", "Zurich is the largest city in Switzerland. It lies at the north end of Lake Zurich.", "Zurich"),
]


@pytest.fixture(scope="module")
def seasons_address(embedder, tmp_path_factory) -> Iterator[str]:
    """A retrieval service over three documents, one of them titled with a qualifier in brackets, ranking by
    vector alone (hybrid search already puts the concertos first: the title lookup must not depend on that)."""
    from services.retrieval.index import create_index, load_index
    from services.retrieval.retriever import VECTOR, Retriever
    from services.retrieval.server import start_retrieval_server

    folder = create_index(tmp_path_factory.mktemp("seasons") / "index", embedder.name, embedder.dimension)
    retriever = Retriever(embedder, load_index(folder, writable=True))
    running = start_retrieval_server(retriever, "127.0.0.1:0", search_mode=VECTOR)
    try:
        with IndexClient(running.address, timeout=60) as index:
            index.add_documents(SEASONS)
        yield running.address
    finally:
        running.stop(grace=None)
        retriever.index.close()


def test_a_what_is_question_gets_the_document_titled_so_first_even_with_a_qualifier(
    generation_address, seasons_address
):
    """Ranked by vector, "What is The Four Seasons?" finds the article on seasons first; the title lookup gives
    the concertos' first sentence, and it alone, both as a first turn and as a later one (whose searches are fused
    with the earlier turns')."""
    question = "What is The Four Seasons?"
    whole_untitled = Grounding(titles=False, cut=False)
    with orchestrator_client(generation_address, seasons_address, grounding=whole_untitled) as untitled:
        ranked = untitled.ask(question, retrieval=True, k=2, params=GREEDY)
    with orchestrator_client(generation_address, seasons_address, grounding=Grounding(context_tokens=400)) as titled:
        alone = titled.ask(question, retrieval=True, k=2, params=GREEDY)
        history = [Message("user", "Where is Zurich?"), Message("assistant", "In Switzerland.")]
        later = titled.ask(question, history=history, retrieval=True, k=1, params=GREEDY)
    assert [s.title for s in ranked.started.sources] == ["Season", "The Four Seasons (Vivaldi)"]
    for reply in (alone, later):
        [first] = reply.started.sources
        assert first.title == "The Four Seasons (Vivaldi)"
        assert first.text.startswith("The Four Seasons (Vivaldi): The Four Seasons is a group of four violin concertos")
        assert first.text in reply.started.prompt


def test_below_the_score_floor_the_reply_says_no_source_matched_without_asking_the_model(
    generation_address, retrieval_address
):
    with orchestrator_client(generation_address, retrieval_address, grounding=Grounding(min_score=0.99)) as floor:
        reply = floor.ask("Where is Zurich?", retrieval=True, params=GREEDY)
        status = floor.status()
    assert reply.text.startswith("The documents do not say")
    assert "below 0.99" in reply.text
    assert reply.started.sources == []
    assert reply.finished.context_used is False
    assert "min-score" in reply.finished.notice
    assert reply.finished.completion_tokens == 0
    assert status.backends  # the orchestrator keeps serving


def test_an_answer_that_cites_a_passage_reports_its_number_and_id():
    turn = PreparedTurn(
        prompt="",
        prompt_token_ids=[],
        max_new_tokens=1,
        stop=[],
        sources=[Passage("Zurich#0", "a"), Passage("Bern#0", "b")],
        retrieved_ids=[],
        retrieval_query="",
        history_messages_dropped=0,
        model="m",
        notice="",
        numbered=True,
    )
    end = _end(turn, "Zurich is in Switzerland [2], near Bern [1][2] and [7].")
    assert list(end.cited) == [2, 1] and list(end.cited_ids) == ["Bern#0", "Zurich#0"]  # [7] names no source
    assert cited("see [1, 2] and [3]", 2) == [1, 2]
    assert list(_end(replace(turn, numbered=False), "[1]").cited) == []  # a plain prompt asked for no citations


def test_a_passage_whose_turn_was_trimmed_away_is_given_again(client):
    first = client.ask("Where is Zurich?", retrieval=True, k=1, params=GREEDY)
    history = first.as_history("Where is Zurich?")
    for n in range(60):
        history += [Message("user", f"Question number {n}?"), Message("assistant", f"Answer {n}.")]
    reply = client.ask(
        "Where is Zurich?", history=history, retrieval=True, k=1, params=SamplingParams(max_new_tokens=40)
    )
    assert reply.started.history_messages_dropped > 0
    assert [s.id for s in reply.started.sources] == [first.started.sources[0].id]
    assert reply.started.prompt.count(first.started.sources[0].text) == 1


def test_model_info_is_asked_once_and_again_when_another_model_serves(generation_address, retrieval_address):
    orchestrator = ChatOrchestrator(GenerationBackend(generation_address), RetrievalBackend(retrieval_address))
    try:
        for _ in range(3):
            orchestrator.prepare(TurnRequest("Where is Zurich?", retrieval=True))
        assert orchestrator.model_info_calls == 1
        orchestrator.served_by(orchestrator.model_info().label)  # the same model: nothing changes
        orchestrator.prepare(TurnRequest("Where is Zurich?"))
        assert orchestrator.model_info_calls == 1
        orchestrator.served_by("another-model:2")  # a stream said a new model serves now
        orchestrator.prepare(TurnRequest("Where is Zurich?"))
        assert orchestrator.model_info_calls == 2
    finally:
        orchestrator.generation.close()
        orchestrator.retrieval.close()


def test_a_turn_counts_only_its_new_pieces_and_sends_the_exact_token_ids(generation_address, tiny_loaded):
    orchestrator = ChatOrchestrator(GenerationBackend(generation_address), None, default_max_new_tokens=40)
    history = []
    for n in range(80):
        history += [Turn("user", f"Question {n} about Zurich and Geneva?"), Turn("assistant", f"Answer {n}.")]
    try:
        first = orchestrator.prepare(TurnRequest("What about Paris?", history=history))
        calls = orchestrator.tokens.calls
        second = orchestrator.prepare(
            TurnRequest("And Rome?", history=[*history, Turn("user", "What about Paris?"), Turn("assistant", "Hm.")])
        )
    finally:
        orchestrator.generation.close()
    assert first.history_messages_dropped > 0  # trimming happened, which used to re-tokenize the whole prompt
    assert orchestrator.tokens.calls - calls <= 3  # the new message, the new answer, and the prompt's ends
    for turn in (first, second):
        assert turn.prompt_token_ids == tiny_loaded.tokenizer(turn.prompt, add_special_tokens=False)["input_ids"]
        assert len(turn.prompt_token_ids) + 40 <= 1024


def test_the_generation_stream_names_its_model_on_the_first_message_only(generation_address, tiny_loaded):
    with grpc.insecure_channel(generation_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(text="Zurich", params={"max_new_tokens": 4, "ignore_eos": True})
        responses = list(stub.Generate(request, timeout=60))
    assert responses[0].model == tiny_loaded.name
    assert all(r.model == "" for r in responses[1:])


# --- the orchestrator counts with the served model's tokenizer: a turn asks generation for its answer only -------


class GenerationCalls(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """The orchestrator's calls to the generation service, counted by method, with each Generate's prompt ids and
    the replica that answered it."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.prompts: list[list[int]] = []  # each Generate's token ids, in order
        self.replicas: list[str] = []  # the replica that served each Generate that finished
        self._lock = threading.Lock()

    def count(self, method: str) -> int:
        return self.calls[f"/nightcap.v1.Generation/{method}"]

    def intercept_unary_unary(self, continuation, details, request):
        with self._lock:
            self.calls[details.method] += 1
        return continuation(details, request)

    def intercept_unary_stream(self, continuation, details, request):
        with self._lock:
            self.calls[details.method] += 1
            if details.method.endswith("/Generate"):
                self.prompts.append(list(request.token_ids.ids))
        call = continuation(details, request)
        call.add_done_callback(self._served)
        return call

    def _served(self, call) -> None:
        with contextlib.suppress(grpc.RpcError):
            replica = dict(call.initial_metadata() or ()).get(SERVER_KEY)
            if replica:
                with self._lock:
                    self.replicas.append(replica)


class CountedGeneration(GenerationBackend):
    """The orchestrator's generation backend with its one channel intercepted by ``calls``."""

    def __init__(self, address: str, calls: GenerationCalls) -> None:
        self.calls = calls
        super().__init__(address)

    def open_channel(self) -> grpc.Channel:
        return grpc.intercept_channel(super().open_channel(), self.calls)


@contextlib.contextmanager
def chat_server(orchestrator: ChatOrchestrator) -> Iterator[ChatClient]:
    """A Chat server around ``orchestrator`` (start_chat_server builds its own), and a client of it."""
    binding = ServiceBinding(
        chat_pb2.DESCRIPTOR.services_by_name["Chat"].full_name,
        chat_pb2_grpc.add_ChatServicer_to_server,
        ChatServicer(orchestrator),
    )
    running = start_server([binding], "127.0.0.1:0")
    try:
        with ChatClient(running.address, timeout=60) as client:
            yield client
    finally:
        running.stop(grace=1)
        orchestrator.generation.close()
        if orchestrator.retrieval is not None:
            orchestrator.retrieval.close()


def test_a_chat_turn_makes_no_tokenize_call_and_one_model_info_in_all(generation_address, retrieval_address):
    """Retrieval, a follow-up with history, a turn without retrieval, a condensed follow-up: the generation service
    is asked for the model's info once, then for answers only; every prompt is counted and tokenized here."""
    calls = GenerationCalls()
    orchestrator = ChatOrchestrator(CountedGeneration(generation_address, calls), RetrievalBackend(retrieval_address))
    with chat_server(orchestrator) as client:
        first, follow_up = ask_zurich_then_population(client, params=GREEDY)
        plain = client.ask("Hi", params=GREEDY)
    assert first.started.sources and follow_up.started.sources and plain.finished.completion_tokens > 0
    assert calls.count("Tokenize") == 0
    assert calls.count("ModelInfo") == 1
    assert calls.count("Generate") == 3
    condensing_calls = GenerationCalls()
    condensing = ChatOrchestrator(
        CountedGeneration(generation_address, condensing_calls),
        RetrievalBackend(retrieval_address),
        query_mode=QueryMode.CONDENSE,
    )
    with chat_server(condensing) as client:
        ask_zurich_then_population(client, params=GREEDY)
    assert condensing_calls.count("Tokenize") == 0
    assert condensing_calls.count("Generate") == 3  # two answers and the follow-up's rewrite


TRICKY_TEXTS = [
    "Where is Zurich?",
    " a leading space, and a trailing one ",
    "two  spaces\n\nnewlines\t and a tab",
    "Grüße aus Zürich, café naïve 🙂 🚀 € £ ¥ 中文",
    "<|endoftext|>between<|endoftext|>",  # the special token written as text: encoded as that token
    "0 1 2 3 100 1000 3.14159",
    "",
]


@pytest.mark.parametrize("served", ["generation_address", "templated_llama_address"])
def test_the_orchestrator_tokenizes_as_the_generation_services_tokenize_does(served, request):
    """GPT-NeoX with OpenChatKit's format, and a Llama folder with its own chat template: the local count and ids
    of each text, and of a whole templated prompt with history and passages, are the service's own."""
    address = request.getfixturevalue(served)
    orchestrator = ChatOrchestrator(GenerationBackend(address), None)
    history = [
        Turn("user", "Where is Zurich?", (ContextPassage("Zurich", "Zurich: Zurich is in Switzerland.", "wiki"),)),
        Turn("assistant", "In Switzerland [1]."),
    ]
    try:
        turn = orchestrator.prepare(TurnRequest("How many people live in Zürich? 🙂", history=history))
        info, tokenizer = orchestrator.served()
    finally:
        orchestrator.generation.close()
    assert "[1]" in turn.prompt and turn.prompt.count("Zurich") >= 3  # the passages are in the prompt
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for text in [*TRICKY_TEXTS, turn.prompt]:
            served_ids = list(stub.Tokenize(generation_pb2.TokenizeRequest(text=text, return_ids=True)).token_ids)
            assert tokenizer.encode(text) == served_ids, text
            assert tokenizer.count(text) == len(served_ids)
        assert turn.prompt_token_ids == list(
            stub.Tokenize(generation_pb2.TokenizeRequest(text=turn.prompt, return_ids=True)).token_ids
        )
        # the tokenizer goes only to a caller that asks with the digest it holds, and only when it is another
        assert stub.ModelInfo(generation_pb2.ModelInfoRequest()).tokenizer_json == b""
        asked = stub.ModelInfo(generation_pb2.ModelInfoRequest(tokenizer_held=""))
        assert asked.tokenizer_json and asked.tokenizer_digest == info.tokenizer_digest
        held = stub.ModelInfo(generation_pb2.ModelInfoRequest(tokenizer_held=info.tokenizer_digest))
        assert held.tokenizer_json == b"" and held.tokenizer_digest == info.tokenizer_digest


@pytest.fixture
def swap_registry(tiny_model_dir: Path, tmp_path: Path):
    """tiny:1, tiny:2 (the same tokenizer) and tiny:3 (the same weights, a tokenizer trained to another
    vocabulary): (registry, tiny:3's tokenizer)."""
    from services.common.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "models")
    registry.publish_version("tiny", tiny_model_dir, "openchatkit", "test:a")
    registry.publish_version("tiny", tiny_model_dir, "openchatkit", "test:b")
    other = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_model_dir, other)
    retrained = train_tiny_tokenizer(vocab_size=300)
    retrained.save_pretrained(other)
    registry.publish_version("tiny", other, "openchatkit", "test:c")
    return registry, retrained


def test_a_hot_swap_rebuilds_the_tokenizer_only_for_another_one_and_its_first_turn_gets_its_ids(
    swap_registry, tiny_loaded
):
    """Versions that share a tokenizer share its digest: kept. A switch to another tokenizer is seen on the stream
    that the new version answers; that turn is prepared again with the new tokenizer before anything is sent."""
    from services.generation.host import ModelHost
    from services.generation.loading import load_model, start_engine
    from services.generation.server import serve_model_host

    registry, retrained = swap_registry
    loaded = load_model("tiny:1", registry)
    host = ModelHost(loaded, start_engine(loaded), registry, load=lambda spec: load_model(spec, registry))
    running = serve_model_host(host, "127.0.0.1:0")
    calls = GenerationCalls()
    orchestrator = ChatOrchestrator(CountedGeneration(running.address, calls), None)
    question = "Where is Zurich? Grüße aus Zürich."
    try:
        with chat_server(orchestrator) as client, grpc.insecure_channel(running.address) as channel:
            admin = admin_pb2_grpc.ModelAdminStub(channel)
            assert client.ask(question, params=GREEDY).started.model == "tiny:1"
            assert orchestrator.tokenizer_builds == 1
            list(admin.LoadVersion(admin_pb2.LoadVersionRequest(model="tiny:2"), timeout=120))
            assert client.ask(question, params=GREEDY).started.model == "tiny:2"
            assert orchestrator.tokenizer_builds == 1 and orchestrator.model_info_calls == 2  # asked, not rebuilt
            generated = calls.count("Generate")
            list(admin.LoadVersion(admin_pb2.LoadVersionRequest(model="tiny:3"), timeout=120))
            swapped = client.ask(question, params=GREEDY)
            after = client.ask(question, params=GREEDY)
    finally:
        host.shutdown(1.0)
        running.stop(1.0)
    assert swapped.started.model == after.started.model == "tiny:3"
    assert orchestrator.tokenizer_builds == 2
    new_ids = retrained(swapped.started.prompt, add_special_tokens=False)["input_ids"]
    assert new_ids != tiny_loaded.tokenizer(swapped.started.prompt, add_special_tokens=False)["input_ids"]
    assert calls.count("Generate") - generated == 3  # the swapped turn's two tries, then the next turn
    assert calls.prompts[-2] == calls.prompts[-1] == new_ids  # tiny:3 never got tiny:1's ids
    assert calls.count("Tokenize") == 0
