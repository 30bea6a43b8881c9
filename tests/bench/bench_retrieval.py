"""Retrieval benchmark: index speed and recall at 100k and 1M vectors, ingestion against bare encode, and
retrieval quality on the default corpus. Writes var/bench/retrieval.json (tests/bench/report.py) and prints a table.

    python tests/bench/bench_retrieval.py [--sizes 100000,1000000] [--articles 1000] [--queries 1000]

Three parts, each measured side by side with its baseline in this one run:

1. Index speed on vectors made from real ones: the MiniLM vectors of --base-articles articles' passages, mixed
   in pairs with a little noise up to 1M (embedding a million passages takes hours here); queries are real
   questions, embedded. Then, on the largest size, add100: 100 articles committed to it against the same to an
   empty (trained) index, next to what a commit cost before segments, the open and the compaction.
   Every approximate index is compared with exact search (IDMap2,Flat) on the same vectors: recall@10, p50/p99
   latency and queries/s of one caller, queries/s of 32 concurrent callers through the service's QueryBatcher,
   build time (train + add + the durable commit) and the index's size (on disk and in memory). Query embedding
   is excluded: the batcher is handed precomputed query vectors.
2. Ingestion: the same passages of the default corpus through bare ``SentenceTransformer.encode`` and through
   the service (AddDocuments over gRPC: chunking, embedding, faiss, SQLite, durable commit), fp32 and int8,
   through the background build `make up` runs (`serve --build-default`: commits of the first 100 documents, then
   1,000 at a time, into a served index) and through `build-index` (one offline build into a new folder),
   interleaved slice by slice so that load from other work on the machine hits all of them alike.
3. Quality: a question per article made from its Wikipedia description ("Painting by Georges Seurat" ->
   "What is the painting by Georges Seurat?"), the article as the expected source: recall@1, recall@5, MRR@10
   over articles; for the default fp32 embedder and the int8-quantized one, and for hybrid search.
4. The keyword index: staging every passage of the default corpus into it (what a background build does before
   it embeds) against embedding them (extrapolated from a sample), and its size against the vectors'. Hybrid
   search's p50 against vector-only on the same index is measured in part 1 (the synthetic passages carry the
   text of the real passage their vector mostly comes from, so bm25 sees a real vocabulary repeated).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
from loguru import logger
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import BenchReport  # noqa: E402

from clients.client import IndexClient  # noqa: E402
from clients.documents import Document as ClientDocument  # noqa: E402
from nightcap.records import COMPLETE  # noqa: E402
from services.retrieval.background_build import BackgroundBuild  # noqa: E402
from services.retrieval.build import build_index  # noqa: E402
from services.retrieval.chunker import Passage, passages_of  # noqa: E402
from services.retrieval.corpus import default_corpus_path, read_wikipedia_summaries  # noqa: E402
from services.retrieval.embedder import Embedder  # noqa: E402
from services.retrieval.index import (  # noqa: E402
    Change,
    Hit,
    IndexSettings,
    PassageIndex,
    create_index,
    load_index,
)
from services.retrieval.ingest import Ingestor  # noqa: E402
from services.retrieval.retriever import HYBRID, VECTOR, QueryBatcher, Retriever  # noqa: E402
from services.retrieval.server import start_retrieval_server  # noqa: E402
from services.retrieval.store import WORDS_FOLDER, PassageStore  # noqa: E402

DIMENSION = 384
CONCURRENT_CALLERS = 32
# Mixtures: (1 - w) * a + w * b + noise, w ~ U(0, MIX_MAX), per-dimension noise NOISE (a MiniLM vector's own
# per-dimension spread is about 1/sqrt(384) = 0.05), then normalized: new points between real passages that keep
# the embeddings' anisotropy (they all lean the same way), which uniform or clustered noise does not.
MIX_MAX = 0.5
NOISE = 0.01
# size -> (factory, search parameters to measure, train sample); exact search first, the baseline of the others.
# Each index is built once and measured under each of its search parameters. HNSW32 took ~25 min to build at
# 1M on these 2 shared cores (extrapolated from 100k), so it is measured up to --hnsw-max vectors only.
INDEXES = {
    100_000: [
        ("IDMap2,Flat", [""], 0),
        ("HNSW32", ["efSearch=64", "efSearch=128"], 0),
        ("IVF1024,Flat", ["nprobe=8", "nprobe=16", "nprobe=32"], 65_536),
    ],
    1_000_000: [
        ("IDMap2,Flat", [""], 0),
        ("HNSW32", ["efSearch=64", "efSearch=128"], 0),
        ("IVF1024,Flat", ["nprobe=8", "nprobe=16", "nprobe=32", "nprobe=64"], 65_536),
    ],
}
ADD_ROUNDS = 3  # add100 measurements, each a new set of 100 articles, alternating between the two indexes


# --- 1. index speed on vectors made from real embeddings -----------------------------------------------------


def corpus_vectors(embedder: Embedder, article_count: int, cache: Path) -> np.ndarray:
    """MiniLM vectors of the first articles' passages; cached under var/bench/ (encoding them takes minutes)."""
    path = cache / f"minilm-passages-{article_count}.npy"
    if path.is_file():
        return np.load(path)
    texts = [p.text for d in read_wikipedia_summaries(limit=article_count) for p in passages_of(d)]
    logger.info("encoding {} passages of {} articles for the mixture base", len(texts), article_count)
    vectors = np.concatenate(
        [embedder.encode(texts[i : i + 256]) for i in tqdm(range(0, len(texts), 256), desc="base vectors")]
    )
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, vectors)
    return vectors


