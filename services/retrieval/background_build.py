"""Fill a served index from the default corpus on one background thread while it answers searches.

The documents of the selection that the index does not hold yet are first staged, passages without vectors that
keyword searches find at once (the first chat after `make up` is answered from them), then committed through the
Ingestor a few thousand passages at a time: each commit is visible to searches at once, and a build killed midway
(even by kill -9) resumes after its last commit, because the next start skips the documents already present.
"""

from __future__ import annotations

import threading
import time

from loguru import logger

from nightcap.records import BUILDING, COMPLETE, FAILED, INCOMPLETE, IndexBuild
from services.retrieval.build_plan import CorpusSelection
from services.retrieval.chunker import passages_of
from services.retrieval.ingest import Ingestor, IngestStopped

# Documents per commit: about 1,500 passages, ~45 s of embedding at 33 passages/s on 2 CPU cores. Each commit is
# one new vector segment that searches see at once, so the first answers come from the first ~45 s, a kill loses
# at most one commit's work, and the whole default corpus makes 11 segments: under --compact-segments (32), so
# no compaction competes with the build for the CPU.
COMMIT_DOCUMENTS = 1000
# The first commit of a run is smaller (about 150 passages, ~5 s), so the stack's first answers search something.
FIRST_COMMIT_DOCUMENTS = 100


class BackgroundBuild:
    """Commits the selection's missing documents to ``ingestor``'s index, ``commit_documents`` at a time, on
    its own thread. ``progress()`` may be called from any thread; ``stop()`` ends it between encode batches."""

    def __init__(
        self,
        ingestor: Ingestor,
        selection: CorpusSelection,
        documents_total: int,
        commit_documents: int = COMMIT_DOCUMENTS,
    ) -> None:
        if commit_documents < 1:
            raise ValueError(f"a commit needs at least one document; got {commit_documents}")
        self._ingestor = ingestor
        self._selection = selection
        self._commit_documents = commit_documents
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the counters below, written by the build thread, read by RPC threads
        manifest = ingestor.index.manifest
        self._state = BUILDING
        self._total = documents_total
        self._done = min(manifest.documents, documents_total)  # until the corpus is read: what is committed
        self._passages = manifest.passages
        self._done_here = self._passages_here = 0  # by this run, for its rate and ETA
        self._error = ""
        self._started: float | None = None
        self._finished: float | None = None
        self._thread = threading.Thread(target=self._run, name="index-build", daemon=True)

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stops before the next encode batch (a commit under way finishes first) and waits for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the build has ended: complete, failed or stopped."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def progress(self) -> IndexBuild:
        with self._lock:
            end = self._finished or time.monotonic()
            elapsed = end - self._started if self._started is not None else 0.0
            rate = self._passages_here / elapsed if elapsed > 0 else 0.0
            eta = 0.0
            if self._state == BUILDING and self._done_here:
                eta = (self._total - self._done) * elapsed / self._done_here
            return IndexBuild(self._state, self._done, self._total, self._passages, rate, eta, elapsed, self._error)

    def _run(self) -> None:
        try:
            self._build()
        except IngestStopped:
            self._finish(INCOMPLETE)
            logger.info("index build stopped at {}; the next start goes on from there", self._counted())
        except Exception as error:  # reported through Stats; the service goes on serving what is committed
            self._finish(FAILED, str(error) or type(error).__name__)
            logger.opt(exception=error).error("index build failed after {}: {}", self._counted(), error)

    def _build(self) -> None:
        index = self._ingestor.index
        documents = self._selection.read()
        present = index.documents_present([document.id for document in documents])
        pending = [document for document in documents if document.id not in present]
        with self._lock:
            if len(documents) != self._total:
                logger.warning(
                    "the index records {} documents to build, the corpus selection now has {}: building those",
                    self._total,
                    len(documents),
                )
                self._total = len(documents)
            self._done = len(present)
        # Keywords index in seconds what vectors take minutes to embed: every pending passage is searchable by
        # its words before the first one is embedded, and each commit moves its documents' passages over.
        staged_at = time.monotonic()
        chunking = self._ingestor.chunking
        index.stage([p for d in pending for p in passages_of(d, chunking.sentences, chunking.overlap)])
        logger.info("staged {} documents for keyword search in {:.1f}s", len(pending), time.monotonic() - staged_at)
        logger.info(
            "index build of {}: {} of {} documents already committed, {} to embed, {} per commit",
            index.folder,
            len(present),
            len(documents),
            len(pending),
            self._commit_documents,
        )
        first = min(FIRST_COMMIT_DOCUMENTS, self._commit_documents)
        starts = [0, *range(first, len(pending), self._commit_documents)] if pending else []
        for start, end in zip(starts, [*starts[1:], len(pending)], strict=True):
            if self._stop.is_set():
                raise IngestStopped(f"stopped with {len(pending) - start} documents to go")
            chunk = pending[start:end]
            report = self._ingestor.add(chunk, self._stop)
            with self._lock:
                self._done += len(chunk)
                self._done_here += len(chunk)
                self._passages = report.passages_total
                self._passages_here += report.passages_added
            logger.info("{}", self.progress().describe())
        self._finish(COMPLETE)
        done = self.progress()
        logger.info(
            "index build complete: {:,} documents, {:,} passages; this run embedded {:,} passages in {:.1f} s "
            "({:.1f} passages/s)",
            done.documents_total,
            done.passages_done,
            self._passages_here,
            done.elapsed_s,
            done.passages_per_second,
        )

    def _finish(self, state: str, error: str = "") -> None:
        with self._lock:
            self._state, self._error, self._finished = state, error, time.monotonic()

    def _counted(self) -> str:
        with self._lock:
            return f"{self._done:,} of {self._total:,} documents"
