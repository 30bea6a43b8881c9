"""Hybrid search: a keyword index (tantivy, bm25) beside the vectors, following the passages' commits, fused with
the vector ranking; searches by mode; an optional cross-encoder that reorders the top and answers Rerank and
/v1/rerank.

Real embedder, real faiss, real servers on 127.0.0.1; a tiny random cross-encoder made on the spot.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tantivy
from conftest import build_tiny_cross_encoder, start_gateway

from nightcap.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.retrieval.chunker import Passage, passages_of
from services.retrieval.corpus import Document
from services.retrieval.embedder import Embedder
from services.retrieval.index import STORE_FILE, Change, PassageIndex, create_index, load_index, words
from services.retrieval.index.words import WordIndex, query_terms, selecting_terms
from services.retrieval.ingest import Ingestor
from services.retrieval.reranker import Reranker
from services.retrieval.retriever import HYBRID, VECTOR, Retriever
from services.retrieval.server import start_retrieval_server
from services.retrieval.store import WORDS_FOLDER, PassageStore

# A small catalogue whose entries differ by their numbers: what an embedder reads as one thing.
VALVES = [
    Document(
        f"valve-{number}",
        f"Valve V-{number} is a brass ball valve for water lines. It is rated for {bar} bar at 20 degrees. "
        "It fits pipes of one inch.",
        "Ball valves",
    )
    for number, bar in [(2231, 16), (2232, 25), (2233, 40), (2234, 10), (2235, 64), (2236, 6)]
]
CITIES = [
    Document(
        "Zurich",
        "Zurich is the largest city in Switzerland and the capital of the canton of Zurich. It is located in "
        "north-central Switzerland, at the northwestern tip of Lake Zurich.",
        "Zurich",
    ),
    Document("Bern", "Bern is the de facto capital of Switzerland. The river Aare flows around its old town.", "Bern"),
    Document("Lima", "Lima is the capital and largest city of Peru, on the coast of the Pacific Ocean.", "Lima"),
]
PART_QUESTION = "What pressure is V-2234 rated for?"


def new_index(embedder: Embedder, folder: Path, documents: list[Document]) -> PassageIndex:
    create_index(folder, embedder.name, embedder.dimension)
    index = load_index(folder, writable=True)
    Ingestor(embedder, index).add(documents)
    return index


@pytest.fixture
def index(embedder: Embedder, tmp_path: Path) -> Iterator[PassageIndex]:
    index = new_index(embedder, tmp_path / "catalogue", [*VALVES, *CITIES])
    yield index
    index.close()


@pytest.fixture
def served(embedder: Embedder, index: PassageIndex) -> Iterator[retrieval_pb2_grpc.RetrievalStub]:
    running = start_retrieval_server(Retriever(embedder, index), "127.0.0.1:0")
    channel = grpc.insecure_channel(running.address)
    yield retrieval_pb2_grpc.RetrievalStub(channel)
    channel.close()
    running.stop(grace=None)


def search(stub: retrieval_pb2_grpc.RetrievalStub, query: str, k: int = 3, mode: int = 0) -> list[str]:
    return [p.id for p in stub.Search(retrieval_pb2.SearchRequest(query=query, k=k, mode=mode)).passages]


def test_a_part_number_question_finds_its_own_valve_where_vectors_find_a_neighbour(served) -> None:
    """Asked about one valve of a small catalogue, vector search answers with the next one's rating."""
    assert search(served, PART_QUESTION, k=1) == ["valve-2234#0"]  # the server's default: hybrid
    assert search(served, PART_QUESTION, k=1, mode=retrieval_pb2.SEARCH_MODE_HYBRID) == ["valve-2234#0"]
    assert search(served, PART_QUESTION, k=1, mode=retrieval_pb2.SEARCH_MODE_KEYWORD) == ["valve-2234#0"]
    assert search(served, PART_QUESTION, k=1, mode=retrieval_pb2.SEARCH_MODE_VECTOR) != ["valve-2234#0"]


