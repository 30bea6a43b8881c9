"""Index-build embedding settings: which make the default index build fastest while keeping retrieval quality.
Writes var/bench/index_build.json (tests/bench/report.py) and prints a table.

    python tests/bench/bench_index_build.py [--articles 1000 | --all] [--rounds 2]
    python tests/bench/bench_index_build.py --articles 50 --rounds 1 --batch-sizes 32 --orders sorted --threads 2

Every configuration embeds the same passages (the default corpus chunked as the default index is: the question
set's articles plus the corpus's first --articles) in one full pass. A configuration is the embedder's
quantization (none or int8), the batch size, the batch order (length-sorted, as Ingestor.embed does, or corpus
order) and torch's thread count. Each encode call holds one batch, as Ingestor.embed's calls do (its ENCODE_CALL
passages each): sentence-transformers sorts by length only within a call, so corpus order pads each batch to its
longest passage. The baseline is what the default build runs today: fp32, batch 32, sorted, torch's default
thread count.

Speed: passages/s of the pass (wall time, after one warm-up encode of a batch under the same settings). Rounds
are interleaved in time (every configuration, then every configuration again) so that load from other work on
the machine hits all of them alike; the median over rounds is reported, with the speedup over the baseline.

Quality, from each configuration's first-round vectors: a faiss IndexFlatIP over them, the questions of
tests/eval/questions.json embedded with the same configuration, and source recall@1 and @3 (the question's
article has a passage among the first k) for single questions, opening turns and follow-ups. Every turn goes
through the orchestrator's own query building and fusion (`recent`: the follow-up weighs 1.0 and the opening
0.6, scores summed), with this flat index standing in for the retrieval service. Beside it, the vectors' mean
cosine with the baseline's and, for int8, with fp32's under the same batch, order and threads.

`--runtimes onnxruntime,openvino` adds the same model exported to ONNX (torch.onnx, cached under
var/bench/cache/) and run by ONNX Runtime (fp32, and int8 by its dynamic quantization) or OpenVINO (fp32), with
the tokenizer, mean pooling and normalization of sentence-transformers around it. Neither is a nightcap
dependency; install them first (`.venv/bin/pip install onnx onnxruntime openvino`). sentence-transformers'
own ONNX and OpenVINO backends need optimum-onnx or optimum-intel, which pin transformers below what nightcap
runs (optimum-onnx 0.1.0: transformers < 4.58; optimum-intel 2.2.0 would replace torch with a CUDA build).

The chosen configuration is the fastest of those whose recall@3 on every set is at least the baseline's - 0.01
and whose vectors were complete and finite in every round.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from loguru import logger
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "bench"), str(ROOT / "tests" / "eval")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from report import BenchReport  # noqa: E402
from run_eval import NOT_GENERATED, QUESTIONS, rank_of  # noqa: E402

from nightcap.records import DEFAULT_K  # noqa: E402
from nightcap.records import Passage as FoundPassage  # noqa: E402
from services.orchestrator.backends import Found  # noqa: E402
from services.orchestrator.conversation import ChatOrchestrator, QueryMode, TurnRequest  # noqa: E402
from services.orchestrator.prompts import Turn  # noqa: E402
from services.retrieval.build import DEFAULT_CHUNKING  # noqa: E402
from services.retrieval.chunker import Passage, passages_of  # noqa: E402
from services.retrieval.corpus import read_wikipedia_summaries  # noqa: E402
from services.retrieval.embedder import QUANTIZATIONS, Embedder  # noqa: E402
from services.retrieval.ingest import BATCH_SIZE, ENCODE_CALL  # noqa: E402

K = DEFAULT_K  # passages per chat turn (3); recall@1 is read off the same ranking
RECALL_TOLERANCE = 0.01  # 60 single questions and 40 conversations: one question lost is already 0.017-0.025
ORDERS = ("sorted", "corpus")
SETS = ("single", "opening", "followup")
DEFAULT_THREADS = torch.get_num_threads()  # read before this script changes it


RUNTIMES = ("torch", "onnxruntime", "openvino")


@dataclass(frozen=True)
class EmbedConfig:
    quantize: str
    batch_size: int
    order: str  # "sorted" (shortest first, as Ingestor.embed) or "corpus"
    threads: int
    runtime: str = "torch"  # what runs the model: sentence-transformers' torch, or an ONNX export of it

    @property
    def label(self) -> str:
        runtime = "" if self.runtime == "torch" else f" {self.runtime}"
        return f"{self.quantize}{runtime} b{self.batch_size} {self.order} t{self.threads}"


class ExportedEmbedder:
    """The embedder's transformer exported to ONNX and run by ONNX Runtime or OpenVINO: the same tokenizer, mean
    pooling and normalization around it, so its vectors compare with the torch embedder's. Threads are fixed at
    load (``threads``), where torch's are set per pass."""

    def __init__(self, torch_embedder: Embedder, runtime: str, quantize: str, threads: int, cache: Path) -> None:
        if torch_embedder.pooling != "mean" or not torch_embedder.normalize:
            raise SystemExit(
                f"--runtimes: only a mean-pooled, normalized embedder (this one: {torch_embedder.pooling})"
            )
        model = torch_embedder._model
        self.tokenizer, self.max_length = model.tokenizer, model.max_seq_length
        self.dimension = torch_embedder.dimension
        self.inputs = list(self.tokenizer(["a"], return_tensors="pt").keys())
        path = export_onnx(model[0].auto_model, self.tokenizer, self.inputs, cache)
        if quantize == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantized = path.with_name("model-int8.onnx")
            if not quantized.exists():
                quantize_dynamic(path, quantized, weight_type=QuantType.QInt8)
            path = quantized
        if runtime == "onnxruntime":
            import onnxruntime

            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            self._run = lambda feeds: session.run(None, feeds)[0]
        else:
            import openvino

            core = openvino.Core()
            compiled = core.compile_model(core.read_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads})
            self._run = lambda feeds: compiled(feeds)[0]

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start : start + batch_size])
            encoded = self.tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
            )
            hidden = self._run({name: encoded[name].astype(np.int64) for name in self.inputs})
            mask = encoded["attention_mask"][..., None].astype(np.float32)
            pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
            out.append(pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12))
        return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def export_onnx(transformer: torch.nn.Module, tokenizer: Any, inputs: list[str], cache: Path) -> Path:
    """The transformer as ONNX (its last hidden state, batch and length dynamic), exported once into ``cache``."""
    path = cache / "embedder-onnx" / "model.onnx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)

    class LastHidden(torch.nn.Module):  # keyword arguments: transformers 5 moved forward()'s positional order
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.transformer(**dict(zip(inputs, tensors, strict=True))).last_hidden_state

    example = tokenizer(["an example"], return_tensors="pt")
    axes = {name: {0: "batch", 1: "length"} for name in [*inputs, "last_hidden_state"]}
    arguments = tuple(example[name] for name in inputs)
    torch.onnx.export(LastHidden().eval(), arguments, str(path), input_names=inputs, output_names=["last_hidden_state"],
                      dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    return path


BASELINE = EmbedConfig("none", BATCH_SIZE, "sorted", DEFAULT_THREADS)


@dataclass
class Measured:
    config: EmbedConfig
    seconds: list[float]
    valid_rounds: int = 0
    quality: dict[str, float] | None = None
    agreement: dict[str, float] | None = None


# --- the passages and the questions ----------------------------------------------------------------------


def corpus_passages(article_count: int | None, sources: Sequence[str]) -> tuple[int, list[Passage]]:
    """(articles, their passages) as the default index chunks them: the first ``article_count`` articles plus
    the questions' sources, or the whole corpus when ``article_count`` is None."""
    documents = list(read_wikipedia_summaries(limit=article_count, titles=sources if article_count else ()))
    missing = set(sources) - {d.title for d in documents}
    if missing:
        raise SystemExit(f"{len(missing)} question sources have no passages in the corpus: {sorted(missing)[:5]}")
    passages = [p for d in documents for p in passages_of(d, DEFAULT_CHUNKING.sentences, DEFAULT_CHUNKING.overlap)]
    return len(documents), passages


def question_turns(questions: dict[str, Any]) -> dict[str, list[tuple[TurnRequest, str]]]:
    """Per set, each turn as the orchestrator receives it (the follow-up with its opening as history), and its
    source article. The opening's answer is a placeholder: `recent` reads only the user turns."""
    turns: dict[str, list[tuple[TurnRequest, str]]] = {name: [] for name in SETS}
    for item in questions["single"]:
        turns["single"].append((TurnRequest(item["question"]), item["source"]))
    for conversation in questions["conversations"]:
        opening, follow_up = (turn["question"] for turn in conversation["turns"])
        history = [Turn("user", opening), Turn("assistant", NOT_GENERATED)]
        turns["opening"].append((TurnRequest(opening), conversation["source"]))
        turns["followup"].append((TurnRequest(follow_up, history), conversation["source"]))
    return turns


# --- one configuration's pass ------------------------------------------------------------------------------


def encode_calls(texts: Sequence[str], config: EmbedConfig) -> list[list[int]]:
    """The passages' positions, one encode call (one batch) each, in the order the configuration embeds them."""
    order = list(range(len(texts)))
    if config.order == "sorted":
        order.sort(key=lambda i: len(texts[i]))  # as Ingestor.embed sorts: by characters, shortest first
    return [order[start : start + config.batch_size] for start in range(0, len(order), config.batch_size)]


def embed_pass(embedder: Embedder, texts: Sequence[str], config: EmbedConfig) -> tuple[float, np.ndarray]:
    """Seconds of one full pass and its vectors, in the passages' order. Sets torch's thread count, which is
    process-wide, before the warm-up; rows never written stay NaN, so check_vectors sees them."""
    torch.set_num_threads(config.threads)
    calls = encode_calls(texts, config)
    embedder.encode([texts[i] for i in calls[0]], config.batch_size)  # warm-up: one batch, same settings
    vectors = np.full((len(texts), embedder.dimension), np.nan, dtype=np.float32)
    started = time.perf_counter()
    for picked in calls:
        vectors[picked] = embedder.encode([texts[i] for i in picked], config.batch_size)
    return time.perf_counter() - started, vectors


def check_vectors(vectors: np.ndarray, count: int, dimension: int) -> bool:
    return vectors.shape == (count, dimension) and bool(np.isfinite(vectors).all())


def mean_cosine(vectors: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean, min) over passages of the cosine between a passage's two vectors."""
    dots = np.einsum("ij,ij->i", vectors, reference)
    cosines = dots / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(reference, axis=1))
    return float(cosines.mean()), float(cosines.min())


