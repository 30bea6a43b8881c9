"""The retrieval service fills its own index while it serves (`serve --build-default`): searches answer from
what is committed, Stats and Search report the build, a killed build resumes, a failed one says so, and
SIGTERM stops one at once.

Real embedder, real faiss, real servers on 127.0.0.1; tiny slices of the default corpus, a few documents per
commit so one build makes several commits.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import start_orchestrator

from clients.client import ChatClient, IndexClient, NightcapError, SamplingParams
from nightcap.records import IndexStats
from nightcap.v1 import retrieval_pb2, retrieval_pb2_grpc
from services.retrieval.background_build import FIRST_COMMIT_DOCUMENTS, BackgroundBuild
from services.retrieval.build_plan import CorpusSelection, build_details
from services.retrieval.embedder import Embedder
from services.retrieval.index import PassageIndex, create_index, load_index
from services.retrieval.ingest import Ingestor
from services.retrieval.retriever import Retriever
from services.retrieval.server import start_retrieval_server

ROOT = Path(__file__).resolve().parents[1]
SLICE = CorpusSelection(limit=11, titles=("Zurich",))  # 12 documents
SLICE_DOCUMENTS = 12
PER_COMMIT = 4


class GatedCommits:
    """Wraps an index's commit: commits past the first ``open_commits`` wait for ``release`` (or raise
    ``error`` instead), so a test sees the service between two commits of its build."""

    def __init__(self, index, open_commits: int, error: Exception | None = None) -> None:
        self.calls = 0
        self.waiting = threading.Event()
        self.release = threading.Event()
        self._commit, self._open, self._error = index.commit, open_commits, error
        index.commit = self

    def __call__(self, change):
        self.calls += 1
        if self.calls > self._open:
            if self._error is not None:
                raise self._error
            self.waiting.set()
            self.release.wait(60)
        return self._commit(change)


@dataclass
class ServedBuild:
    address: str
    index: PassageIndex
    build: BackgroundBuild
    stub: retrieval_pb2_grpc.RetrievalStub


@pytest.fixture
def served_build(embedder: Embedder, tmp_path: Path) -> Iterator[ServedBuild]:
    """A service over a new index that records the slice to build; the test starts the build."""
    folder = tmp_path / "indexes" / "wikipedia-en"
    create_index(folder, embedder.name, embedder.dimension, details=build_details(SLICE, SLICE_DOCUMENTS, 3, 0))
    index = load_index(folder, writable=True)
    build = BackgroundBuild(Ingestor(embedder, index), SLICE, SLICE_DOCUMENTS, commit_documents=PER_COMMIT)
    running = start_retrieval_server(Retriever(embedder, index), "127.0.0.1:0", build=build)
    channel = grpc.insecure_channel(running.address)
    try:
        yield ServedBuild(running.address, index, build, retrieval_pb2_grpc.RetrievalStub(channel))
    finally:
        build.stop(timeout=60)
        channel.close()
        running.stop(grace=None)
        index.close()


def test_searches_answer_from_what_is_committed_while_the_index_grows(served_build: ServedBuild) -> None:
    gate = GatedCommits(served_build.index, open_commits=1)
    served_build.build.start()
    assert gate.waiting.wait(120), "the build never reached its second commit"

    found = served_build.stub.Search(retrieval_pb2.SearchRequest(query="a famous painting", k=3))
    stats = served_build.stub.Stats(retrieval_pb2.StatsRequest())

    assert len(found.passages) == 3  # from the first commit
    assert found.build.state == "building"
    assert (found.build.documents_done, found.build.documents_total) == (PER_COMMIT, SLICE_DOCUMENTS)
    assert stats.documents == PER_COMMIT and stats.build.state == "building"
    assert stats.build.passages_per_second > 0 and stats.build.eta_s > 0

    gate.release.set()
    assert served_build.build.wait(120)
    done = served_build.stub.Stats(retrieval_pb2.StatsRequest())
    assert done.build.state == "complete"
    assert done.build.documents_done == done.build.documents_total == done.documents == SLICE_DOCUMENTS
    assert done.segments == 3 and done.tombstones == 0  # 12 documents, 4 per commit, none added twice
    zurich = served_build.stub.Search(retrieval_pb2.SearchRequest(query="Where is Zurich?", k=1))
    assert zurich.passages[0].title == "Zurich"
    assert not zurich.HasField("build")  # set only while the index is being built
    with IndexClient(served_build.address) as client:  # the client reads it as its record
        assert client.stats().build.describe() == "index complete (12 documents)"


def test_a_question_asked_before_the_first_commit_is_answered_from_the_passage_its_words_find(
    served_build: ServedBuild, generation_address: str
) -> None:
    """`make up` asks at once. Before a vector is committed the build has staged every passage of the corpus for
    keyword search, so "Where is Zurich?" is grounded in the Zurich article, which the build has not embedded
    yet (it used to find nothing, and the reply said the documents do not say)."""
    gate = GatedCommits(served_build.index, open_commits=0)
    served_build.build.start()
    assert gate.waiting.wait(120), "the build never reached its first commit"
    grounded = start_orchestrator(generation_address, served_build.address)
    try:
        found = served_build.stub.Search(retrieval_pb2.SearchRequest(query="Where is Zurich?", k=3))
        by_vector = served_build.stub.Search(
            retrieval_pb2.SearchRequest(query="Where is Zurich?", k=3, mode=retrieval_pb2.SEARCH_MODE_VECTOR)
        )
        with ChatClient(grounded.address, timeout=60) as chat:
            reply = chat.ask("Where is Zurich?", retrieval=True, params=SamplingParams(temperature=0.0))
    finally:
        gate.release.set()
        grounded.stop(grace=1)
    assert found.build.documents_done == 0 and by_vector.passages == []  # no vector committed yet
    assert found.passages[0].title == "Zurich" and 0.3 < found.passages[0].score <= 1.0  # its cosine
    assert reply.started.sources[0].id == "Zurich#0"  # the title lookup finds staged documents too
    assert reply.finished.completion_tokens > 0 and not reply.text.startswith("The documents do not say")


def test_a_failing_build_reports_failed_with_its_error_and_the_service_keeps_serving(
    served_build: ServedBuild, log_lines: list[str]
) -> None:
    GatedCommits(served_build.index, open_commits=1, error=OSError("No space left on device"))
    served_build.build.start()
    assert served_build.build.wait(120)

    stats = served_build.stub.Stats(retrieval_pb2.StatsRequest())
    found = served_build.stub.Search(retrieval_pb2.SearchRequest(query="Where is Zurich?", k=2))

    assert stats.build.state == "failed"
    assert "No space left on device" in stats.build.error
    assert stats.build.documents_done == stats.documents == PER_COMMIT  # the first commit stays
    assert len(found.passages) == 2 and not found.HasField("build")
    assert any("index build failed after 4 of 12 documents" in line for line in log_lines)


# --- the command line: a serve process of its own -----------------------------------------------------------

SERVE_OPTIONS = ["--build-default", "--build-limit", "11", "--build-titles", "Zurich"]

# A real `serve --build-default`, killed by SIGKILL the moment its second commit is durable: mid-build, at a
# known place, so the test does not race the embedder.
KILLED_AFTER_TWO_COMMITS = textwrap.dedent(
    """
    import os, signal, sys
    from services.retrieval import index
    from services.retrieval.__main__ import app

    commit, commits = index.PassageIndex.commit, []

    def commit_then_die_after_two(self, change):
        report = commit(self, change)
        commits.append(report)
        if len(commits) == 2:
            print("killed after", report.manifest.documents, "documents", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return report

    index.PassageIndex.commit = commit_then_die_after_two
    app(["serve", *sys.argv[1:]])
    """
)


def _free_address() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def _serve(var_dir: Path, *options: str, script: str | None = None) -> tuple[subprocess.Popen[str], str]:
    """`python -m services.retrieval serve` (or ``script`` with the same arguments) on a free port."""
    address = _free_address()
    entry = ["-c", script] if script else ["-m", "services.retrieval", "serve"]
    process = subprocess.Popen(
        [sys.executable, *entry, "--var-dir", str(var_dir), "--address", address, *options],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NIGHTCAP_LOG_LEVEL": "INFO"},
    )
    return process, address


def _stats_when(address: str, predicate, timeout: float = 120.0) -> IndexStats:
    """Stats of the service at ``address`` once ``predicate(stats)`` holds."""
    deadline = time.monotonic() + timeout
    with IndexClient(address, timeout=10) as client:
        while True:
            try:
                stats = client.stats()
                if predicate(stats):
                    return stats
            except NightcapError:
                pass  # not serving yet
            assert time.monotonic() < deadline, f"no such stats from {address} within {timeout} s"
            time.sleep(0.1)


def test_a_build_killed_midway_resumes_at_its_last_commit_and_a_complete_index_starts_no_build(
    tmp_path: Path,
) -> None:
    per_commit = ["--build-commit-documents", str(PER_COMMIT)]
    killed, _ = _serve(tmp_path, *SERVE_OPTIONS, *per_commit, script=KILLED_AFTER_TWO_COMMITS)
    output, _ = killed.communicate(timeout=180)
    assert killed.returncode == -signal.SIGKILL, output
    assert "killed after 8 documents" in output

    resumed, address = _serve(tmp_path, *SERVE_OPTIONS, *per_commit)
    try:
        first = _stats_when(address, lambda stats: stats.build is not None)
        done = _stats_when(address, lambda stats: stats.build.state == "complete")
    finally:
        resumed.terminate()
        log = resumed.communicate(timeout=60)[0]

    assert first.build.documents_done >= 2 * PER_COMMIT  # it started from what the killed run committed
    assert "8 of 12 documents already committed, 4 to embed" in log
    assert (done.documents, done.build.documents_done, done.build.documents_total) == (12, 12, 12)
    assert done.tombstones == 0  # no document was embedded and committed a second time
    assert done.generation == 3  # two commits before the kill, one after
    index = load_index(tmp_path / "indexes" / "wikipedia-en")
    try:
        listed = index.list_documents(100)
    finally:
        index.close()
    assert len(listed) == len({doc_id for doc_id, *_ in listed}) == 12

    again, address = _serve(tmp_path, *SERVE_OPTIONS, *per_commit)
    try:
        stats = _stats_when(address, lambda stats: True)
    finally:
        again.terminate()
        log = again.communicate(timeout=60)[0]
    assert stats.build.state == "complete" and stats.generation == 3
    assert "no build to run" in log and "index build of" not in log


def test_sigterm_during_a_build_exits_promptly_and_commits_nothing_half(tmp_path: Path) -> None:
    # one commit of 300 documents: tens of seconds of embedding that SIGTERM must not wait for
    process, address = _serve(tmp_path, "--build-default", "--build-limit", "300", "--build-commit-documents", "300")
    try:
        _stats_when(address, lambda stats: stats.build is not None and stats.build.state == "building")
        time.sleep(1.0)  # into the embedding
        asked = time.monotonic()
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=60)[0]
        took = time.monotonic() - asked
    finally:
        process.kill()
    assert process.returncode == 0, log
    assert took < 10, f"took {took:.1f} s to stop:\n{log}"
    index = load_index(tmp_path / "indexes" / "wikipedia-en")
    try:
        # the small first commit may have landed; the one under way when SIGTERM came is not half there
        committed = index.manifest.documents
        assert committed in (0, FIRST_COMMIT_DOCUMENTS)
        assert f"index build stopped at {committed} of 300 documents" in log
        assert index.manifest.generation == (1 if committed else 0)
    finally:
        index.close()
