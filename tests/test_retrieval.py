"""Retrieval service, specified with the real embedder, real faiss and a real gRPC server on loopback.

One small slice of the default Wikipedia corpus is indexed once per module; everything else reuses it.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from typer.testing import CliRunner

from nightcap.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.common.paths import VarLayout
from services.retrieval.__main__ import app
from services.retrieval.build import BuildReport, build_index
from services.retrieval.chunker import group_sentences, passages_of, split_sentences
from services.retrieval.corpus import CorpusError, Document, read_wikipedia_summaries
from services.retrieval.embedder import DEFAULT_EMBEDDER_NAME, Embedder
from services.retrieval.index import STORE_FILE, IndexLoadError, load_index
from services.retrieval.retriever import MAX_K, Retriever

SLICE_TITLES = ["Zurich", "Switzerland", "Paris", "France", "Geneva", "Berlin"]
SLICE_LIMIT = 34  # the first articles in file order: arts, science and history to search past
QUESTION = "Where is Zurich?"


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def var(tmp_path_factory: pytest.TempPathFactory) -> VarLayout:
    return VarLayout(tmp_path_factory.mktemp("var"))


@pytest.fixture(scope="module")
def built(embedder: Embedder, var: VarLayout) -> BuildReport:
    documents = read_wikipedia_summaries(limit=SLICE_LIMIT, titles=SLICE_TITLES)
    return build_index(documents, embedder, var.indexes / "wikipedia-en", progress=False)


@pytest.fixture(scope="module")
def retriever(embedder: Embedder, built: BuildReport) -> Iterator[Retriever]:
    retriever = Retriever(embedder, load_index(built.folder))
    yield retriever
    retriever.index.close()


@pytest.fixture(scope="module")
def stub(retriever: Retriever) -> Iterator[retrieval_pb2_grpc.RetrievalStub]:
    from services.retrieval.server import start_retrieval_server

    running = start_retrieval_server(retriever, "127.0.0.1:0")
    channel = grpc.insecure_channel(running.address)
    try:
        yield retrieval_pb2_grpc.RetrievalStub(channel)
    finally:
        channel.close()
        running.stop(grace=None)


def copy_of(built: BuildReport, tmp_path: Path, name: str = "copy") -> Path:
    folder = tmp_path / "indexes" / name
    shutil.copytree(built.folder, folder)
    return folder


class FailingEmbedder:
    """Stands in for the embedder and fails as it starts, like a build interrupted with Ctrl-C."""

    def __init__(self, real: Embedder) -> None:
        self.name, self.dimension, self._real, self._calls = real.name, real.dimension, real, 0

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        self._calls += 1
        if self._calls == 1:
            raise KeyboardInterrupt
        return self._real.encode(texts, batch_size)


# --- chunker ---------------------------------------------------------------------------------------------


def test_passages_hold_three_sentences_each_prefixed_with_the_title() -> None:
    text = "One is first. Two is second! Three is third? Four is fourth. Five is fifth."
    document = Document(id="Counting", title="Counting", text=text, source="hand-written")

    passages = list(passages_of(document))

    assert [p.text for p in passages] == [
        "Counting: One is first. Two is second! Three is third?",
        "Counting: Four is fourth. Five is fifth.",
    ]
    assert [p.id for p in passages] == ["Counting#0", "Counting#1"]
    assert {(p.doc_id, p.title, p.source) for p in passages} == {("Counting", "Counting", "hand-written")}


def test_abbreviations_and_initials_do_not_end_a_sentence() -> None:
    text = (
        "The U.S. Navy sailed with Dr. Smith and Arthur C. Clarke, e.g. Mr. Jones. "
        'It reached St. Louis in 1990. "Then it stopped," he said. (It was late.) Then it left.'
    )

    assert split_sentences(text) == [
        "The U.S. Navy sailed with Dr. Smith and Arthur C. Clarke, e.g. Mr. Jones.",
        "It reached St. Louis in 1990.",
        '"Then it stopped," he said.',
        "(It was late.)",
        "Then it left.",
    ]


def test_a_short_text_is_one_passage() -> None:
    assert group_sentences(split_sentences("Only one sentence here")) == ["Only one sentence here"]


# --- corpus ----------------------------------------------------------------------------------------------


def test_the_default_corpus_slice_takes_the_first_articles_plus_the_named_ones() -> None:
    documents = list(read_wikipedia_summaries(limit=3, titles=["Zurich"]))

    assert len(documents) == 4
    zurich = documents[-1]
    assert zurich.title == "Zurich"
    assert zurich.source == "https://en.wikipedia.org/wiki/Zurich"
    assert zurich.text.startswith("Zurich is the largest city in Switzerland")


def test_an_unknown_title_is_an_error_not_a_smaller_corpus() -> None:
    with pytest.raises(CorpusError, match="Atlantis of Zog"):
        list(read_wikipedia_summaries(titles=["Zurich", "Atlantis of Zog"]))


# --- search over gRPC ------------------------------------------------------------------------------------


def test_search_finds_the_zurich_passage_first(stub: retrieval_pb2_grpc.RetrievalStub) -> None:
    # hybrid (the default) finds a Zurich passage first too, but the one repeating "Zurich" (docs/retrieval.md,
    # "A known cost of the fusion"); ranked by meaning, the one that says where Zurich is
    hybrid = stub.Search(retrieval_pb2.SearchRequest(query=QUESTION))
    assert hybrid.passages[0].title == "Zurich"
    response = stub.Search(retrieval_pb2.SearchRequest(query=QUESTION, mode=retrieval_pb2.SEARCH_MODE_VECTOR))

    assert len(response.passages) == 3  # the default k
    first = response.passages[0]
    assert (first.id, first.title) == ("Zurich#0", "Zurich")
    assert first.text.startswith("Zurich: Zurich is the largest city in Switzerland")
    assert first.source == "https://en.wikipedia.org/wiki/Zurich"
    scores = [p.score for p in response.passages]
    assert scores == sorted(scores, reverse=True)
    assert 0.3 < first.score <= 1.0


def test_k_sets_how_many_passages_come_back_up_to_the_whole_index(
    stub: retrieval_pb2_grpc.RetrievalStub, built: BuildReport
) -> None:
    assert len(stub.Search(retrieval_pb2.SearchRequest(query=QUESTION, k=1)).passages) == 1
    assert len(stub.Search(retrieval_pb2.SearchRequest(query=QUESTION, k=7)).passages) == 7
    everything = stub.Search(retrieval_pb2.SearchRequest(query=QUESTION, k=MAX_K)).passages
    assert built.passages < MAX_K
    assert len(everything) == built.passages
    assert len({p.id for p in everything}) == built.passages


def test_stats_describe_the_loaded_index(stub: retrieval_pb2_grpc.RetrievalStub, built: BuildReport) -> None:
    stats = stub.Stats(retrieval_pb2.StatsRequest())

    assert stats.passages == built.passages
    assert stats.documents == built.documents == SLICE_LIMIT + len(SLICE_TITLES)
    assert stats.dimension == 384
    assert stats.embedder == DEFAULT_EMBEDDER_NAME
    assert stats.index_type == "IDMap2,Flat"
    assert stats.index_path == str(built.folder)


@pytest.mark.parametrize(
    ("query", "k", "message"),
    [
        ("", None, "query is empty"),
        ("   ", None, "query is empty"),
        (QUESTION, 0, "k must be between 1 and 100"),
        (QUESTION, 101, "k must be between 1 and 100"),
        (QUESTION, -1, "k must be between 1 and 100"),
    ],
)
def test_bad_requests_get_invalid_argument_and_the_server_keeps_serving(
    stub: retrieval_pb2_grpc.RetrievalStub, query: str, k: int | None, message: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Search(retrieval_pb2.SearchRequest(query=query, k=k))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert stub.Search(retrieval_pb2.SearchRequest(query=QUESTION)).passages[0].title == "Zurich"


def test_concurrent_searches_all_get_their_answers(stub: retrieval_pb2_grpc.RetrievalStub) -> None:
    questions = [QUESTION, "Where is Paris?"] * 8
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(lambda q: stub.Search(retrieval_pb2.SearchRequest(query=q, k=1)), questions))

    assert {a.passages[0].title for a in answers[0::2]} == {"Zurich"}
    assert {a.passages[0].title for a in answers[1::2]} == {"Paris"}


# --- the index on disk -----------------------------------------------------------------------------------


def test_an_index_reloaded_from_disk_gives_identical_results(embedder: Embedder, retriever: Retriever) -> None:
    reloaded = Retriever(embedder, load_index(retriever.index.folder))
    try:
        for query in [QUESTION, "Eiffel Tower", "a film by Stanley Kubrick"]:
            before, after = retriever.search(query, 5), reloaded.search(query, 5)
            assert [h.passage for h in after] == [h.passage for h in before]
            assert [h.score for h in after] == pytest.approx([h.score for h in before])
    finally:
        reloaded.index.close()


def test_a_folder_without_committed_state_is_refused_with_how_to_rebuild(built: BuildReport, tmp_path: Path) -> None:
    folder = copy_of(built, tmp_path, "half-built")
    (folder / STORE_FILE).unlink()

    with pytest.raises(IndexLoadError) as caught:
        load_index(folder)

    message = str(caught.value)
    assert str(folder) in message
    assert "incomplete" in message
    assert f"build-default --name half-built --var-dir {tmp_path}" in message


def test_a_build_killed_halfway_leaves_the_previous_index_serving(embedder: Embedder, tmp_path: Path) -> None:
    destination = tmp_path / "indexes" / "small"
    documents = list(read_wikipedia_summaries(titles=["Zurich", "Paris", "Berlin"]))
    build_index(documents[:1], embedder, destination, progress=False)

    with pytest.raises(KeyboardInterrupt):
        build_index(documents, FailingEmbedder(embedder), destination, batch_size=1, progress=False)  # type: ignore[arg-type]

    survivor = load_index(destination)
    assert survivor.manifest.documents == 1
    survivor.close()
    assert sorted(p.name for p in destination.parent.iterdir()) == [".small.lock", "small"]


def test_the_next_build_cleans_up_what_a_killed_build_left(embedder: Embedder, tmp_path: Path) -> None:
    indexes = tmp_path / "indexes"
    leftover = indexes / ".small.building-99999"
    leftover.mkdir(parents=True)
    (leftover / "vectors-00000001.faiss").write_bytes(b"half a file")

    build_index(read_wikipedia_summaries(titles=["Zurich"]), embedder, indexes / "small", progress=False)

    assert not leftover.exists()
    load_index(indexes / "small").close()


def test_a_corrupt_vectors_file_is_refused_naming_it(built: BuildReport, tmp_path: Path) -> None:
    folder = copy_of(built, tmp_path)
    vectors = next(folder.glob("vectors-*.faiss"))
    with vectors.open("r+b") as file:
        file.seek(2000)
        file.write(b"\xff" * 64)

    with pytest.raises(IndexLoadError, match=f"at {folder} is damaged: {vectors.name}"):
        load_index(folder)


def test_a_truncated_vectors_file_is_refused(built: BuildReport, tmp_path: Path) -> None:
    folder = copy_of(built, tmp_path)
    vectors = next(folder.glob("vectors-*.faiss"))
    vectors.write_bytes(b"")

    with pytest.raises(IndexLoadError, match=f"damaged: {vectors.name}"):
        load_index(folder)


def test_a_corrupt_passage_store_is_refused_naming_it(built: BuildReport, tmp_path: Path) -> None:
    folder = copy_of(built, tmp_path)
    with (folder / STORE_FILE).open("r+b") as file:
        file.seek(0)
        file.write(b"\xff" * 64)

    with pytest.raises(IndexLoadError, match=f"damaged: {STORE_FILE}"):
        load_index(folder)


def test_a_missing_index_is_refused_with_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(IndexLoadError) as caught:
        load_index(VarLayout(tmp_path).indexes / "wikipedia-en")

    message = str(caught.value)
    assert "does not exist" in message
    assert f"build-default --name wikipedia-en --var-dir {tmp_path}" in message
    assert "make up" in message


def test_an_embedder_of_another_dimension_is_refused(retriever: Retriever) -> None:
    class WideEmbedder:
        name, dimension = "wide-model", 768

    with pytest.raises(IndexLoadError, match="768-dimensional"):
        Retriever(WideEmbedder(), retriever.index)  # type: ignore[arg-type]


# --- the command line ------------------------------------------------------------------------------------


def test_serve_exits_with_status_2_and_no_traceback_when_the_index_is_missing(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["serve", "--var-dir", str(tmp_path), "--address", "127.0.0.1:0"])

    assert result.exit_code == 2
    assert "does not exist" in result.output
    assert "build-default" in result.output
    assert "Traceback" not in result.output


def test_build_default_skips_an_index_that_is_already_complete(built: BuildReport, var: VarLayout) -> None:
    result = CliRunner().invoke(app, ["build-default", "--var-dir", str(var.root)])

    assert result.exit_code == 0, result.output
    assert "already complete" in result.output
    assert f"{built.passages} passages" in result.output