# --- quality ---------------------------------------------------------------------------------------------


class FlatSearch:
    """The retrieval backend the orchestrator calls, over one configuration's passage vectors: exact inner
    product (the vectors are normalized: cosine), queries looked up among vectors embedded beforehand."""

    def __init__(self, passages: Sequence[Passage], vectors: np.ndarray, queries: dict[str, np.ndarray]) -> None:
        self.passages, self.queries = passages, queries
        self.index = faiss.IndexFlatIP(vectors.shape[1])
        self.index.add(vectors)

    def search(self, query: str, k: int, timeout: float, title: str = "", mixed: bool = False) -> Found:
        # no title lookup: it finds the same passages whatever the embedder, and this compares embedders
        scores, rows = self.index.search(self.queries[query][None, :], k)
        hits = [(self.passages[row], float(score)) for row, score in zip(rows[0], scores[0], strict=True) if row >= 0]
        return Found([FoundPassage(p.id, p.text, p.title, p.source, score) for p, score in hits])


def source_recall(
    embedder: Embedder,
    config: EmbedConfig,
    passages: Sequence[Passage],
    vectors: np.ndarray,
    turns: dict[str, list[tuple[TurnRequest, str]]],
) -> dict[str, float]:
    """Recall@1 and @K per set. The orchestrator builds each turn's searches and fuses their results itself
    (its private _query and _retrieve: the code a chat turn runs, not a copy of it); only the search is ours."""
    asked = [r for requests in turns.values() for r, _ in requests]
    texts = list(
        dict.fromkeys([r.message for r in asked] + [t.content for r in asked for t in r.history if t.role == "user"])
    )
    queries = dict(zip(texts, embedder.encode(texts, config.batch_size), strict=True))
    orchestrator = ChatOrchestrator(None, FlatSearch(passages, vectors, queries), query_mode=QueryMode.RECENT)
    metrics = {}
    for name, requests in turns.items():
        ranks = []
        for request, source in requests:
            _, searches = orchestrator._query(request, None, None)  # `recent` reads neither model info nor format
            ranked = orchestrator._retrieve(searches, K).passages
            ranks.append(rank_of(source, [p.id for p in ranked], K))
        metrics[f"{name}_recall_at_1"] = round(float(np.mean([r == 1 for r in ranks])), 4)
        metrics[f"{name}_recall_at_{K}"] = round(float(np.mean([r is not None for r in ranks])), 4)
    return metrics


