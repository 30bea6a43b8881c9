"""Feeding the retrieval service: documents in over gRPC and through chatctl, replaced and deleted by id,
committed atomically (a killed process loses nothing committed), searched while they are being embedded.

Real embedder, real faiss, real servers on 127.0.0.1 port 0. Each test gets its own writable index.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clients.client import IndexClient, NightcapError
from clients.documents import Document, DocumentReadError, read_documents
from nightcap.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.retrieval.chunker import Passage
from services.retrieval.corpus import read_wikipedia_summaries
from services.retrieval.embedder import Embedder
from services.retrieval.index import IndexSettings, create_index, load_index
from services.retrieval.retriever import Retriever
from services.retrieval.server import start_retrieval_server

ROOT = Path(__file__).resolve().parents[1]
ZURICH = Document(
    "zurich", "Zurich is the largest city in Switzerland. It lies at the north end of Lake Zurich.", "Zurich"
)
PARIS = Document("paris", "Paris is the capital and largest city of France. The Seine flows through it.", "Paris")


@dataclass
class LiveIndex:
    folder: Path
    client: IndexClient
    retriever: Retriever
    address: str


@pytest.fixture
def live(embedder: Embedder, tmp_path: Path) -> Iterator[LiveIndex]:
    folder = create_index(tmp_path / "indexes" / "mine", embedder.name, embedder.dimension)
    retriever = Retriever(embedder, load_index(folder, writable=True))
    running = start_retrieval_server(retriever, "127.0.0.1:0")
    client = IndexClient(running.address, timeout=120)
    try:
        yield LiveIndex(folder, client, retriever, running.address)
    finally:
        client.close()
        running.stop(grace=None)
        retriever.index.close()


def titles(found: list) -> list[str]:
    return [source.title for source in found]


# --- documents from files --------------------------------------------------------------------------------


def write_every_file_type(folder: Path) -> None:
    (folder / "notes").mkdir(parents=True)
    (folder / "notes" / "zurich.txt").write_text(ZURICH.text)
    (folder / "notes" / "geneva.md").write_text(
        "---\nauthor: someone\n---\n# Geneva\n\nGeneva is a city on Lake Geneva. It hosts the United Nations office."
    )
    (folder / "notes" / "ignored.png").write_bytes(b"\x89PNG")
    lines = [
        {"text": PARIS.text, "title": "Paris", "id": "paris"},
        {"text": "Berlin is the capital of Germany. It has a famous wall."},
    ]
    (folder / "cities.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    table = pa.table({"text": ["Vienna is the capital of Austria. It is known for music."], "title": ["Vienna"]})
    pq.write_table(table, folder / "more.parquet")


def test_every_file_type_becomes_documents_with_stable_ids(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_every_file_type(tmp_path)
    monkeypatch.chdir(tmp_path)

    documents = {d.id: d for d in read_documents(["notes", "cities.jsonl", "more.parquet"])}

    assert set(documents) == {"notes/zurich.txt", "notes/geneva.md", "paris", "cities.jsonl:2", "more.parquet:1"}
    assert documents["notes/geneva.md"].title == "Geneva"  # the first heading; front matter dropped
    assert "author" not in documents["notes/geneva.md"].text
    assert not documents["notes/geneva.md"].text.startswith("#")  # the heading became the title
    assert documents["notes/zurich.txt"].title == "zurich"
    assert documents["paris"].title == "Paris"
    assert documents["more.parquet:1"].title == "Vienna"
    assert documents["cities.jsonl:2"].source == str(tmp_path / "cities.jsonl")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "  \n", "empty"),
        ("sheet.xlsx", "PK", "unknown file type '.xlsx'; nightcap reads .docx, .htm, .html, .jsonl"),
        ("bad.jsonl", '{"text": "fine"}\nnot json\n', "line 2: not JSON"),
        ("notext.jsonl", '{"title": "no text"}\n', "line 1: the 'text' field is missing or empty"),
    ],
)
def test_unreadable_files_are_named_in_a_clear_error(tmp_path: Path, name: str, content: str, message: str) -> None:
    (tmp_path / name).write_text(content)

    with pytest.raises(DocumentReadError, match=message):
        list(read_documents([tmp_path / name]))


def test_a_path_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DocumentReadError, match="no such file or folder"):
        list(read_documents([tmp_path / "nowhere"]))


# --- add, replace, delete over gRPC ----------------------------------------------------------------------


def test_added_documents_are_found_and_counted(live: LiveIndex) -> None:
    report = live.client.add_documents([ZURICH, PARIS])

    assert (report.documents_added, report.documents_replaced, report.documents_total) == (2, 0, 2)
    assert report.passages_added == report.passages_total == 2
    assert titles(live.client.search("Where is Zurich?", k=1)) == ["Zurich"]
    stats = live.client.stats()
    assert (stats.passages, stats.documents, stats.dimension, stats.index_type) == (2, 2, 384, "IDMap2,Flat")
    assert stats.bytes_on_disk > 0 and stats.format == "nightcap"


def test_re_adding_an_id_replaces_the_document(live: LiveIndex) -> None:
    live.client.add_documents([ZURICH, PARIS])

    report = live.client.add_documents([Document("zurich", "Zurich is famous for its chocolate makers.", "Zurich")])

    assert (report.documents_added, report.documents_replaced, report.passages_removed) == (0, 1, 1)
    assert report.documents_total == 2
    best = live.client.search("chocolate", k=3)
    zurich_passages = [s for s in best if s.title == "Zurich"]
    assert [s.text for s in zurich_passages] == ["Zurich: Zurich is famous for its chocolate makers."]


def test_deleted_documents_are_never_found_again(live: LiveIndex) -> None:
    live.client.add_documents([ZURICH, PARIS])

    report = live.client.delete_documents(["zurich"])

    assert (report.documents_deleted, report.passages_removed, report.documents_total) == (1, 1, 1)
    assert titles(live.client.search("Where is Zurich?", k=5)) == ["Paris"]


def test_passage_ids_survive_deleting_other_documents(live: LiveIndex) -> None:
    live.client.add_documents([ZURICH, PARIS])
    before = live.client.search("Where is Paris?", k=1)[0]

    live.client.delete_documents(["zurich"])

    after = live.client.search("Where is Paris?", k=1)[0]
    assert (after.id, after.text) == (before.id, before.text) == ("paris#0", f"Paris: {PARIS.text}")


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ([ZURICH, Document("blank", "   ", "Blank")], "document 'blank' is empty"),
        ([Document("", "Some text.")], "document 1 has no id"),
        ([ZURICH, ZURICH], "appears twice"),
        ([], "no documents were sent"),
    ],
)
def test_bad_documents_are_invalid_argument_and_nothing_is_added(
    live: LiveIndex, documents: list[Document], message: str
) -> None:
    live.client.add_documents([PARIS])

    with pytest.raises(NightcapError) as caught:
        live.client.add_documents(documents)

    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.message
    assert (live.client.stats().documents, titles(live.client.search("Zurich", k=5))) == (1, ["Paris"])


def test_deleting_an_unknown_id_is_not_found_and_deletes_nothing(live: LiveIndex) -> None:
    live.client.add_documents([ZURICH, PARIS])

    with pytest.raises(NightcapError) as caught:
        live.client.delete_documents(["zurich", "atlantis"])

    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "'atlantis'" in caught.value.message and "none deleted" in caught.value.message
    assert live.client.stats().documents == 2


# --- looking a document up by its title ----------------------------------------------------------------

UTOPIA = Document("utopia", "A utopia is an imagined community. It has near-perfect qualities.", "Utopia")
UTOPIA_BOOK = Document(
    "utopia-book",
    "Utopia is a work of fiction by Thomas More. It was written in Latin. It was published in 1516."
    " What is Utopia? A utopia is the island the book describes, an imagined community.",
    "Utopia (book)",
)


def looked_up(found: list) -> list[tuple[str, bool]]:
    return [(source.id, source.titled) for source in found]


def test_a_title_puts_the_first_passage_of_the_document_so_titled_first(live: LiveIndex) -> None:
    live.client.add_documents([ZURICH, PARIS, UTOPIA, UTOPIA_BOOK])
    search = live.client.search

    # ahead of a better hit, with its own score
    lake = search("Which city lies on Lake Zurich?", k=2, title="paris")
    assert looked_up(lake) == [("paris#0", True), ("zurich#0", False)]
    assert lake[0].score < lake[1].score
    assert looked_up(search("Which city lies on Lake Zurich?", k=2)) == [("zurich#0", False), ("paris#0", False)]
    # the exact title, then one with a qualifier; a document's first passage, not its best one
    utopia = search("What is Utopia?", k=3, title="Utopia")
    assert looked_up(utopia)[:2] == [("utopia#0", True), ("utopia-book#0", True)]
    assert not utopia[2].titled
    assert looked_up(search("What is Utopia?", k=1, title="The Utopia")) == [("utopia#0", True)]
    assert [s.titled for s in search("What is Utopia?", k=3, title="Utop%")] == [False] * 3
    assert [s.titled for s in search("What is Utopia?", k=3, title="Utopi_")] == [False] * 3
    # a removed document is not looked up
    live.client.delete_documents(["utopia"])
    assert looked_up(search("What is Utopia?", k=1, title="utopia")) == [("utopia-book#0", True)]


def test_title_lookups_batched_together_each_get_their_own_document_and_score(live: LiveIndex) -> None:
    live.client.add_documents([ZURICH, PARIS, UTOPIA, UTOPIA_BOOK])
    queries, titles = ["What is Utopia?", "Where is it?", "Which city lies on Lake Zurich?"], ["Utopia", "", "Paris"]
    batched = live.retriever.search_batch(queries, 2, titles)
    alone = [live.retriever.search(query, 2, title) for query, title in zip(queries, titles, strict=True)]
    assert [[(h.passage.id, h.titled) for h in hits] for hits in batched] == [
        [("utopia#0", True), ("utopia-book#0", True)],
        [(h.passage.id, False) for h in alone[1]],
        [("paris#0", True), ("zurich#0", False)],
    ]
    for hits, single in zip(batched, alone, strict=True):
        assert [h.score for h in hits] == pytest.approx([h.score for h in single], abs=1e-5)


def test_a_title_too_long_is_invalid_argument_on_a_raw_stub(live: LiveIndex) -> None:
    live.client.add_documents([ZURICH])
    with grpc.insecure_channel(live.address) as channel:
        stub = retrieval_pb2_grpc.RetrievalStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Search(retrieval_pb2.SearchRequest(query="Where is Zurich?", title="x" * 501))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 500" in caught.value.details()
        found = stub.Search(retrieval_pb2.SearchRequest(query="Where is it?", title="zurich"))
    assert [(p.id, p.titled) for p in found.passages] == [("zurich#0", True)]


def test_a_read_only_index_refuses_writes_with_failed_precondition(retrieval_address: str) -> None:
    with IndexClient(retrieval_address) as client, pytest.raises(NightcapError) as caught:
        client.add_documents([ZURICH])

    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "read-only" in caught.value.message


def test_an_embedder_of_another_dimension_cannot_feed_the_index(embedder: Embedder, live: LiveIndex) -> None:
    from services.common.errors import FailedPrecondition
    from services.retrieval.ingest import Ingestor

    class WideEmbedder:
        name, dimension = "wide-model", 768

    with pytest.raises(FailedPrecondition, match="768-dimensional"):
        Ingestor(WideEmbedder(), live.retriever.index)  # type: ignore[arg-type]


# --- while it serves -------------------------------------------------------------------------------------


def test_searches_are_answered_while_documents_are_being_embedded(live: LiveIndex) -> None:
    live.client.add_documents([ZURICH])
    many = [Document(d.id, d.text, d.title, d.source) for d in read_wikipedia_summaries(limit=100) if d.id != "Zurich"]
    adding = threading.Thread(target=live.client.add_documents, args=(many,))
    answered_during_add = 0

    adding.start()
    while adding.is_alive():
        found = live.client.search("Where is Zurich?", k=1)
        assert titles(found) == ["Zurich"]
        answered_during_add += adding.is_alive()
    adding.join()

    assert answered_during_add >= 3  # each waits for at most one batch of embedding, not the whole call
    assert live.client.stats().documents == len(many) + 1


def test_concurrent_searches_share_encode_calls(embedder: Embedder, live: LiveIndex) -> None:
    live.client.add_documents([ZURICH, PARIS])
    calls = []
    real_encode = embedder.encode

    def counting_encode(texts, batch_size=32):  # observes the real embedder; changes nothing
        calls.append(len(texts))
        return real_encode(texts, batch_size)

    questions = ["Where is Zurich?", "Where is Paris?"] * 16
    barrier = threading.Barrier(len(questions))

    def ask(question: str) -> str:
        barrier.wait()
        return live.client.search(question, k=1)[0].title

    embedder.encode = counting_encode  # type: ignore[method-assign]
    try:
        results: list[str] = [""] * len(questions)
        threads = [
            threading.Thread(target=lambda i=i, q=q: results.__setitem__(i, ask(q))) for i, q in enumerate(questions)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        del embedder.encode

    assert results == ["Zurich", "Paris"] * 16
    assert sum(calls) == len(questions)
    assert len(calls) < len(questions) / 2


# --- crashes ---------------------------------------------------------------------------------------------

CRASHING_INGEST = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from services.retrieval.corpus import Document
    from services.retrieval.embedder import Embedder
    from services.retrieval.index import load_index
    from services.retrieval.ingest import Ingestor
    from services.retrieval.store import PassageStore

    folder, moment = Path(sys.argv[1]), sys.argv[2]
    ingestor = Ingestor(Embedder(), load_index(folder, writable=True))
    ingestor.add([Document(id="kept", title="Kept", text="Zurich is the largest city in Switzerland.", source="")])
    print("committed", flush=True)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    # Faults injected on purpose: the process dies at the named moment of the second commit.
    if moment == "embedding":
        ingestor.embedder.encode = die
    else:  # the new vectors file is on disk, the store transaction has not happened
        PassageStore.commit = die
    ingestor.add([Document(id="lost", title="Lost", text="Paris is the capital of France.", source=""),
                  Document(id="kept", title="Kept", text="Replaced text that must not appear.", source="")])
    print("survived", flush=True)
    """
)


