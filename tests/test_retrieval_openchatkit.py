"""OpenChatKit's Wikipedia index format and mean-pooling embedders, on a small index of the same format made here.

facebook/contriever-msmarco cannot be downloaded on these machines; its stand-in is the bundled MiniLM saved as
a plain Hugging Face encoder (no sentence-transformers modules), which is exactly the kind of model that gets
mean pooling, and which embeds without normalization as OpenChatKit's index does.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import faiss
import grpc
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from nightcap.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.retrieval.embedder import Embedder, default_embedder_path
from services.retrieval.index import IndexLoadError
from services.retrieval.openchatkit import INDEX_FILE, SNIPPETS_FILE, Expansion, OpenChatKitIndex, SnippetTable
from services.retrieval.server import start_retrieval_server

SNIPPETS = [
    "Penguins are flightless birds that live almost only in the Southern Hemisphere.",
    "Volcanoes erupt molten rock called lava from deep under the crust.",
    "Zurich is the largest city in Switzerland.",
    "Zurich is a large Swiss city in the north of Switzerland.",
    "Zurich, the biggest city of Switzerland, lies on Lake Zurich.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar.",
    "The violin is a string instrument played with a bow.",
    "Jupiter is the largest planet in the Solar System.",
]
ZURICH_ROWS = [2, 3, 4]


@pytest.fixture(scope="module")
def plain_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled MiniLM as a plain Hugging Face folder: config, weights, tokenizer, no modules.json."""
    folder = tmp_path_factory.mktemp("plain-encoder")
    source = default_embedder_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):  # fmt: skip
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def contriever_like(plain_encoder: Path) -> Embedder:
    return Embedder(plain_encoder, normalize=False)


def mean_pooled(folder: Path, texts: list[str]) -> np.ndarray:
    """OpenChatKit's own recipe (retrieval/wikipedia.py): AutoModel, then the mask-weighted mean of tokens."""
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder)
    inputs = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**inputs)[0]
    mask = inputs["attention_mask"][..., None].float()
    return ((tokens * mask).sum(1) / mask.sum(1)).numpy()