# --- the run ---------------------------------------------------------------------------------------------


def configurations(args: argparse.Namespace) -> list[EmbedConfig]:
    """Every combination asked for, the baseline first (whether asked for or not) and each int8 configuration
    right after its fp32 twin, so that only that twin's vectors need be kept for the comparison."""
    quantizations = sorted(args.quantize, key=QUANTIZATIONS.index)  # fp32 before int8
    grid = [
        EmbedConfig(quantize, batch, order, threads, runtime)
        for runtime, batch, order, threads, quantize in itertools.product(
            args.runtimes, args.batch_sizes, args.orders, args.threads, quantizations
        )
        if not (runtime == "openvino" and quantize == "int8")  # OpenVINO's int8 needs nncf: not measured
    ]
    baseline_pair = [BASELINE, replace(BASELINE, quantize="int8")] if "int8" in args.quantize else [BASELINE]
    return baseline_pair + [c for c in grid if c not in baseline_pair]


def keeps_recall(m: Measured, base: Measured) -> bool:
    """Complete, finite vectors every round, and recall@K of every set at least the baseline's - tolerance."""
    if m.quality is None or base.quality is None or m.valid_rounds < len(m.seconds):
        return False
    at_k = f"recall_at_{K}"
    return all(m.quality[f"{s}_{at_k}"] >= base.quality[f"{s}_{at_k}"] - RECALL_TOLERANCE for s in SETS)