def base_texts(article_count: int) -> list[str]:
    """The texts of the passages ``corpus_vectors`` embeds, in its order."""
    return [p.text for d in read_wikipedia_summaries(limit=article_count) for p in passages_of(d)]


def mixture_vectors(base: np.ndarray, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The mixtures, and for each the base passage it mostly is (its text stands in for the mixture's)."""
    out = np.empty((count, base.shape[1]), dtype=np.float32)
    primary = np.empty(count, dtype=np.int64)
    for start in range(0, count, 100_000):
        n = min(100_000, count - start)
        weight = rng.uniform(0, MIX_MAX, (n, 1)).astype(np.float32)
        primary[start : start + n] = rng.integers(0, len(base), n)
        block = (1 - weight) * base[primary[start : start + n]] + weight * base[rng.integers(0, len(base), n)]
        block += rng.standard_normal(block.shape, dtype=np.float32) * NOISE
        out[start : start + n] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, primary


class PrecomputedQueries:
    """The batcher's searchable with query embedding taken out: "q17" is the 17th precomputed query vector."""

    read_only = True

    def __init__(self, index: PassageIndex, queries: np.ndarray) -> None:
        self.index, self.queries = index, queries

    def search_batch(self, queries: list[str], k: int, titles: list[str] | None = None) -> list[list[Hit]]:
        return self.index.search_many(self.queries[[int(q[1:]) for q in queries]], k)


class PrecomputedEmbedder:
    """A Retriever's embedder with embedding taken out of the timing: texts' vectors are looked up."""

    name, dimension = "minilm-mixtures-384", DIMENSION

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self.vectors = vectors

    def encode(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        return np.stack([self.vectors[text] for text in texts])


def build(
    folder: Path, factory: str, train_sample: int, vectors: np.ndarray, texts: list[str]
) -> tuple[PassageIndex, float]:
    """Creates the index and commits every vector in one step; the time is train + add + the durable commit
    (the keyword index's inserts included)."""
    settings = IndexSettings(factory=factory, train_sample=train_sample or 262_144)
    create_index(folder, "minilm-mixtures-384", DIMENSION, settings)
    index = load_index(folder, settings, writable=True)
    passages = [Passage(f"d{i}#0", f"d{i}", "", text, "") for i, text in enumerate(texts)]
    started = time.perf_counter()
    index.commit(Change(passages=passages, vectors=vectors))
    return index, time.perf_counter() - started


def latencies(search: Callable[[int], object], count: int) -> np.ndarray:
    times = np.empty(count)
    for i in range(count):
        started = time.perf_counter()
        search(i)
        times[i] = time.perf_counter() - started
    return times * 1000


def measure(index: PassageIndex, queries: np.ndarray, exact_rows: np.ndarray | None, factory: str) -> dict:
    found = index.search_many(queries, 10)
    rows = np.array([[int(h.passage.doc_id[1:]) for h in hits] + [-1] * (10 - len(hits)) for hits in found])
    reference = rows if exact_rows is None else exact_rows
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, reference, strict=True)]))
    faiss.omp_set_num_threads(1)  # one caller on one core: the latency a single request sees
    # Exact search costs ~0.3 s a query at 1M on one busy core: fewer samples keep the run short.
    exact = factory == "IDMap2,Flat"
    samples = min(len(queries), (200 if index.manifest.passages <= 100_000 else 50) if exact else 500)
    single = latencies(lambda i: index.search_many(queries[i : i + 1], 10), samples)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    batcher = QueryBatcher(PrecomputedQueries(index, queries))
    concurrent = min(len(queries), 256 if exact else len(queries))
    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENT_CALLERS) as pool:
        list(pool.map(lambda i: batcher.search(f"q{i}", 10), range(concurrent)))
    concurrent_qps = concurrent / (time.perf_counter() - started)
    batcher.close()
    return {
        "rows": rows,
        "recall_at_10": round(recall, 4),
        "p50_ms": round(float(np.percentile(single, 50)), 3),
        "p99_ms": round(float(np.percentile(single, 99)), 3),
        "qps_single": round(1000 / float(np.mean(single)), 1),
        "qps_concurrent": round(concurrent_qps, 1),
    }