@pytest.fixture(scope="module")
def openchatkit_folder(contriever_like: Embedder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """knn.index + wikipedia-en-sentences.parquet under files/, as OpenChatKit's prepare.py lays them out."""
    folder = tmp_path_factory.mktemp("wikipedia-3sentence-level-retrieval-index")
    files = folder / "files"
    files.mkdir()
    vectors = contriever_like.encode(SNIPPETS)
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    faiss.write_index(index, str(files / INDEX_FILE))
    # Small row groups, so reading a hit and its neighbours crosses group boundaries.
    pq.write_table(pa.table({"text_snippet": SNIPPETS, "url": ["x"] * len(SNIPPETS)}), files / SNIPPETS_FILE,
                   row_group_size=3)  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def openchatkit(openchatkit_folder: Path, contriever_like: Embedder) -> OpenChatKitIndex:
    return OpenChatKitIndex(openchatkit_folder, contriever_like)


def test_a_plain_encoder_gets_mean_pooling_the_way_openchatkit_computed_it(
    plain_encoder: Path, contriever_like: Embedder
) -> None:
    texts = ["Where is Zurich?", "Volcanoes erupt lava."]

    assert contriever_like.pooling == "mean"
    np.testing.assert_allclose(contriever_like.encode(texts), mean_pooled(plain_encoder, texts), atol=1e-4)


def test_the_snippet_table_reads_any_row_across_row_groups(openchatkit_folder: Path) -> None:
    table = SnippetTable(openchatkit_folder / "files" / SNIPPETS_FILE, cached_groups=1)

    assert len(table) == len(SNIPPETS)
    assert [table[row] for row in (7, 0, 4, 3, 5)] == [SNIPPETS[row] for row in (7, 0, 4, 3, 5)]
    with pytest.raises(IndexError):
        table[len(SNIPPETS)]


def test_a_hit_grows_by_its_similar_neighbours_and_stops_at_the_first_unrelated_one(
    openchatkit: OpenChatKitIndex, contriever_like: Embedder
) -> None:
    vectors = contriever_like.encode(SNIPPETS)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    # What the fixture is built on: the Zurich snippets are alike, their neighbours are not.
    assert min(similarity[a, b] for a in ZURICH_ROWS for b in ZURICH_ROWS) > 0.5
    assert similarity[1, ZURICH_ROWS].max() < 0.5 and similarity[5, ZURICH_ROWS].max() < 0.5

    [[hit]] = openchatkit.search_batch(["Where is Zurich?"], k=1)

    assert int(hit.passage.doc_id) in ZURICH_ROWS
    assert hit.passage.text == " ".join(SNIPPETS[row] for row in ZURICH_ROWS)
    query = contriever_like.encode(["Where is Zurich?"])[0]
    assert hit.score == pytest.approx(float(query @ vectors[int(hit.passage.doc_id)]), rel=1e-4)


@pytest.mark.parametrize(("w", "w_th"), [(0, 0.5), (5, 0.999)])
def test_without_window_or_with_a_strict_threshold_a_hit_stays_alone(
    openchatkit_folder: Path, contriever_like: Embedder, w: int, w_th: float
) -> None:
    index = OpenChatKitIndex(openchatkit_folder, contriever_like, Expansion(w=w, w_th=w_th))

    [[hit]] = index.search_batch(["Where is Zurich?"], k=1)

    assert hit.passage.text == SNIPPETS[int(hit.passage.doc_id)]


def test_a_window_of_one_adds_at_most_one_neighbour_on_each_side(
    openchatkit_folder: Path, contriever_like: Embedder
) -> None:
    index = OpenChatKitIndex(openchatkit_folder, contriever_like, Expansion(w=1))

    assert index.expand(3) == (2, 4)
    assert index.expand(2) == (2, 3)  # row 1 (volcanoes) is unlike row 2
    assert index.expand(0) == (0, 0)  # the first row has no left neighbour; row 1 is unlike it


@pytest.fixture(scope="module")
def openchatkit_stub(openchatkit: OpenChatKitIndex) -> Iterator[retrieval_pb2_grpc.RetrievalStub]:
    running = start_retrieval_server(openchatkit, "127.0.0.1:0")
    channel = grpc.insecure_channel(running.address)
    try:
        yield retrieval_pb2_grpc.RetrievalStub(channel)
    finally:
        channel.close()
        running.stop(grace=None)


def test_the_service_serves_an_openchatkit_index_read_only(openchatkit_stub: retrieval_pb2_grpc.RetrievalStub) -> None:
    found = openchatkit_stub.Search(retrieval_pb2.SearchRequest(query="Where is Zurich?", k=2)).passages
    stats = openchatkit_stub.Stats(retrieval_pb2.StatsRequest())

    assert found[0].text == " ".join(SNIPPETS[row] for row in ZURICH_ROWS)
    assert (stats.passages, stats.dimension, stats.format) == (len(SNIPPETS), 384, "openchatkit")
    with pytest.raises(grpc.RpcError) as caught:
        openchatkit_stub.AddDocuments(iter([retrieval_pb2.AddDocumentsRequest()]))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "read-only" in caught.value.details()


def test_a_snippet_file_that_does_not_match_the_index_is_refused(
    openchatkit_folder: Path, contriever_like: Embedder, tmp_path: Path
) -> None:
    shutil.copytree(openchatkit_folder, tmp_path / "copy")
    pq.write_table(pa.table({"text_snippet": SNIPPETS[:5]}), tmp_path / "copy" / "files" / SNIPPETS_FILE)

    with pytest.raises(IndexLoadError, match=r"holds 8 vectors, wikipedia-en-sentences\.parquet 5 snippets"):
        OpenChatKitIndex(tmp_path / "copy", contriever_like)


def test_an_embedder_of_another_dimension_is_refused(openchatkit_folder: Path, tmp_path: Path) -> None:
    class WideEmbedder:
        name, dimension, normalize = "wide-model", 768, False

    with pytest.raises(IndexLoadError, match="768-dimensional"):
        OpenChatKitIndex(openchatkit_folder, WideEmbedder())  # type: ignore[arg-type]


def test_a_folder_without_the_files_says_how_to_get_them(contriever_like: Embedder, tmp_path: Path) -> None:
    with pytest.raises(IndexLoadError, match="prepare-openchatkit"):
        OpenChatKitIndex(tmp_path, contriever_like)