@pytest.mark.parametrize("moment", ["embedding", "between the vectors file and the store commit"])
def test_a_process_killed_mid_ingest_leaves_exactly_the_committed_documents(
    embedder: Embedder, tmp_path: Path, moment: str
) -> None:
    folder = create_index(tmp_path / "indexes" / "crashy", embedder.name, embedder.dimension)

    result = subprocess.run(
        [sys.executable, "-c", CRASHING_INGEST, str(folder), moment.split()[0]],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )

    assert result.returncode == -9, result.stderr
    assert result.stdout.split() == ["committed"]
    index = load_index(folder, writable=True)
    try:
        retriever = Retriever(embedder, index)
        assert (index.manifest.documents, index.manifest.passages) == (1, 1)
        hits = retriever.search("Paris is the capital of France", k=5)
        assert [(h.passage.doc_id, h.passage.text) for h in hits] == [
            ("kept", "Kept: Zurich is the largest city in Switzerland.")
        ]
        assert len(list(folder.glob("vectors-*.faiss"))) == 1  # the unfinished commit's file is gone
        from services.retrieval.ingest import Ingestor

        Ingestor(embedder, index).add([PARIS])  # and the index takes writes again
        assert index.manifest.documents == 2
    finally:
        index.close()


def test_a_second_writer_is_refused_while_one_holds_the_index(live: LiveIndex) -> None:
    from services.retrieval.index import IndexLoadError

    with pytest.raises(IndexLoadError, match="another process is writing"):
        load_index(live.folder, writable=True)
    load_index(live.folder).close()  # readers are welcome