def measure_hybrid(index: PassageIndex, queries: np.ndarray, questions: list[str], k: int = 3) -> dict:
    """p50 of one search through the Retriever (fusion, cosines of keyword hits) by vector and by hybrid, one
    caller on one core, alternating so that load drifts hit both alike. Query embedding is looked up."""
    embedder = PrecomputedEmbedder(dict(zip(questions, queries, strict=True)))
    retriever = Retriever(embedder, index)  # type: ignore[arg-type]
    faiss.omp_set_num_threads(1)
    samples = min(
        len(questions), 50 if index.manifest.factory == "IDMap2,Flat" and index.manifest.passages > 100_000 else 300
    )
    times: dict[str, list[float]] = {VECTOR: [], HYBRID: []}
    for i in range(samples):
        for mode in (VECTOR, HYBRID) if i % 2 else (HYBRID, VECTOR):
            times[mode].append(timed(lambda m=mode, q=questions[i]: retriever.search_batch([q], k, mode=m)) * 1000)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    p50 = {mode: float(np.percentile(values, 50)) for mode, values in times.items()}
    return {"vector_p50_ms": round(p50[VECTOR], 3), "hybrid_p50_ms": round(p50[HYBRID], 3),
            "hybrid_vs_vector_p50": round(p50[HYBRID] / p50[VECTOR], 3), "k": k}  # fmt: skip