def test_every_mode_reports_each_passage_by_its_cosine_similarity(served) -> None:
    """A score floor and the orchestrator's weighted fusion read the score as cosine similarity in every mode."""
    by_mode = {
        mode: {
            p.id: p.score
            for p in served.Search(retrieval_pb2.SearchRequest(query=PART_QUESTION, k=6, mode=mode)).passages
        }
        for mode in (
            retrieval_pb2.SEARCH_MODE_VECTOR,
            retrieval_pb2.SEARCH_MODE_KEYWORD,
            retrieval_pb2.SEARCH_MODE_HYBRID,
        )
    }
    vector = by_mode[retrieval_pb2.SEARCH_MODE_VECTOR]
    for mode, scores in by_mode.items():
        shared = set(scores) & set(vector)
        assert shared, mode
        for passage_id in shared:
            assert scores[passage_id] == pytest.approx(vector[passage_id], abs=1e-5)


def test_user_text_is_never_query_syntax(served) -> None:
    for query in [
        '"unbalanced',
        "NEAR(valve lines, 2) AND",
        "title:Zurich OR *",
        "^zurich - ( )",
        "'; DROP TABLE",
        "?!",
        "zurich AND NOT bern",
        "text:zurich~2 +capital -city",
    ]:
        found = served.Search(retrieval_pb2.SearchRequest(query=query, k=3, mode=retrieval_pb2.SEARCH_MODE_KEYWORD))
        assert len(found.passages) <= 3  # answered, not INVALID_ARGUMENT or INTERNAL
    zurich = served.Search(retrieval_pb2.SearchRequest(query='title:"Zurich', mode=retrieval_pb2.SEARCH_MODE_KEYWORD))
    assert zurich.passages[0].title == "Zurich"


def test_a_question_in_plain_words_matches_passages_holding_some_of_them(served) -> None:
    """OR semantics without the question's stopwords; stemmed ("located" finds "location"), accents folded."""
    ask = lambda query: search(served, query, k=1, mode=retrieval_pb2.SEARCH_MODE_KEYWORD)  # noqa: E731
    assert ask("Where is the river Aare?") == ["Bern#0"]
    assert ask("Which city is located on the coast of the Pacific?") == ["Lima#0"]
    assert ask("Zürich") == ["Zurich#0"]


def test_a_word_many_passages_hold_ranks_the_passages_its_rare_words_select() -> None:
    """A question's words as the index holds them (no stopwords, stemmed, split where the index splits); the
    rare ones select, a word the whole catalogue holds only ranks."""
    analyze = words.WordIndex().analyze
    assert query_terms(PART_QUESTION, analyze) == ["pressur", "v", "2234", "rate"]
    assert query_terms("Is the Zürich foo_bar located?", analyze) == ["zurich", "foo", "bar", "locat"]
    assert query_terms("Who is it?", analyze) == ["who", "is", "it"]  # nothing but stopwords: searched with them
    held = {"valve": 5000, "rate": 3000, "pressur": 40, "v": 2500, "2234": 1}
    assert selecting_terms(["pressur", "v", "2234", "rate"], held.get) == ["pressur", "2234"]
    assert selecting_terms(["valve", "rate"], held.get) == ["valve", "rate"]  # none rare: all select