def status(m: Measured, chosen: Measured, base: Measured) -> str:
    if m.valid_rounds < len(m.seconds):
        return "bad vectors"
    marks = ["baseline"] if m is base else []
    if m is chosen:
        marks.append("fastest kept recall")
    elif m is not base:
        marks.append("kept recall" if keeps_recall(m, base) else "lost recall")
    return ", ".join(marks)


def run(args: argparse.Namespace, report: BenchReport) -> bool:
    """Measures every configuration and adds their rows; False when a configuration's vectors were bad."""
    questions = json.loads(args.questions.read_text(encoding="utf-8"))
    turns = question_turns(questions)
    sources = list(dict.fromkeys(source for requests in turns.values() for _, source in requests))
    articles, passages = corpus_passages(None if args.all else args.articles, sources)
    texts = [p.text for p in passages]
    configs = configurations(args)
    if ENCODE_CALL != BATCH_SIZE:
        logger.warning(
            "Ingestor.embed calls encode with {} passages at batch {}: the baseline here uses {} per call",
            ENCODE_CALL,
            BATCH_SIZE,
            BATCH_SIZE,
        )
    logger.info(
        "{} passages of {} articles, {} configurations x {} rounds", len(texts), articles, len(configs), args.rounds
    )
    torch_embedders = {q: Embedder(quantize=q) for q in dict.fromkeys(c.quantize for c in configs)}
    torch_embedders.setdefault("none", Embedder())
    cache = Path(args.var_dir or os.environ.get("NIGHTCAP_VAR") or "var") / "bench" / "cache"
    embedders = {
        c: torch_embedders[c.quantize]
        if c.runtime == "torch"
        else ExportedEmbedder(torch_embedders["none"], c.runtime, c.quantize, c.threads, cache)
        for c in configs
    }
    measured = {c: Measured(c, []) for c in configs}
    baseline_vectors: np.ndarray | None = None
    fp32_twin: dict[EmbedConfig, np.ndarray] = {}
    try:
        with tqdm(total=args.rounds * len(configs), desc="passes", unit="pass") as bar:
            for number in range(args.rounds):
                for config in configs:
                    seconds, vectors = embed_pass(embedders[config], texts, config)
                    m = measured[config]
                    m.seconds.append(seconds)
                    valid = check_vectors(vectors, len(texts), embedders[config].dimension)
                    m.valid_rounds += valid
                    if not valid:
                        logger.error("{} round {}: vectors missing or not finite", config.label, number + 1)
                    if number == 0 and valid:  # quality and agreement, untimed, from the first round
                        m.quality = source_recall(embedders[config], config, passages, vectors, turns)
                        if baseline_vectors is None:
                            baseline_vectors = vectors
                        mean, least = mean_cosine(vectors, baseline_vectors)
                        m.agreement = {"cosine_vs_baseline": round(mean, 5), "cosine_vs_baseline_min": round(least, 4)}
                        twin = fp32_twin.pop(replace(config, quantize="none"), None)
                        if config.quantize == "int8" and twin is not None:
                            m.agreement["cosine_vs_fp32"] = round(mean_cosine(vectors, twin)[0], 5)
                        if config.quantize == "none" and "int8" in args.quantize:
                            fp32_twin[config] = vectors
                    logger.info("{} round {}: {:.1f} passages/s", config.label, number + 1, len(texts) / seconds)
                    bar.update()
    finally:
        torch.set_num_threads(DEFAULT_THREADS)
    results = list(measured.values())
    base = results[0]
    if base.quality is None:
        raise SystemExit("the baseline's vectors were bad: nothing to compare against")
    rate = {m.config: statistics.median(len(texts) / s for s in m.seconds) for m in results}
    chosen = max([m for m in results if keeps_recall(m, base)] or [base], key=lambda m: rate[m.config])
    for m in results:
        params = {
            "quantize": m.config.quantize,
            "batch": m.config.batch_size,
            "order": m.config.order,
            "threads": m.config.threads,
            "runtime": m.config.runtime,
            "passages": len(texts),
        }
        metrics = {
            "passages_per_s": round(rate[m.config], 1),
            "speedup_vs_baseline": round(rate[m.config] / rate[base.config], 3),
            "valid_rounds": m.valid_rounds,
            **(m.quality or {}),
            **(m.agreement or {}),
        }
        report.add("embed_pass", status(m, chosen, base), m.config.label, params, metrics)
    rule = f"fastest with recall@{K} >= baseline-{RECALL_TOLERANCE} on each set"
    report.add(
        "index_build_default",
        "chosen",
        chosen.config.label,
        {"articles": articles, "passages": len(texts), "rounds": args.rounds, "rule": rule},
        {
            "passages_per_s": round(rate[chosen.config], 1),
            "speedup_vs_baseline": round(rate[chosen.config] / rate[base.config], 3),
        },
    )
    report.ratio("chosen_vs_baseline_passages_per_s", rate[chosen.config] / rate[base.config])
    int8_base = measured.get(replace(BASELINE, quantize="int8"))
    if int8_base is not None and int8_base.agreement and "cosine_vs_fp32" in int8_base.agreement:
        report.ratio("int8_vs_fp32_mean_cosine", int8_base.agreement["cosine_vs_fp32"])
    return all(m.valid_rounds == args.rounds for m in results)