def bench_index_speed(
    report: BenchReport, sizes: list[int], query_count: int, workdir: Path, embedder: Embedder, args: argparse.Namespace
) -> None:
    rng = np.random.default_rng(0)
    base = corpus_vectors(embedder, args.base_articles, (args.var_dir or ROOT / "var") / "bench" / "cache")
    texts = base_texts(args.base_articles)
    _, questions = evaluation_set(args.base_articles)
    query_texts = [q for q, _ in questions[:query_count]]
    queries = embedder.encode(query_texts)  # real questions, embedded for real
    add_sets = add100_sets(embedder, args.base_articles)
    for size in sizes:
        logger.info("index speed at {} vectors: mixing {} real passage vectors", size, len(base))
        vectors, primary = mixture_vectors(base, size, rng)
        exact_rows: np.ndarray | None = None
        for factory, search_params, train_sample in INDEXES.get(size, INDEXES[100_000]):
            if factory.startswith("HNSW") and size > args.hnsw_max:
                logger.info("{} at {} vectors skipped (--hnsw-max {})", factory, size, args.hnsw_max)
                continue
            logger.info("{} vectors, {}: building", size, factory)
            gc.collect()
            folder = workdir / f"n{size}-{len(report.results)}"
            index, build_seconds = build(folder, factory, train_sample, vectors, [texts[i] for i in primary])
            for params in search_params:
                index.set_search_params(params)
                metrics = measure(index, queries, exact_rows, factory)
                rows = metrics.pop("rows")
                if exact_rows is None:
                    exact_rows = rows  # the first configuration is exact search
                # faiss holds in memory the arrays it writes, so the file's size is the index's memory too
                # (RSS deltas were noise here: freed arrays of the previous index are reused).
                megabytes = sum(s.bytes for s in index.manifest.segments) / 2**20
                metrics.update(build_s=round(build_seconds, 1), index_mb=round(megabytes, 1))
                label = f"{factory} {params}".strip()
                system = "exact baseline" if factory == "IDMap2,Flat" else "nightcap"
                params_row = {"vectors": size, "dim": DIMENSION, "data": f"MiniLM mixtures of {len(base)} passages"}
                report.add("index_search", system, label, params_row, metrics)
                logger.info("{}: {}", label, metrics)
            if not factory.startswith("HNSW"):  # hybrid against vector on the default factory and the large one
                hybrid = measure_hybrid(index, queries, query_texts)
                data = {"vectors": size, "data": "MiniLM mixtures, texts of their main passage"}
                report.add("hybrid_search", "nightcap", f"{factory} {search_params[-1]}".strip(), data, hybrid)
                logger.info("hybrid against vector, {} {}: {}", factory, search_params[-1], hybrid)
                short = "flat" if factory == "IDMap2,Flat" else "ivf"
                report.ratio(f"hybrid_vs_vector_p50_{size // 1000}k_{short}", hybrid["hybrid_vs_vector_p50"])
                if size == max(sizes) and short == "ivf":  # the large-index default's
                    report.ratio("hybrid_vs_vector_p50", hybrid["hybrid_vs_vector_p50"])
            if size == max(sizes) and not factory.startswith("HNSW"):
                bench_add100(report, index, factory, search_params[-1], add_sets, embedder, workdir, vectors)
            index.close()
            shutil.rmtree(folder, ignore_errors=True)
        if size == 1_000_000:
            candidates = [r for r in report.results if r["params"].get("vectors") == size and r["system"] == "nightcap"]
            good = [r for r in candidates if r["metrics"]["recall_at_10"] >= 0.95]
            if good:
                chosen = min(good, key=lambda r: r["metrics"]["p50_ms"])
            else:
                chosen = max(candidates, key=lambda r: r["metrics"]["recall_at_10"])
            report.ratio("recall_at_10_1m", chosen["metrics"]["recall_at_10"])
            report.ratio("p50_search_ms_1m", chosen["metrics"]["p50_ms"])
            report.add("large_index_default", "chosen", chosen["model"], {"vectors": size, "rule": "recall@10 >= 0.95, "
                       "then lowest p50"}, dict(chosen["metrics"]))  # fmt: skip
            logger.info("1M headline (the default for large indexes) from {}", chosen["model"])
        del vectors
        gc.collect()


# --- add 100 documents: cost proportional to what a commit adds ----------------------------------------------


def add100_sets(embedder: Embedder, skip: int) -> list[tuple[list, list[Passage], np.ndarray]]:
    """ADD_ROUNDS sets of 100 articles after the ones mixed into the big index: documents, passages, vectors."""
    documents = list(read_wikipedia_summaries(limit=skip + 100 * ADD_ROUNDS))[skip:]
    sets = []
    for number in range(ADD_ROUNDS):
        chosen = documents[number * 100 : (number + 1) * 100]
        passages = [p for d in chosen for p in passages_of(d)]
        sets.append((chosen, passages, embedder.encode([p.text for p in passages])))
    return sets


def trained_empty(folder: Path, factory: str, sample: np.ndarray) -> PassageIndex:
    """An empty index of ``factory`` that is already trained (as the big one is): trained on a sample of the big
    index's vectors, then emptied by deleting everything and compacting (the trained quantizer stays)."""
    settings = IndexSettings(factory=factory)
    create_index(folder, "minilm-mixtures-384", DIMENSION, settings)
    index = load_index(folder, settings, writable=True)
    if factory.startswith("IVF"):
        passages = [Passage(f"t{i}#0", f"t{i}", "", "", "") for i in range(len(sample))]
        index.commit(Change(passages=passages, vectors=sample))
        index.commit(Change(remove_documents=[p.doc_id for p in passages]))
        index.compact()
    return index