# --- factories -------------------------------------------------------------------------------------------

FACTORIES = ["IDMap2,Flat", "HNSW16", "IVF4,Flat", "IVF4,PQ16x4", "PQ16x4"]


def synthetic_passages(count: int, documents: int) -> list[Passage]:
    return [
        Passage(id=f"d{i % documents}#{i // documents}", doc_id=f"d{i % documents}", title="", text=f"t{i}", source="")
        for i in range(count)
    ]


@pytest.mark.parametrize("factory", FACTORIES)
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_every_factory_round_trips_through_save_and_load(tmp_path: Path, factory: str, mmap: bool) -> None:
    from services.retrieval.index import Change

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    folder = create_index(tmp_path / "indexes" / "f", "synthetic", 32, IndexSettings(factory=factory))
    index = load_index(folder, writable=True)
    index.commit(Change(passages=synthetic_passages(400, 40), vectors=vectors))
    index.commit(Change(remove_documents=["d3", "d7"]))
    queries = vectors[:20]
    before = [[(h.passage.id, round(h.score, 4)) for h in hits] for hits in index.search_many(queries, 5)]
    index.close()

    reloaded = load_index(folder, IndexSettings(factory=factory, mmap=mmap), writable=True)
    try:
        after = [[(h.passage.id, round(h.score, 4)) for h in hits] for hits in reloaded.search_many(queries, 5)]
        assert after == before
        assert (reloaded.manifest.passages, reloaded.manifest.documents, reloaded.manifest.factory) == (
            380,
            38,
            factory,
        )
        found = {pid.split("#")[0] for hits in after for pid, _ in hits}
        assert not found & {"d3", "d7"}
        extra = Passage(id="new#0", doc_id="new", title="", text="new", source="")
        reloaded.commit(Change(passages=[extra], vectors=vectors[:1]))  # still writable
        assert reloaded.manifest.passages == 381
    finally:
        reloaded.close()


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF4,Flat"])
def test_an_empty_index_answers_searches_with_nothing(tmp_path: Path, factory: str) -> None:
    folder = create_index(tmp_path / "indexes" / "empty", "synthetic", 32, IndexSettings(factory=factory))
    index = load_index(folder)
    try:
        assert index.search_many(np.ones((2, 32), dtype=np.float32), 3) == [[], []]
    finally:
        index.close()