def comma_list(kind: Callable[[str], Any], allowed: Sequence[Any] = ()) -> Callable[[str], list[Any]]:
    """An argparse type: "32,64" -> [32, 64], each value among ``allowed`` when given."""

    def parse(text: str) -> list[Any]:
        values = list(dict.fromkeys(kind(part) for part in text.split(",") if part.strip()))
        if not values or (allowed and not set(values) <= set(allowed)):
            choices = f" of {', '.join(map(str, allowed))}" if allowed else ""
            raise argparse.ArgumentTypeError(f"expected a comma-separated list{choices}, got {text!r}")
        return values

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--articles",
        type=int,
        default=1000,
        help="the corpus's first N articles, beside the question set's own (default 1000)",
    )
    parser.add_argument("--all", action="store_true", help="every article of the corpus (overrides --articles)")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per configuration, interleaved (default 2)")
    parser.add_argument(
        "--quantize",
        type=comma_list(str, QUANTIZATIONS),
        default=list(QUANTIZATIONS),
        help="embedder quantizations to compare (default none,int8)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=comma_list(int),
        default=[32, 64, 128],
        help="batch sizes to compare, one batch per encode call (default 32,64,128)",
    )
    parser.add_argument(
        "--orders",
        type=comma_list(str, ORDERS),
        default=list(ORDERS),
        help="batch orders: sorted (shortest first, as Ingestor.embed) and/or corpus",
    )
    parser.add_argument(
        "--threads",
        type=comma_list(int),
        default=[1, 2],
        help=f"torch thread counts to compare (default 1,2; torch's default here: {DEFAULT_THREADS})",
    )
    parser.add_argument(
        "--runtimes",
        type=comma_list(str, RUNTIMES),
        default=["torch"],
        help="what runs the model: torch (sentence-transformers), onnxruntime and/or openvino (an ONNX export;"
        " pip install onnx onnxruntime openvino first; openvino fp32 only)",
    )
    parser.add_argument("--questions", type=Path, default=QUESTIONS, help="the question set (tests/eval)")
    parser.add_argument("--var-dir", type=Path, default=None, help="runtime folder (default $NIGHTCAP_VAR or var/)")
    args = parser.parse_args()
    if args.rounds < 1 or args.articles < 1 or min(args.batch_sizes) < 1 or min(args.threads) < 1:
        parser.error("--rounds, --articles, --batch-sizes and --threads must be positive")
    report = BenchReport("index_build")
    started = time.perf_counter()
    logger.info("load before the run: {}", os.getloadavg())
    valid = False
    try:
        valid = run(args, report)
    finally:  # what was measured is kept even if a later part fails
        report.add(
            "machine_load",
            "os.getloadavg",
            "after the run",
            {},
            dict(zip(("load_1m", "load_5m", "load_15m"), os.getloadavg(), strict=True)),
        )
        logger.info("benchmark took {:.0f}s", time.perf_counter() - started)
        if report.results[:-1]:
            report.write(args.var_dir)
    if not valid:
        raise SystemExit("some configuration produced missing or non-finite vectors (valid_rounds < rounds)")


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    main()