def bench_add100(
    report: BenchReport,
    big: PassageIndex,
    factory: str,
    search_params: str,
    add_sets: list,
    embedder: Embedder,
    workdir: Path,
    vectors: np.ndarray,
) -> None:
    """100 articles into the big index and into an empty (trained) one of the same factory, alternating, each
    round new articles: commit only (vectors precomputed) and the whole AddDocuments path (chunk, embed, commit).
    Beside it, what one commit cost before segments (format 2: clone, rewrite and sha256 the whole index), the
    open of the big index, and its compaction. The empty index is trained once and reused: by the last round
    it holds the few hundred passages of the earlier ones. The whole AddDocuments path is measured in the first
    round and for Flat only (embedding is most of it, and slow on a shared machine)."""
    size = big.manifest.passages
    seconds: dict[tuple[str, str], list[float]] = {(w, p): [] for w in ("big", "empty") for p in ("commit", "add")}
    # Training on few points keeps this quick; the commit's cost does not depend on the quantizer's quality.
    empty = trained_empty(workdir / f"empty-{factory.replace(',', '-')}", factory, vectors[:4096])
    empty.set_search_params(search_params)
    for number, (documents, passages, embedded) in enumerate(add_sets):
        order = [("big", big), ("empty", empty)] if number % 2 == 0 else [("empty", empty), ("big", big)]
        for where, index in order:
            change = Change(passages=passages, vectors=embedded)
            seconds[(where, "commit")].append(timed(lambda i=index, c=change: i.commit(c)))
        if number == 0 and factory == "IDMap2,Flat":
            e2e_documents = [type(d)(f"e2e-{d.id}", d.title, d.text, d.source) for d in documents]
            for where, index in order:
                ingestor = Ingestor(embedder, index)
                seconds[(where, "add")].append(timed(lambda g=ingestor, d=e2e_documents: g.add(d)))
    empty.close()
    median = {key: float(np.median(values)) for key, values in seconds.items() if values}
    passages_per_set = round(float(np.mean([len(p) for _, p, _ in add_sets])))
    for where in ("big", "empty"):
        metrics = {"commit_s": round(median[(where, "commit")], 3)}
        if seconds[(where, "add")]:
            metrics["add_documents_s"] = round(median[(where, "add")], 3)
        params = {"index_vectors": size if where == "big" else 0, "documents": 100, "passages": passages_per_set,
                  "rounds": ADD_ROUNDS}  # fmt: skip
        report.add("add100", "nightcap segments", factory, params, metrics)
    name = "add100_at_1m_vs_empty" if factory == "IDMap2,Flat" else f"add100_at_1m_vs_empty_{factory.split(',')[0]}"
    report.ratio(name, median[("big", "commit")] / median[("empty", "commit")])
    if seconds[("big", "add")]:
        report.ratio(name + "_with_embedding", median[("big", "add")] / median[("empty", "add")])
    loaded = faiss.read_index(str(big.folder / big.manifest.segments[0].file))  # as format 2 held it in memory
    old_style = timed(lambda i=loaded: format_2_commit(i, workdir / "format2.faiss"))
    del loaded
    (workdir / "format2.faiss").unlink(missing_ok=True)
    big.close()
    opened = timed(lambda: load_index(big.folder).close())
    reopened = load_index(big.folder, writable=True)
    compacted = reopened.compact()
    reopened.close()
    report.add("commit_cost", "format 2 (before segments): clone + rewrite + sha256 of the whole index", factory,
               {"index_vectors": size}, {"commit_s": round(old_style, 2)})  # fmt: skip
    report.add("open_and_compact", "nightcap segments", factory,
               {"index_vectors": size, "segments_before": compacted.segments_before},
               {"open_s": round(opened, 2), "compact_s": round(compacted.seconds, 1)})  # fmt: skip
    logger.info("add100 at {} ({}): {}; format-2 style commit {:.1f}s", size, factory, median, old_style)