def test_a_factory_faiss_does_not_know_is_a_clear_error(tmp_path: Path) -> None:
    from services.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="Bogus99"):
        create_index(tmp_path / "indexes" / "bad", "synthetic", 32, IndexSettings(factory="Bogus99"))


def test_too_few_vectors_to_train_is_a_clear_error(tmp_path: Path) -> None:
    from services.common.errors import FailedPrecondition
    from services.retrieval.index import Change

    folder = create_index(tmp_path / "indexes" / "ivf", "synthetic", 32, IndexSettings(factory="IVF256,Flat"))
    index = load_index(folder, writable=True)
    try:
        with pytest.raises(FailedPrecondition, match="could not be trained"):
            index.commit(Change(passages=synthetic_passages(10, 10), vectors=np.ones((10, 32), dtype=np.float32)))
        assert index.manifest.passages == 0
    finally:
        index.close()


# --- chatctl index ---------------------------------------------------------------------------------------


def chatctl(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "clients.chatctl", *args], capture_output=True, text=True, timeout=120, cwd=cwd,
        env=environment,
    )  # fmt: skip


def test_chatctl_index_add_stats_and_delete(live: LiveIndex, tmp_path: Path) -> None:
    write_every_file_type(tmp_path / "docs")
    address = ["--address", live.client.address]

    added = chatctl("index", "add", "docs", "--quiet", *address, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    assert "added 5 documents, replaced 0" in added.stdout

    again = chatctl("index", "add", "docs/notes", "--quiet", *address, cwd=tmp_path)
    assert "added 0 documents, replaced 2" in again.stdout

    stats = json.loads(chatctl("index", "stats", "--json", *address, cwd=tmp_path).stdout)
    assert (stats["documents"], stats["dimension"], stats["index_type"]) == (5, 384, "IDMap2,Flat")

    deleted = chatctl("index", "delete", "docs/notes/geneva.md", *address, cwd=tmp_path)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted 1 documents" in deleted.stdout
    searched = chatctl("index", "search", "Lake Geneva", "-k", "5", *address, cwd=tmp_path)
    assert searched.returncode == 0, searched.stderr
    assert searched.stdout.count("\n    ") == 4  # one passage from each of the four documents left
    assert "Geneva" not in searched.stdout
    titled = chatctl("index", "search", "Lake Geneva", "-k", "2", "--title", "vienna", *address, cwd=tmp_path)
    assert titled.returncode == 0, titled.stderr
    first, second = [line for line in titled.stdout.splitlines() if line.startswith("[")]
    assert first.startswith("[1] Vienna (") and first.endswith("— by title")
    assert "by title" not in second


def test_chatctl_index_add_of_a_bad_path_sends_nothing(live: LiveIndex, tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text(ZURICH.text)

    result = chatctl("index", "add", "good.txt", "missing.md", "--address", live.client.address, cwd=tmp_path)

    assert result.returncode == 2
    assert "missing.md: no such file or folder" in result.stderr
    assert "Traceback" not in result.stderr
    assert live.client.stats().documents == 0
