"""Index commits that cost what they add: each commit writes one new vector segment and touches no earlier file,
removed passages are tombstones, searches merge the segments, compaction folds them into one (explicitly, over
gRPC and chatctl, or in the background), and a process killed while compacting reopens to the same documents.

Real faiss on small synthetic vectors for the index itself; the real embedder and a real server on 127.0.0.1
port 0 for the RPC and the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.client import IndexClient, NightcapError
from clients.documents import Document
from nightcap.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.common.errors import FailedPrecondition
from services.retrieval.chunker import Passage
from services.retrieval.embedder import Embedder
from services.retrieval.index import (
    STORE_FILE,
    Change,
    IndexSettings,
    PassageIndex,
    create_index,
    load_index,
)
from services.retrieval.retriever import Retriever
from services.retrieval.server import start_retrieval_server
from services.retrieval.store import PassageStore

ROOT = Path(__file__).resolve().parents[1]
DIMENSION = 32
# factory -> search parameters that make it exhaustive on 400 vectors, so results can be compared exactly
FACTORIES = {
    "IDMap2,Flat": "",
    "IVF4,Flat": "nprobe=4",
    "HNSW16": "efSearch=512",
    "PQ16x4": "",
    "IVF4,PQ16x4": "nprobe=4",
}


def unit_vectors(count: int, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIMENSION)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


VECTORS = unit_vectors(400)
QUERIES = unit_vectors(25, seed=1)


def passages(start: int, end: int) -> list[Passage]:
    # two passages per document, so deleting a document removes two rows
    return [
        Passage(id=f"d{i // 2}#{i % 2}", doc_id=f"d{i // 2}", title="", text=f"t{i}", source="")
        for i in range(start, end)
    ]


def open_new(folder: Path, factory: str, **settings: object) -> PassageIndex:
    create_index(folder, "synthetic", DIMENSION, IndexSettings(factory=factory))
    return load_index(
        folder, IndexSettings(factory=factory, search_params=FACTORIES[factory], **settings), writable=True
    )  # type: ignore[arg-type]


def commit_in_batches(index: PassageIndex, batches: list[tuple[int, int]]) -> None:
    for start, end in batches:
        index.commit(Change(passages=passages(start, end), vectors=VECTORS[start:end]))


def results(index: PassageIndex, k: int = 10) -> list[list[tuple[str, float]]]:
    return [[(h.passage.id, round(h.score, 4)) for h in hits] for hits in index.search_many(QUERIES, k)]


def ids(found: list[list[tuple[str, float]]]) -> list[list[str]]:
    return [[passage_id for passage_id, _ in hits] for hits in found]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def segment_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("vectors-*.faiss"))


BATCHES = [(0, 200), (200, 260), (260, 330), (330, 400)]


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF4,Flat"])
def test_a_search_over_several_segments_equals_a_single_index_search(tmp_path: Path, factory: str) -> None:
    single = open_new(tmp_path / "single", factory)
    segmented = open_new(tmp_path / "segmented", factory)
    try:
        commit_in_batches(single, [(0, 400)])
        commit_in_batches(segmented, BATCHES)

        assert (single.segment_count, segmented.segment_count) == (1, 4)
        assert len(segment_files(segmented.folder)) == 4
        assert results(segmented) == results(single)
        assert results(segmented, k=1) == results(single, k=1)
    finally:
        single.close()
        segmented.close()


def test_a_commit_writes_one_new_file_and_leaves_every_earlier_file_as_it_was(tmp_path: Path) -> None:
    index = open_new(tmp_path / "ivf", "IVF4,Flat")
    try:
        commit_in_batches(index, BATCHES[:2])
        before = {p.name: digest(p) for p in index.folder.glob("*.faiss")}

        commit_in_batches(index, BATCHES[2:3])
        index.commit(Change(remove_documents=["d3", "d150"]))  # a delete writes no vectors file at all

        after = {p.name: digest(p) for p in index.folder.glob("*.faiss")}
        assert {name: after[name] for name in before} == before
        assert len(after) == len(before) + 1
        # the trained quantizer is written once, at the first commit, and reused by every later segment
        assert len(list(index.folder.glob("trained-*.faiss"))) == 1
    finally:
        index.close()


def test_deleted_passages_are_tombstones_never_found_until_compaction_removes_them(tmp_path: Path) -> None:
    index = open_new(tmp_path / "flat", "IDMap2,Flat")
    try:
        commit_in_batches(index, BATCHES)
        found = {pid for hits in ids(results(index, k=20)) for pid in hits}
        doomed = sorted({pid.split("#")[0] for pid in found})[:5]

        index.commit(Change(remove_documents=doomed))

        assert (index.manifest.dead_rows, index.manifest.passages) == (10, 390)
        after_delete = results(index, k=20)
        assert not {pid.split("#")[0] for hits in ids(after_delete) for pid in hits} & set(doomed)
        assert all(len(hits) == 20 for hits in after_delete)  # tombstones are over-fetched, not returned short

        report = index.compact()

        assert (report.segments_before, report.segments_after, report.vectors_dropped) == (4, 1, 10)
        assert (index.manifest.dead_rows, index.manifest.vectors) == (0, 390)
        assert results(index, k=20) == after_delete
    finally:
        index.close()


@pytest.mark.parametrize("factory", list(FACTORIES))
def test_compaction_keeps_every_result_and_leaves_one_file(tmp_path: Path, factory: str) -> None:
    index = open_new(tmp_path / "f", factory)
    commit_in_batches(index, BATCHES)
    index.commit(Change(remove_documents=["d1", "d120", "d190"]))
    before = results(index)
    files_before = len(list(index.folder.iterdir()))

    report = index.compact()

    assert (report.segments_before, report.segments_after, report.vectors_dropped) == (4, 1, 6)
    assert results(index) == before
    assert len(segment_files(index.folder)) == 1
    assert len(list(index.folder.iterdir())) == files_before - 3
    index.close()
    reopened = load_index(index.folder, IndexSettings(factory=factory, search_params=FACTORIES[factory]))
    try:
        assert results(reopened) == before
        assert (reopened.manifest.passages, reopened.manifest.dead_rows, reopened.segment_count) == (394, 0, 1)
    finally:
        reopened.close()


def test_compacting_an_index_with_one_segment_and_no_tombstones_changes_nothing(tmp_path: Path) -> None:
    index = open_new(tmp_path / "one", "IDMap2,Flat")
    try:
        commit_in_batches(index, [(0, 400)])
        files = {p.name: digest(p) for p in index.folder.glob("*.faiss")}

        report = index.compact()

        assert (report.segments_before, report.segments_after, report.vectors_dropped) == (1, 1, 0)
        assert {p.name: digest(p) for p in index.folder.glob("*.faiss")} == files
    finally:
        index.close()


def test_compacting_away_every_passage_leaves_an_empty_index_that_takes_writes(tmp_path: Path) -> None:
    index = open_new(tmp_path / "gone", "IVF4,Flat")
    try:
        commit_in_batches(index, [(0, 200)])
        index.commit(Change(remove_documents=[f"d{i}" for i in range(100)]))

        index.compact()

        assert (index.manifest.passages, index.segment_count, segment_files(index.folder)) == (0, 0, [])
        assert index.search_many(QUERIES[:2], 3) == [[], []]
        commit_in_batches(index, [(200, 260)])  # the trained quantizer is still there: no retraining on 60
        assert index.manifest.passages == 60
    finally:
        index.close()


def test_commits_and_deletes_during_a_compaction_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import services.retrieval.index.compaction as index_module

    index = open_new(tmp_path / "busy", "IDMap2,Flat")
    commit_in_batches(index, BATCHES[:3])
    index.commit(Change(remove_documents=["d0"]))
    merging, release = threading.Event(), threading.Event()
    real_decode = index_module.decode_segment

    def slow_decode(path: Path):  # holds the merge open until the test has committed beside it
        merging.set()
        release.wait(30)
        return real_decode(path)

    monkeypatch.setattr(index_module, "decode_segment", slow_decode)
    compaction = threading.Thread(target=index.compact)
    compaction.start()
    try:
        assert merging.wait(30)
        commit_in_batches(index, BATCHES[3:])  # a new segment while the merge runs
        index.commit(Change(remove_documents=["d5", "d180"]))  # rows inside the segments being merged
        release.set()
        compaction.join(60)

        assert not compaction.is_alive()
        assert index.segment_count == 2  # the merged one, then the one committed during the merge
        assert (index.manifest.passages, index.manifest.dead_rows) == (394, 4)
        found = {pid.split("#")[0] for hits in ids(results(index, k=50)) for pid in hits}
        assert not found & {"d0", "d5", "d180"}
        assert found & {f"d{i}" for i in range(165, 200)}  # the documents of the segment added meanwhile
    finally:
        release.set()
        compaction.join(60)
        index.close()
    reopened = load_index(index.folder)
    try:
        assert (reopened.manifest.passages, reopened.manifest.dead_rows, reopened.segment_count) == (394, 4, 2)
    finally:
        reopened.close()


def test_segments_past_the_threshold_are_compacted_in_the_background(tmp_path: Path) -> None:
    index = open_new(tmp_path / "auto", "IDMap2,Flat", compact_segments=3)
    try:
        reference = None
        commit_in_batches(index, BATCHES)  # the fourth segment crosses the threshold of 3

        index.wait_for_compaction(60)

        assert index.segment_count == 1
        reference = open_new(tmp_path / "reference", "IDMap2,Flat")
        commit_in_batches(reference, [(0, 400)])
        assert results(index) == results(reference)
    finally:
        index.close()
        if reference is not None:
            reference.close()


def test_a_read_only_index_cannot_be_compacted(tmp_path: Path) -> None:
    index = open_new(tmp_path / "ro", "IDMap2,Flat")
    commit_in_batches(index, BATCHES[:2])
    index.close()
    reader = load_index(index.folder)
    try:
        with pytest.raises(FailedPrecondition, match="read-only"):
            reader.compact()
        assert reader.segment_count == 2
    finally:
        reader.close()


# --- older formats -----------------------------------------------------------------------------------------


def as_format_2(folder: Path) -> None:
    """Rewrites a one-segment index's state the way nightcap's format 2 recorded it (one vectors file)."""
    store = PassageStore.open(folder / STORE_FILE)
    state = store.read_state()
    assert state is not None and len(state["segments"]) == 1
    segment = state.pop("segments")[0]
    for key in ("trained", "next_file"):
        state.pop(key)
    for trained in folder.glob("trained-*.faiss"):
        trained.unlink()
    state.update(
        format=2,
        vectors_file=segment["file"],
        vectors_bytes=segment["bytes"],
        vectors_sha256=digest(folder / segment["file"]),
    )
    store.commit(state)
    store.close()


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF4,Flat"])
def test_a_format_2_index_is_migrated_on_open_and_keeps_its_results(tmp_path: Path, factory: str) -> None:
    index = open_new(tmp_path / "old", factory)
    commit_in_batches(index, [(0, 300)])
    before = results(index)
    index.close()
    as_format_2(index.folder)

    migrated = load_index(index.folder, IndexSettings(factory=factory, search_params=FACTORIES[factory]), writable=True)
    try:
        assert results(migrated) == before
        state = json.loads((index.folder / "manifest.json").read_text())
        assert (state["format"], len(state["segments"])) == (3, 1)
        commit_in_batches(migrated, [(300, 400)])  # an IVF index reuses the old file's trained quantizer
        assert migrated.segment_count == 2
    finally:
        migrated.close()
    reopened = load_index(index.folder)
    assert reopened.manifest.passages == 400
    reopened.close()


def test_a_damaged_segment_is_refused_naming_it(tmp_path: Path) -> None:
    from services.retrieval.index import IndexLoadError

    index = open_new(tmp_path / "bad", "IDMap2,Flat")
    commit_in_batches(index, BATCHES[:3])
    index.close()
    middle = segment_files(index.folder)[1]
    with (index.folder / middle).open("r+b") as file:
        file.seek(300)
        file.write(b"\xff" * 16)

    with pytest.raises(IndexLoadError, match=f"damaged: {middle}"):
        load_index(index.folder)


# --- crashes -----------------------------------------------------------------------------------------------

CRASHING_COMPACTION = textwrap.dedent(
    """
    import json, os, signal, sys
    from pathlib import Path
    import numpy as np
    import services.retrieval.index.compaction as compaction_module
    import services.retrieval.index.passage_index as passage_index_module
    from services.retrieval.chunker import Passage
    from services.retrieval.index import Change, load_index
    from services.retrieval.store import PassageStore

    folder, moment = Path(sys.argv[1]), sys.argv[2]
    index = load_index(folder, writable=True)

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    # Faults injected on purpose: the process dies at the named moment of the compaction.
    if moment == "merging":
        compaction_module.decode_segment = die
    elif moment == "written":  # the merged segment is on disk, the store transaction has not happened
        PassageStore.commit = die
    else:  # committed; the replaced segment files are not deleted yet
        passage_index_module.write_manifest_copy = die
    index.compact()
    print("survived", flush=True)
    """
)


@pytest.mark.parametrize("moment", ["merging", "written", "committed"])
def test_a_process_killed_mid_compaction_reopens_to_the_same_documents(tmp_path: Path, moment: str) -> None:
    index = open_new(tmp_path / "crashy", "IDMap2,Flat")
    commit_in_batches(index, BATCHES)
    index.commit(Change(remove_documents=["d2", "d111"]))
    before = results(index, k=20)
    documents = (index.manifest.documents, index.manifest.passages)
    index.close()

    result = subprocess.run(
        [sys.executable, "-c", CRASHING_COMPACTION, str(index.folder), moment],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )

    assert result.returncode == -9, result.stderr
    reopened = load_index(index.folder, writable=True)
    try:
        assert (reopened.manifest.documents, reopened.manifest.passages) == documents
        assert results(reopened, k=20) == before
        expected_segments = 1 if moment == "committed" else 4
        assert reopened.segment_count == expected_segments
        assert len(segment_files(index.folder)) == expected_segments  # nothing the crash left behind remains
        assert not list(index.folder.glob("*.partial"))
        reopened.compact()
        assert results(reopened, k=20) == before  # and it compacts and takes writes again
        reopened.commit(Change(passages=passages(400, 410), vectors=unit_vectors(10, seed=2)))
        assert reopened.manifest.passages == documents[1] + 10
    finally:
        reopened.close()


# --- over gRPC and chatctl -------------------------------------------------------------------------------

ZURICH = Document("zurich", "Zurich is the largest city in Switzerland. It lies on Lake Zurich.", "Zurich")
PARIS = Document("paris", "Paris is the capital and largest city of France.", "Paris")
BERLIN = Document("berlin", "Berlin is the capital of Germany.", "Berlin")


def chatctl(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "clients.chatctl", *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=environment,
    )  # fmt: skip


def test_chatctl_index_compact_merges_the_segments_of_a_served_index(embedder: Embedder, tmp_path: Path) -> None:
    folder = create_index(tmp_path / "indexes" / "served", embedder.name, embedder.dimension)
    retriever = Retriever(embedder, load_index(folder, writable=True))
    running = start_retrieval_server(retriever, "127.0.0.1:0")
    try:
        with IndexClient(running.address, timeout=120) as client:
            for document in (ZURICH, PARIS, BERLIN):
                client.add_documents([document])
            client.delete_documents(["paris"])
            stats = client.stats()
            assert (stats.segments, stats.tombstones, stats.documents) == (3, 1, 2)

            result = chatctl("index", "compact", "--address", running.address)

            assert result.returncode == 0, result.stderr
            assert "compacted 3 segments into 1, dropped 1 vectors" in result.stdout
            stats = client.stats()
            assert (stats.segments, stats.tombstones, stats.documents) == (1, 0, 2)
            assert [s.title for s in client.search("Where is Zurich?", k=3)] == ["Zurich", "Berlin"]
            assert len(segment_files(folder)) == 1
    finally:
        running.stop(grace=None)
        retriever.index.close()


def test_compact_on_a_read_only_index_is_failed_precondition(retrieval_address: str) -> None:
    # raw generated stub, no deadline: the way an outside client calls it
    with grpc.insecure_channel(retrieval_address) as channel, pytest.raises(grpc.RpcError) as caught:
        retrieval_pb2_grpc.RetrievalStub(channel).Compact(retrieval_pb2.CompactRequest())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "read-only" in (caught.value.details() or "")

    result = chatctl("index", "compact", "--address", retrieval_address)
    assert result.returncode == 1
    assert "read-only" in result.stderr and "Traceback" not in result.stderr


def test_chatctl_index_compact_with_no_service_says_where_it_looked(tmp_path: Path) -> None:
    with IndexClient("127.0.0.1:1", timeout=5) as client, pytest.raises(NightcapError) as caught:
        client.compact()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "127.0.0.1:1" in caught.value.message