def format_2_commit(loaded: faiss.Index, destination: Path) -> None:
    """What every commit did before segments: clone the loaded index, write it whole, fsync and hash it."""
    faiss.write_index(faiss.clone_index(loaded), str(destination))
    with destination.open("rb") as file:
        os.fsync(file.fileno())
    digest = hashlib.sha256()
    with destination.open("rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)


# --- 2 and 3. ingestion and quality on the default corpus -------------------------------------------------


def question_for(description: str) -> str:
    # "Painting by Georges Seurat" -> "What is the painting by Georges Seurat?"; "NASA mission" stays capitalised.
    keep = len(description) > 1 and description[1].isupper()
    return f"What is the {description if keep else description[0].lower() + description[1:]}?"


def evaluation_set(article_count: int) -> tuple[list, list[tuple[str, str]]]:
    articles = json.loads(default_corpus_path().read_text(encoding="utf-8"))
    documents = list(read_wikipedia_summaries(limit=article_count))
    questions = [
        (question_for(articles[d.id]["description"]), d.title)
        for d in documents
        if articles.get(d.id, {}).get("description", "").strip()
    ]
    return documents, questions


def quality(retriever: Retriever, questions: list[tuple[str, str]], mode: str = VECTOR) -> dict[str, float]:
    ranks = []
    for start in tqdm(range(0, len(questions), 64), desc="evaluating", unit="batch"):
        batch = questions[start : start + 64]
        found = retriever.search_batch([q for q, _ in batch], 30, mode=mode)
        for (_, expected), hits in zip(batch, found, strict=True):
            titles = list(dict.fromkeys(h.passage.title for h in hits))  # rank articles, not passages
            ranks.append(titles.index(expected) + 1 if expected in titles else None)
    return {
        "recall_at_1": round(float(np.mean([r == 1 for r in ranks])), 4),
        "recall_at_5": round(float(np.mean([r is not None and r <= 5 for r in ranks])), 4),
        "mrr_at_10": round(float(np.mean([1 / r if r is not None and r <= 10 else 0 for r in ranks])), 4),
    }


ROUNDS = 8  # the corpus is measured in this many slices, each one through every system, in rotating order


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


class IngestingService:
    """A real retrieval server on port 0 over a new writable index, fed through the client library."""

    def __init__(self, embedder: Embedder, folder: Path) -> None:
        create_index(folder, embedder.name, embedder.dimension)
        self.retriever = Retriever(embedder, load_index(folder, writable=True))
        self.running = start_retrieval_server(self.retriever, "127.0.0.1:0")
        self.client = IndexClient(self.running.address, timeout=3600)

    def add(self, documents: list) -> None:
        self.client.add_documents([ClientDocument(d.id, d.text, d.title, d.source) for d in documents])

    def close(self) -> None:
        self.client.close()
        self.running.stop(grace=None)


class ListedDocuments:
    """The documents a background build reads, in place of the default corpus's selection."""

    def __init__(self, documents: list) -> None:
        self.documents = documents

    def read(self) -> list:
        return self.documents


def background_build(documents: list, embedder: Embedder, folder: Path) -> None:
    """`make up`'s build (retrieval `serve --build-default`) of ``documents`` into a new index, run to its end."""
    create_index(folder, embedder.name, embedder.dimension)
    index = load_index(folder, writable=True)
    try:
        build = BackgroundBuild(Ingestor(embedder, index), ListedDocuments(documents), len(documents))
        build.start()
        build.wait()
        done = build.progress()
        if done.state != COMPLETE or done.documents_done != len(documents):
            raise RuntimeError(f"the background build ended {done.state} at {done.documents_done} documents")
    finally:
        index.close()


def bench_batched_search(report: BenchReport, retriever: Retriever, questions: list[str]) -> None:
    """Concurrent searches with query embedding: the service's batcher against one encode per call."""
    questions = questions[:256]
    rates = {}
    for max_batch in (1, 64):
        batcher = QueryBatcher(retriever, max_batch=max_batch)
        started = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT_CALLERS) as pool:
            list(pool.map(lambda q, b=batcher: b.search(q, 5), questions))
        rates[max_batch] = len(questions) / (time.perf_counter() - started)
        batcher.close()
        system = "one encode per call" if max_batch == 1 else "nightcap QueryBatcher"
        report.add("search_with_embedding", system, "all-MiniLM-L6-v2",
                   {"callers": CONCURRENT_CALLERS, "max_batch": max_batch, "queries": len(questions)},
                   {"qps_concurrent": round(rates[max_batch], 1)})  # fmt: skip
    report.ratio("search_batched_vs_unbatched", rates[64] / rates[1])