def test_a_keyword_search_finds_only_passages_holding_a_rare_word_when_common_ones_are_asked_too(
    index: PassageIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(words, "COMMON_PASSAGES", 3)  # every valve passage holds "brass" and "valve"
    assert [hit.passage.id for hit in index.keyword_search("Is the brass valve in Lima?", 10)] == ["Lima#0"]
    assert all(hit.passage.id.startswith("valve-") for hit in index.keyword_search("Which brass valve?", 3))
    found = [hit.passage.id for hit in index.keyword_search("Which valve is rated for 25 bar?", 10)]
    assert found == ["valve-2232#0"]


def test_an_unknown_search_mode_is_invalid_argument(served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.Search(retrieval_pb2.SearchRequest(query="Zurich", mode=9))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SEARCH_MODE_HYBRID" in caught.value.details()


def test_a_search_that_names_no_mode_gets_the_servers_default(embedder: Embedder, index: PassageIndex) -> None:
    running = start_retrieval_server(Retriever(embedder, index), "127.0.0.1:0", search_mode=VECTOR)
    try:
        with grpc.insecure_channel(running.address) as channel:
            stub = retrieval_pb2_grpc.RetrievalStub(channel)
            assert search(stub, PART_QUESTION, k=1) == search(
                stub, PART_QUESTION, k=1, mode=retrieval_pb2.SEARCH_MODE_VECTOR
            )
            assert search(stub, PART_QUESTION, k=1) != ["valve-2234#0"]
    finally:
        running.stop(grace=None)


def test_the_title_lookup_still_leads_a_hybrid_search(embedder: Embedder, index: PassageIndex) -> None:
    hits = Retriever(embedder, index).search("What is the capital of Switzerland?", k=3, title="Zurich", mode=HYBRID)
    assert hits[0].passage.id == "Zurich#0" and hits[0].titled
    assert "Bern#0" in [hit.passage.id for hit in hits]


def keyword_ids(index: PassageIndex, query: str) -> list[str]:
    return [hit.passage.id for hit in index.keyword_search(query, 10)]


def test_the_keyword_index_follows_adds_replacements_deletes_and_compaction(embedder: Embedder, tmp_path: Path) -> None:
    folder = tmp_path / "grows"
    index = new_index(embedder, folder, CITIES)
    ingestor = Ingestor(embedder, index)
    ingestor.add([Document("fruit", "The quokkaberry grows on Rottnest Island.", "Fruit")])
    assert keyword_ids(index, "quokkaberry") == ["fruit#0"]
    ingestor.add([Document("fruit", "The quandong grows in the desert.", "Fruit")])  # replaced
    assert keyword_ids(index, "quokkaberry") == [] and keyword_ids(index, "quandong") == ["fruit#0"]
    ingestor.delete(["Lima"])
    assert keyword_ids(index, "Peru") == []
    index.compact()
    index.close()
    reopened = load_index(folder, writable=True)
    try:
        assert keyword_ids(reopened, "quandong") == ["fruit#0"] and keyword_ids(reopened, "Aare") == ["Bern#0"]
        assert keyword_ids(reopened, "Peru") == []
    finally:
        reopened.close()


def test_removed_passages_leave_the_keyword_index_and_never_crowd_out_the_hits_asked_for(
    embedder: Embedder, index: PassageIndex
) -> None:
    """A removed passage's words go with it: were they kept, the passages that matched best and are gone would
    fill the k asked for and the one that remains would not be found."""
    ingestor = Ingestor(embedder, index)
    strong = [Document(f"berry-{i}", "Quokkaberry. Quokkaberry jam, quokkaberry pie.", "Berries") for i in range(5)]
    ingestor.add([*strong, Document("island", "Rottnest Island has one quokkaberry bush and many quokkas.", "Island")])
    assert keyword_ids(index, "quokkaberry")[0].startswith("berry-")
    ingestor.delete([d.id for d in strong])
    assert [hit.passage.id for hit in index.keyword_search("quokkaberry", 1)] == ["island#0"]
    assert len(index._store.words.search("quokkaberry", 10)) == 1  # the index itself, not a filter after it


def test_the_keyword_index_is_kept_on_disk_and_read_again_only_when_it_missed_a_commit(
    embedder: Embedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "kept"
    new_index(embedder, folder, CITIES).close()
    assert (folder / WORDS_FOLDER).is_dir()

    def read_again(*args, **kwargs) -> None:
        raise AssertionError("the keyword index was read again from SQLite")

    with monkeypatch.context() as patched:  # a clean reopen finds the words where they were
        patched.setattr(PassageStore, "_fill_words", read_again)
        index = load_index(folder, writable=True)
        assert keyword_ids(index, "Aare") == ["Bern#0"]
        index.close()

    def refused(*args, **kwargs) -> None:
        raise OSError("no space left on device")

    index = load_index(folder, writable=True)
    with monkeypatch.context() as patched:  # the keyword index refuses a commit: it is read again at once
        patched.setattr(WordIndex, "apply", refused)
        Ingestor(embedder, index).add([Document("fruit", "The quokkaberry grows on Rottnest Island.", "Fruit")])
    assert keyword_ids(index, "quokkaberry") == ["fruit#0"]
    with monkeypatch.context() as patched:  # and reading it again fails too, as a crash between the commits would
        patched.setattr(WordIndex, "apply", refused)
        patched.setattr(PassageStore, "_fill_words", read_again)
        Ingestor(embedder, index).add([Document("nut", "The quandong grows in the desert.", "Nut")])
        assert keyword_ids(index, "quandong") == []  # the passage is committed; its words are not
    index.close()
    reopened = load_index(folder, writable=True)  # an older version on disk: read again from SQLite
    try:
        assert keyword_ids(reopened, "quandong") == ["nut#0"] and keyword_ids(reopened, "quokkaberry") == ["fruit#0"]
    finally:
        reopened.close()


def test_a_keyword_index_of_another_layout_is_made_again(embedder: Embedder, tmp_path: Path) -> None:
    """A words/ folder written with another schema (another nightcap) is replaced, and read from the store."""
    folder = tmp_path / "relaid"
    new_index(embedder, folder, CITIES).close()
    shutil.rmtree(folder / WORDS_FOLDER)
    (folder / WORDS_FOLDER).mkdir()
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("body", stored=True)
    other = tantivy.Index(builder.build(), path=str(folder / WORDS_FOLDER))
    writer = other.writer(15_000_000, 1)
    writer.add_document(tantivy.Document(body="Aare"))
    writer.commit()
    del writer, other
    index = load_index(folder, writable=True)
    try:
        assert keyword_ids(index, "Aare") == ["Bern#0"] and index._store.words.folder == folder / WORDS_FOLDER
    finally:
        index.close()


def test_a_second_process_on_the_same_store_keeps_the_keyword_index_in_memory(
    embedder: Embedder, index: PassageIndex
) -> None:
    """tantivy lets one writer hold a folder: a second opener (here, in this process) reads its own copy."""
    second = PassageStore.open(index.folder / STORE_FILE)
    try:
        assert index._store.words.folder == index.folder / WORDS_FOLDER and second.words.folder is None
        assert [row for row, _ in second.words.search("Aare", 3)] == [row for row, _ in index.keyword_rows("Aare", 3)]
    finally:
        second.close()


def test_a_commit_that_fails_leaves_no_words_behind(embedder: Embedder, index: PassageIndex) -> None:
    """The words follow the passages' transaction: a passage the store refuses (its id is taken by another
    document) rolls back the whole commit, and its words never reach the keyword index."""
    fresh = Passage("fruit#0", "fruit", "Fruit", "Fruit: The quokkaberry grows on Rottnest Island.", "")
    taken = Passage("Bern#0", "fruit", "Fruit", "Fruit: Its seeds are planted in spring.", "")
    with pytest.raises(sqlite3.IntegrityError):
        index.commit(Change(passages=[fresh, taken], vectors=embedder.encode([fresh.text, taken.text])))
    assert keyword_ids(index, "quokkaberry") == [] and keyword_ids(index, "Aare") == ["Bern#0"]
    index.commit(Change(passages=[fresh], vectors=embedder.encode([fresh.text])))
    assert keyword_ids(index, "quokkaberry") == ["fruit#0"]


def test_a_store_that_kept_its_words_in_fts5_drops_them_and_is_searched_as_before(
    embedder: Embedder, tmp_path: Path
) -> None:
    """Stores written before the keyword index moved to tantivy hold an FTS5 table kept by triggers: opening
    one drops them (no second copy of every word to write), and its passages are found by their words."""
    folder = tmp_path / "old"
    new_index(embedder, folder, [*VALVES, *CITIES]).close()
    with sqlite3.connect(folder / STORE_FILE) as old:
        old.executescript(
            "CREATE VIRTUAL TABLE passage_words USING fts5(title, text);"
            " INSERT INTO passage_words (rowid, title, text) SELECT row, title, text FROM passages;"
            " CREATE TRIGGER passage_words_add AFTER INSERT ON passages BEGIN"
            " INSERT INTO passage_words (rowid, title, text) VALUES (new.row, new.title, new.text); END;"
        )
    index = load_index(folder, writable=True)
    try:
        assert keyword_ids(index, "V-2234")[0] == "valve-2234#0"
        assert Retriever(embedder, index).search(PART_QUESTION, k=1)[0].passage.id == "valve-2234#0"
        Ingestor(embedder, index).add([Document("fruit", "The quokkaberry grows on Rottnest Island.", "Fruit")])
        assert keyword_ids(index, "quokkaberry") == ["fruit#0"]
    finally:
        index.close()
    with sqlite3.connect(folder / STORE_FILE) as reopened:
        assert reopened.execute("SELECT name FROM sqlite_master WHERE name LIKE 'passage_words%'").fetchall() == []


def test_staged_passages_are_found_by_their_words_until_their_vectors_commit(
    embedder: Embedder, index: PassageIndex
) -> None:
    """A background build stages the corpus first: searchable by its words at once, embedded later."""
    lisbon = Document("Lisbon", "Lisbon is the capital of Portugal, on the estuary of the Tagus.", "Lisbon")
    index.stage(list(passages_of(lisbon)))
    hits = Retriever(embedder, index).search("What is Lisbon the capital of?", k=3, mode=HYBRID)
    assert hits[0].passage.id == "Lisbon#0"
    assert 0.2 < hits[0].score <= 1.0  # its cosine, from embedding its text on the spot
    assert (
        Retriever(embedder, index).search("What is Lisbon the capital of?", k=3, mode=VECTOR)[0].passage.id
        != "Lisbon#0"
    )
    Ingestor(embedder, index).add([lisbon])
    assert keyword_ids(index, "Tagus") == ["Lisbon#0"]  # once: the commit removed its staged copy
    assert [row >= 0 for row, _ in index._store.words.search("Tagus", 10)] == [True]  # from the keyword index too
    assert index._store.count_staged() == 0


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    texts = [PART_QUESTION, *(d.text for d in [*VALVES, *CITIES]), *(d.title for d in [*VALVES, *CITIES])]
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("cross-encoder"), texts)


@pytest.fixture(scope="module")
def reranker(tiny_cross_encoder: Path) -> Reranker:
    return Reranker(str(tiny_cross_encoder))


def test_a_reranker_orders_the_top_of_the_fused_hits_by_its_own_scores(
    embedder: Embedder, index: PassageIndex, reranker: Reranker
) -> None:
    candidates = [hit.passage for hit in Retriever(embedder, index).search(PART_QUESTION, k=20, mode=HYBRID)]
    scores = reranker.score(PART_QUESTION, [p.text for p in candidates])
    expected = [candidates[i].id for i in np.argsort(-scores, kind="stable")[:3]]

    hits = Retriever(embedder, index, reranker).search(PART_QUESTION, k=3, mode=HYBRID)

    assert [hit.passage.id for hit in hits] == expected
    assert len(set(scores.round(6))) > 1  # the random model does tell passages apart
    vector = {h.passage.id: h.score for h in Retriever(embedder, index).search(PART_QUESTION, k=20, mode=VECTOR)}
    assert all(hit.score == pytest.approx(vector[hit.passage.id], abs=1e-5) for hit in hits)  # still cosines


@pytest.fixture
def reranking(embedder: Embedder, index: PassageIndex, reranker: Reranker) -> Iterator[str]:
    running = start_retrieval_server(Retriever(embedder, index, reranker), "127.0.0.1:0")
    yield running.address
    running.stop(grace=None)


def test_rerank_returns_the_documents_best_first_with_their_indexes(reranking: str, reranker: Reranker) -> None:
    documents = [d.text for d in VALVES]
    scores = reranker.score(PART_QUESTION, documents)
    with grpc.insecure_channel(reranking) as channel:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)
        reply = stub.Rerank(retrieval_pb2.RerankRequest(query=PART_QUESTION, documents=documents, top_n=2))
        every = stub.Rerank(retrieval_pb2.RerankRequest(query=PART_QUESTION, documents=documents))
        with pytest.raises(grpc.RpcError) as empty:
            stub.Rerank(retrieval_pb2.RerankRequest(query=PART_QUESTION, documents=["a valve", " "]))
    assert [r.index for r in reply.results] == list(np.argsort(-scores, kind="stable")[:2])
    assert [r.relevance_score for r in reply.results] == pytest.approx(sorted(scores, reverse=True)[:2])
    assert len(every.results) == len(documents) and reply.tokens > len(documents) * 10
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "documents[1]" in empty.value.details()


def test_rerank_without_a_reranker_says_how_to_configure_one(served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.Rerank(retrieval_pb2.RerankRequest(query="Zurich", documents=["Zurich is a city."]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--reranker" in caught.value.details()
    with pytest.raises(grpc.RpcError) as searched:
        served.Search(retrieval_pb2.SearchRequest(query=PART_QUESTION, rerank=True))
    assert searched.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--reranker" in searched.value.details()
    assert served.Stats(retrieval_pb2.StatsRequest()).reranker == ""


def test_a_search_chooses_whether_the_reranker_reorders_it(
    reranking: str, embedder: Embedder, index: PassageIndex, reranker: Reranker
) -> None:
    plain = [hit.passage.id for hit in Retriever(embedder, index).search(PART_QUESTION, k=3, mode=HYBRID)]
    reranked = [hit.passage.id for hit in Retriever(embedder, index, reranker).search(PART_QUESTION, k=3)]
    assert plain != reranked  # the random cross-encoder orders these differently, or this test shows nothing
    with grpc.insecure_channel(reranking) as channel:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)

        def ids(**rerank: bool) -> list[str]:
            request = retrieval_pb2.SearchRequest(query=PART_QUESTION, k=3, **rerank)
            return [p.id for p in stub.Search(request).passages]

        assert ids() == reranked  # unset: the service reranks whenever it has a reranker
        assert ids(rerank=True) == reranked
        assert ids(rerank=False) == plain
        assert stub.Stats(retrieval_pb2.StatsRequest()).reranker == reranker.name


def test_the_gateway_reranks_in_the_shape_llamacpp_and_vllm_serve(
    reranking: str, embedder: Embedder, index: PassageIndex, reranker: Reranker
) -> None:
    documents = [d.text for d in CITIES]
    scores = reranker.score("Where is Lima?", documents)
    unused = "127.0.0.1:9"  # /v1/rerank reaches only the retrieval service
    with_reranker = start_gateway(unused, unused, reranking)
    without = start_retrieval_server(Retriever(embedder, index), "127.0.0.1:0")
    without_reranker = start_gateway(unused, unused, without.address)
    try:
        body = {"model": reranker.name, "query": "Where is Lima?", "documents": documents, "top_n": 2}
        ranked = httpx.post(f"{with_reranker.url}/v1/rerank", json={**body, "return_documents": True}).json()
        bad = httpx.post(f"{with_reranker.url}/v1/rerank", json={**body, "documents": []})
        zero = httpx.post(f"{with_reranker.url}/v1/rerank", json={**body, "top_n": 0})
        other = httpx.post(f"{with_reranker.url}/v1/rerank", json={**body, "model": "bge-reranker"})
        missing = httpx.post(f"{without_reranker.url}/v1/rerank", json=body)
    finally:
        with_reranker.stop()
        without_reranker.stop()
        without.stop(grace=None)
    best = list(np.argsort(-scores, kind="stable")[:2])
    assert [r["index"] for r in ranked["results"]] == best
    assert [r["document"]["text"] for r in ranked["results"]] == [documents[i] for i in best]
    assert ranked["results"][0]["relevance_score"] == pytest.approx(float(scores[best[0]]), abs=1e-5)
    assert ranked["model"] == reranker.name and ranked["usage"]["total_tokens"] > 0
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "documents"
    assert zero.status_code == 400 and zero.json()["error"]["param"] == "top_n"
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert missing.status_code == 503 and "--reranker" in missing.json()["error"]["message"]
    assert missing.json()["error"]["code"] == "no_reranker" and missing.headers["x-should-retry"] == "false"


def test_chatctl_searches_by_the_mode_it_is_asked_for(embedder: Embedder, index: PassageIndex) -> None:
    running = start_retrieval_server(Retriever(embedder, index), "127.0.0.1:0")

    def chatctl(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "clients.chatctl", "index", "search", PART_QUESTION, "-k", "1", *args]
        return subprocess.run([*command, "--address", running.address], capture_output=True, text=True, timeout=120)

    try:
        keyword, vector, wrong = chatctl("--mode", "keyword"), chatctl("--mode", "vector"), chatctl("--mode", "bm25")
    finally:
        running.stop(grace=None)
    assert keyword.returncode == 0 and "V-2234" in keyword.stdout
    assert vector.returncode == 0 and "V-2234" not in vector.stdout
    assert wrong.returncode == 1 and "mode must be one of hybrid, vector, keyword" in wrong.stderr