def bench_corpus(report: BenchReport, article_count: int, workdir: Path) -> None:
    """Ingestion against bare encode, fp32 and int8, on the same passages, plus the default-index build (the
    path of `make up`: build_index into a new folder, fp32). Other work on a shared machine makes speed drift by
    2x within minutes, so each slice of the corpus goes through all five in rotating order and the totals are
    compared: a slow minute hits every system alike."""
    documents, questions = evaluation_set(article_count)
    passages = {d.id: [p.text for p in passages_of(d)] for d in documents}
    total = sum(len(texts) for texts in passages.values())
    params = {"articles": len(documents), "passages": total, "questions": len(questions)}
    embedders = {quantize: Embedder(quantize=quantize) for quantize in ("none", "int8")}
    services = {q: IngestingService(e, workdir / f"corpus-{q}") for q, e in embedders.items()}
    seconds = {(q, system): 0.0 for q in embedders for system in ("bare", "service")}
    seconds[("none", "build")] = seconds[("none", "background")] = 0.0
    for embedder in embedders.values():
        embedder.encode(passages[documents[0].id])  # warm up
    slices = [documents[i::ROUNDS] for i in range(ROUNDS)]
    for number, part in enumerate(tqdm(slices, desc="ingestion vs bare encode", unit="slice")):
        texts = [text for d in part for text in passages[d.id]]
        steps = [
            (q, system, (lambda m=e._model, t=texts: m.encode(t, batch_size=32))  # plain encode, batch 32
             if system == "bare" else (lambda s=services[q], p=part: s.add(p)))
            for q, e in embedders.items() for system in ("bare", "service")
        ]  # fmt: skip
        steps.append(("none", "build", lambda p=part, n=number: build_index(
            p, embedders["none"], workdir / f"build-{n}", progress=False)))  # fmt: skip
        steps.append(("none", "background", lambda p=part, n=number: background_build(
            p, embedders["none"], workdir / f"background-{n}")))  # fmt: skip
        turn = number % len(steps)
        for q, system, action in steps[turn:] + steps[:turn]:
            seconds[(q, system)] += timed(action)
    rates = {key: total / value for key, value in seconds.items()}
    for q in embedders:
        name = "all-MiniLM-L6-v2" + ("" if q == "none" else " int8")
        report.add("encode", "bare SentenceTransformer.encode", name, params,
                   {"passages_per_s": round(rates[(q, "bare")], 1)})  # fmt: skip
        found = quality(services[q].retriever, questions)
        report.add("ingest", "nightcap AddDocuments", name, params,
                   {"passages_per_s": round(rates[(q, "service")], 1), **found})  # fmt: skip
    hybrid = quality(services["none"].retriever, questions, HYBRID)
    report.add("quality", "nightcap hybrid search", "all-MiniLM-L6-v2 + tantivy bm25", params, hybrid)
    report.add("build", "nightcap build-index (one offline build)", "all-MiniLM-L6-v2", params,
               {"passages_per_s": round(rates[("none", "build")], 1)})  # fmt: skip
    report.add("build", "nightcap background build (make up: serve --build-default)", "all-MiniLM-L6-v2", params,
               {"passages_per_s": round(rates[("none", "background")], 1)})  # fmt: skip
    report.ratio("ingest_vs_encode", rates[("none", "service")] / rates[("none", "bare")])
    report.ratio("build_vs_encode", rates[("none", "build")] / rates[("none", "bare")])
    report.ratio("background_build_vs_encode", rates[("none", "background")] / rates[("none", "bare")])
    report.ratio("ingest_int8_vs_fp32", rates[("int8", "service")] / rates[("none", "service")])
    bench_batched_search(report, services["none"].retriever, [q for q, _ in questions])
    for service in services.values():
        service.close()
        service.retriever.index.close()


# --- 4. the keyword index against the vectors, on the whole default corpus ------------------------------------

EMBED_SAMPLE = 512  # passages embedded to time the vector build (all of them take minutes here)


def bench_keyword_index(report: BenchReport, workdir: Path, embedder: Embedder) -> None:
    """Stages every passage of the default corpus (one SQLite transaction, then the keyword index), as a
    background build does before it embeds; the keyword index's size is that of its folder."""
    passages = [p for d in read_wikipedia_summaries() for p in passages_of(d)]
    (workdir / "keywords").mkdir()
    store = PassageStore.open(workdir / "keywords" / "keywords.sqlite")
    keyword_seconds = timed(lambda: store.stage(passages))
    store.close()
    on_disk = workdir / "keywords" / WORDS_FOLDER
    keyword_bytes = sum(f.stat().st_size for f in on_disk.iterdir() if f.is_file())
    sample = [p.text for p in passages[:: max(1, len(passages) // EMBED_SAMPLE)]][:EMBED_SAMPLE]
    embedder.encode(sample[:32])  # warm up
    vector_seconds = timed(lambda: embedder.encode(sample)) * len(passages) / len(sample)
    vector_bytes = len(passages) * embedder.dimension * 4  # IDMap2,Flat: the float32 vectors, plus 8 bytes an id
    params = {"passages": len(passages), "documents": len({p.doc_id for p in passages})}
    report.add("keyword_index", "nightcap tantivy (stage every passage)", "simple, ascii-folded, English stems", params,
               {"build_s": round(keyword_seconds, 2), "index_mb": round(keyword_bytes / 2**20, 1)})  # fmt: skip
    report.add("keyword_index", "vector build (all-MiniLM-L6-v2, extrapolated from a sample)", "IDMap2,Flat",
               {**params, "sample": len(sample)},
               {"build_s": round(vector_seconds, 1), "index_mb": round(vector_bytes / 2**20, 1)})  # fmt: skip
    report.ratio("keyword_vs_vector_build_time", keyword_seconds / vector_seconds)
    report.ratio("keyword_vs_vector_index_size", keyword_bytes / vector_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="index sizes to measure, comma-separated")
    parser.add_argument("--queries", type=int, default=1000, help="queries per index measurement")
    parser.add_argument("--articles", type=int, default=1000, help="default-corpus articles for parts 2 and 3")
    parser.add_argument(
        "--base-articles",
        type=int,
        default=3000,
        help="articles whose real MiniLM passage vectors are mixed into the large sets",
    )
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest size at which HNSW is built")
    parser.add_argument("--skip-index", action="store_true", help="skip part 1 (index speed and add100)")
    parser.add_argument("--skip-corpus", action="store_true", help="skip parts 2 and 3 (ingestion and quality)")
    parser.add_argument("--skip-keywords", action="store_true", help="skip part 4 (the keyword index)")
    parser.add_argument("--var-dir", type=Path, default=None, help="runtime folder (default $NIGHTCAP_VAR or var/)")
    args = parser.parse_args()
    report = BenchReport("retrieval")
    started = time.perf_counter()
    logger.info("load before the run: {}", os.getloadavg())
    try:
        with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as workdir:
            if not args.skip_keywords:
                bench_keyword_index(report, Path(workdir), Embedder())
            if not args.skip_corpus:
                bench_corpus(report, args.articles, Path(workdir))
            if not args.skip_index:
                sizes = [int(s) for s in args.sizes.split(",")]
                bench_index_speed(report, sizes, args.queries, Path(workdir), Embedder(), args)
    finally:  # what was measured is kept even if a later part fails
        report.add(
            "machine_load",
            "os.getloadavg",
            "after the run",
            {},
            dict(zip(("load_1m", "load_5m", "load_15m"), os.getloadavg(), strict=True)),
        )
        logger.info("benchmark took {:.0f}s", time.perf_counter() - started)
        report.write(args.var_dir)


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
