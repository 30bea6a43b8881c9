"""Generation throughput and latency: nightcap against the two ways transformers serves in-process.

For each model and each concurrency N (same 32-token prompts, 64 new tokens with ignore_eos, greedy):
  sequential    model.generate one request at a time (how OpenChatKit's bot.py serves); its rate does
                not depend on N, so it is measured once per model over 8 requests, half before and half
                after the others
  static-batch  model.generate on one batch of N prompts (the best this hardware does at that size)
  nightcap      the generation service over gRPC (a subprocess), N concurrent streaming clients
  transformers-generate_batch   transformers' continuous batching, in process (Llama only; N = 16)

Mixed traffic (``mixed_n64_vs_static_batch``): 64 requests asking for 16-256 new tokens (drawn with a
fixed seed) arrive over 3 s; the static batch gets them all at once (a head start) and must run to its
longest member; tokens/s counts only the tokens each request asked for.

Prefix cache (``turn10_ttft_cache_vs_off``, ``shared_prefix_tokens_per_s_vs_off``): the same server with
its prefix cache (on by default) and with ``--prefix-cache-bytes 0``, in turns: the 10th turn's time to
first token in a 10-turn conversation (each turn re-sends the whole conversation plus three passages and
a question, as the orchestrator does), and 64 requests sharing one 1024-token system prompt. The other
workloads draw new prompts each round, so the cache never hits there and they measure its cost.

Faster decode step (``decode_step_vs_eager_n1``, ``_n16``, CPU only): the float32 eager step against
``--quantize int8`` (int8 weights, bfloat16 activations), one stream's decode rate and 16 streams' rate;
``llamacpp_vs_transformers_n1``, ``_n16``: the default model's Q4_1 GGUF under ``--runner llamacpp`` against
the same eager step (transformers on the weights de-quantized from that file).

Prefix cache at rest (``decode_beside_full_cache_vs_empty``, llama.cpp runner, in process): one stream's
decode rate beside a prefix cache filled with 34k tokens against beside an empty one, in turns (the
llama.cpp runner keeps cached prefixes in host memory, so 1.0 means a full cache costs decode nothing).

Scaling at N=16 (``tp2_vs_tp1``, ``replicas2_vs_1``): one server, the same model over 2
tensor-parallel ranks (one torch thread each), and two 1-thread replicas behind one plain gRPC channel
with round_robin over both addresses.

Memory (``tp2_rank_rss_vs_tp1``): the largest rank's resident memory over the 1-shard server's, each
measured after one request, for the pythia-160m shape and the RedPajama-3B shape (bfloat16).

Fairness: every system is warmed alike, systems take turns (interleaved in time, so load drift on a
shared machine hits all alike) for ``--rounds`` rounds, and a ratio is the median of the rounds' ratios
(back-to-back runs on this VM differ by up to 25%); every run is checked to have produced the tokens it
asked for, and a streamed message carrying several tokens counts as one inter-token gap, not several
zero ones.

    python tests/bench/bench_generation.py [--concurrency 1 4 16 64] [--models pythia-160m-shape smollm2-135m]

Writes var/bench/generation.json (tests/bench/report.py) and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from report import BenchReport
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.generation.streamers import BaseStreamer

from clients.client import check_health
from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.common.paths import VarLayout
from services.common.registry import ModelRegistry
from services.common.server import free_port
from services.generation.loading import DEFAULT_MODEL, default_gguf_path, prepare_default

PROMPT_TOKENS = 32
NEW_TOKENS = 64
SEQUENTIAL_REQUESTS = 8
MIXED_REQUESTS = 64
MIXED_NEW_TOKENS = (16, 256)
MIXED_ARRIVAL_S = 3.0
SCALING_CONCURRENCY = 16
CONVERSATION_TURNS = 10
CONVERSATION_SYSTEM_TOKENS = 32
CONVERSATION_TURN_TOKENS = 3 * 60 + 16  # three passages and a question
CONVERSATION_ANSWER_TOKENS = 16
SHARED_PREFIX_REQUESTS = 64
SHARED_PREFIX_TOKENS = 1024
CACHE_FILL_TOKENS = 34_000  # beside this many cached tokens one stream decoded at 40 tokens/s, not 86, in the pool
CACHE_DECODE_TOKENS = 128
ROOT = Path(__file__).resolve().parents[2]
DEVICE = torch.device("cpu")  # --device; the in-process baselines run there, the servers get the same flags
DTYPE = torch.float32


@dataclass
class Timings:
    """One request's clock: when it was sent and when each message of tokens arrived."""

    sent: float
    tokens: list[float] = field(default_factory=list)  # one arrival time per token
    messages: list[float] = field(default_factory=list)  # one per message (or generate step)

    def arrived(self, now: float, count: int) -> None:
        if count:
            self.tokens.extend([now] * count)
            self.messages.append(now)

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        """Gaps between messages: tokens that came together are one gap, not zero-length ones."""
        return [b - a for a, b in zip(self.messages, self.messages[1:], strict=False)]


class TokenClock(BaseStreamer):
    """Records when model.generate produces each step (its first put() is the prompt)."""

    def __init__(self, rows: int) -> None:
        self.rows, self.calls = rows, 0
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def summarise(timings: list[Timings], started: float, finished: float) -> dict[str, float]:
    tokens = sum(len(t.tokens) for t in timings)
    ttfts = sorted(t.ttft for t in timings)
    gaps = sorted(g for t in timings for g in t.gaps)
    return {
        "tokens_per_s": tokens / (finished - started),
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "itl_p50_ms": 1000 * percentile(gaps, 50),
        "itl_p99_ms": 1000 * percentile(gaps, 99),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[max(0, min(98, int(q) - 1))]


def prompts(count: int, vocab: int, seed: int = 0, length: int = PROMPT_TOKENS) -> list[list[int]]:
    """Random prompts; each round draws new ones (``seed``), so nightcap's prefix cache (on by default)
    never holds them: these workloads measure the engine without hits, and the cache's own cost."""
    rng = random.Random(seed)
    return [[rng.randrange(100, min(vocab, 20_000)) for _ in range(length)] for _ in range(count)]


@torch.inference_mode()
def run_sequential(model, batch: list[list[int]]) -> list[Timings]:
    timings = []
    for prompt in batch:
        clock = TokenClock(1)
        sent = time.perf_counter()
        output = model.generate(
            torch.tensor([prompt], device=DEVICE), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, streamer=clock, pad_token_id=0,
        )  # fmt: skip
        assert output.shape[1] == len(prompt) + NEW_TOKENS, "sequential generate stopped short"
        timings.append(Timings(sent, clock.times, clock.times))
    return timings


def sequential_rate(timings: list[Timings]) -> dict[str, float]:
    """Requests ran one after another (in two halves, apart in time): tokens over the time spent in them."""
    busy = sum(t.tokens[-1] - t.sent for t in timings)
    metrics = summarise(timings, 0.0, busy)
    return metrics


@torch.inference_mode()
def run_static_batch(model, batch: list[list[int]], new_tokens: int = NEW_TOKENS) -> tuple[float, list[float]]:
    """One generate call for the whole batch; returns its start time and the time of each step."""
    clock = TokenClock(len(batch))
    started = time.perf_counter()
    output = model.generate(
        torch.tensor(batch, device=DEVICE),
        attention_mask=torch.ones(len(batch), len(batch[0]), dtype=torch.long, device=DEVICE),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=clock, pad_token_id=0,
    )  # fmt: skip
    assert output.shape == (len(batch), len(batch[0]) + new_tokens), "the static batch stopped short"
    return started, clock.times


def static_batch_metrics(model, batch: list[list[int]]) -> dict[str, float]:
    started, times = run_static_batch(model, batch)
    return summarise([Timings(started, times, times) for _ in batch], started, times[-1])


@torch.inference_mode()
def run_transformers_continuous_batching(model, batch: list[list[int]]) -> dict[str, float]:
    """transformers' own continuous batching manager (Llama only: it fails for GPT-NeoX in 5.24)."""
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=batch, generation_config=config, progress_bar=False)
    finished = time.perf_counter()
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return {"tokens_per_s": tokens / (finished - started)}


def stream_requests(
    target: str, batch: list[list[int]], new_tokens: list[int], delays: list[float] | None = None, **options
) -> list[Timings]:
    """One client thread per request over one channel to ``target``; request i is sent ``delays[i]`` s
    after the start (all at once without delays). Checks each got exactly the tokens it asked for."""
    timings = [Timings(0.0) for _ in batch]
    barrier = threading.Barrier(len(batch))
    errors: list[BaseException] = []

    def client(row: int, channel: grpc.Channel) -> None:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=batch[row]),
            params=common_pb2.SamplingParams(max_new_tokens=new_tokens[row], temperature=0.0, ignore_eos=True),
        )
        barrier.wait()
        start = time.perf_counter()
        if delays:
            time.sleep(max(0.0, start + delays[row] - time.perf_counter()))
        timings[row].sent = time.perf_counter()
        try:
            for response in stub.Generate(request, timeout=1200):
                timings[row].arrived(time.perf_counter(), len(response.token_ids))
        except grpc.RpcError as error:
            errors.append(error)

    with grpc.insecure_channel(target, options=list(options.items())) as channel:
        threads = [threading.Thread(target=client, args=(row, channel)) for row in range(len(batch))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} nightcap requests failed: {errors[0]}")
    produced = [len(t.tokens) for t in timings]
    assert produced == new_tokens, f"nightcap produced {produced}, asked for {new_tokens}"
    return timings


def run_nightcap(target: str, batch: list[list[int]], **options) -> dict[str, float]:
    timings = stream_requests(target, batch, [NEW_TOKENS] * len(batch), **options)
    return summarise(timings, min(t.sent for t in timings), max(t.tokens[-1] for t in timings))


def run_long_prompt_interference(address: str, vocab: int, long_prompt_tokens: int) -> dict[str, float]:
    """Four streams decode while one long prompt arrives: how long do they stall while it is prefilled?"""
    rng = random.Random(1)
    long_prompt = [rng.randrange(100, min(vocab, 20_000)) for _ in range(long_prompt_tokens)]
    decoders = [Timings(0.0) for _ in range(4)]
    long_request = Timings(0.0)
    started = threading.Barrier(5)

    def decode(row: int, stub) -> None:
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=prompts(4, vocab)[row]),
            params=common_pb2.SamplingParams(max_new_tokens=96, temperature=0.0, ignore_eos=True),
        )
        decoders[row].sent = time.perf_counter()
        for number, response in enumerate(stub.Generate(request, timeout=600)):
            decoders[row].arrived(time.perf_counter(), len(response.token_ids))
            if number == 16:
                started.wait()  # every stream is decoding: now the long prompt arrives
            del response

    def prefill(stub) -> None:
        started.wait()
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=long_prompt),
            params=common_pb2.SamplingParams(max_new_tokens=1, temperature=0.0, ignore_eos=True),
        )
        long_request.sent = time.perf_counter()
        for response in stub.Generate(request, timeout=600):
            long_request.arrived(time.perf_counter(), len(response.token_ids))

    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        threads = [threading.Thread(target=decode, args=(row, stub)) for row in range(4)]
        threads.append(threading.Thread(target=prefill, args=(stub,)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    gaps = sorted(g for t in decoders for g in t.gaps)
    return {
        "decode_gap_max_ms": 1000 * gaps[-1],
        "decode_itl_p99_ms": 1000 * percentile(gaps, 99),
        "long_prompt_ttft_ms": 1000 * long_request.ttft,
    }


class GenerationServer:
    """The real service in its own process, as `make up` runs it."""

    def __init__(
        self, model: str, var_dir: Path, max_batch_size: int, max_prefill_tokens: int = 2048, *extra: str, log: str = ""
    ) -> None:
        self.address = f"127.0.0.1:{free_port()}"
        self.log = (var_dir / "bench" / f"generation-server{log}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.generation", "serve", "--model", model, "--address", self.address,
             "--var-dir", str(var_dir), "--metrics-address", "", "--max-batch-size", str(max_batch_size),
             "--max-prefill-tokens", str(max_prefill_tokens), "--log-level", "WARNING",
             "--device", DEVICE.type, "--dtype", str(DTYPE).removeprefix("torch."),
             *(extra if "--runner" in extra else ("--runner", "transformers", *extra))],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if check_health(self.address) == "SERVING":
                    return
            except Exception:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the generation service exited; see {self.log.name}") from None
            time.sleep(0.5)
        raise RuntimeError("the generation service did not start within 300 s")

    def rss_bytes(self) -> list[int]:
        """Resident memory of this server's processes: rank 0 first, then any ranks it started."""
        import psutil

        root = psutil.Process(self.process.pid)
        return [p.memory_info().rss for p in [root, *root.children()]]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


def pythia_160m_shape(folder: Path, tokenizer_from: Path) -> Path:
    """Pythia-160M's shape (12 layers, 768 wide, 12 heads) with random weights and SmolLM2's tokenizer
    (49,152 ids instead of Pythia's 50,304: no hub access here for Pythia's own)."""
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=2048, rotary_pct=0.25,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    GPTNeoXForCausalLM(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


def redpajama_3b_shape(folder: Path, tokenizer_from: Path) -> Path:
    """RedPajama-INCITE-Chat-3B's shape (GPT-NeoX, 32 layers, 2560 wide, 32 heads, bf16) with random
    weights and SmolLM2's tokenizer (its ids are a subset of the 50,432 the shape keeps). For GPU runs."""
    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = GPTNeoXConfig(
        vocab_size=50_432, hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, intermediate_size=10_240,
        max_position_embeddings=2048, rotary_pct=1.0, use_parallel_residual=False, dtype="bfloat16",
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    GPTNeoXForCausalLM(config).to(torch.bfloat16).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(folder)
    return folder


def main() -> None:
    global DEVICE, DTYPE, MIXED_NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="values of N")
    parser.add_argument(
        "--models", nargs="*", default=["pythia-160m-shape", "smollm2-135m"], help="which models to measure"
    )
    parts = ["mixed", "scaling", "chunked", "memory", "prefix", "step", "cache-decode"]
    parser.add_argument("--skip", nargs="*", default=[], choices=parts, help="parts to skip")
    parser.add_argument(
        "--memory-models", nargs="*", default=["pythia-160m-shape", "redpajama-3b-shape"],
        help="models whose 1-shard and 2-rank resident memory is measured (the 3B shape: bfloat16, ~6 GB, built once)",
    )  # fmt: skip
    parser.add_argument(
        "--num-shard", type=int, nargs="+", default=[1], help="nightcap's tensor-parallel sizes at each N (GPU runs)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="turns each system takes at each N and on the mixed workload (metrics: means; ratios: median of rounds)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda, for the baselines and the servers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--area", default="generation", help="writes var/bench/<area>.json")
    parser.add_argument(
        "--mixed-new-tokens", type=int, nargs=2, default=list(MIXED_NEW_TOKENS), metavar=("LOW", "HIGH"),
        help="range of new tokens the mixed workload asks for (a smaller HIGH shortens a run on a busy machine)",
    )  # fmt: skip
    parser.add_argument("--var-dir", type=Path, default=None, help="runtime folder (default ./var)")
    args = parser.parse_args()
    DEVICE, DTYPE = torch.device(args.device), getattr(torch, args.dtype)
    MIXED_NEW_TOKENS = tuple(args.mixed_new_tokens)
    layout = VarLayout.from_env(args.var_dir)
    layout.bench.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(layout.models)
    default = prepare_default(registry)
    folders = {
        "smollm2-135m": (default.path, DEFAULT_MODEL),
        "pythia-160m-shape": (pythia_160m_shape(layout.bench / "models" / "pythia-160m-shape", default.path),) * 2,
    }
    if "redpajama-3b-shape" in args.models or "redpajama-3b-shape" in args.memory_models:
        folders["redpajama-3b-shape"] = (
            redpajama_3b_shape(layout.bench / "models" / "redpajama-3b-shape", default.path),
        ) * 2
    report = BenchReport(args.area)
    for name in args.models:
        folder, serve_as = folders[name]
        print(f"== {name}", flush=True)
        for num_shard in args.num_shard:
            measure_model(
                report, name, folder, str(serve_as), layout.root, args.concurrency, "mixed" not in args.skip, num_shard,
                args.rounds,
            )  # fmt: skip
        if "prefix" not in args.skip:
            measure_prefix_cache(report, name, str(serve_as), layout.root, args.rounds)
        if "step" not in args.skip and DEVICE.type == "cpu":  # on CUDA the default is bfloat16 already
            measure_faster_step(report, name, str(serve_as), layout.root, args.rounds)
        if "cache-decode" not in args.skip and name == "smollm2-135m" and importlib.util.find_spec("llama_cpp"):
            measure_decode_beside_cache(report, name, default_gguf_path(), layout.root, args.rounds)
        if "scaling" not in args.skip:
            measure_scaling(report, name, str(serve_as), layout.root)
    for name in [] if "memory" in args.skip else args.memory_models:
        print(f"== {name} memory", flush=True)
        dtype = "bfloat16" if name == "redpajama-3b-shape" else args.dtype
        measure_memory(report, name, str(folders[name][1]), layout.root, dtype)
    if "pythia-160m-shape" in args.models and "chunked" not in args.skip:
        measure_chunked_prefill(report, folders["pythia-160m-shape"][0], layout.root)
    report.write(layout.root)


def measure_model(
    report: BenchReport,
    name: str,
    folder: Path,
    serve_as: str,
    var_dir: Path,
    concurrency: list[int],
    mixed: bool,
    num_shard: int = 1,
    rounds: int = 3,
) -> None:
    """Sequential, static batch and nightcap at each N, taking turns for ``rounds`` rounds (each metric is
    the rounds' mean, each ratio the median of the rounds' ratios); then the mixed-length workload, the
    same way.
    With ``num_shard`` > 1 nightcap runs tensor-parallel and its keys start with ``tp<num_shard>_``."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPE).to(DEVICE).eval()
    vocab = model.get_input_embeddings().num_embeddings
    base = {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    tp = f"tp{num_shard}_" if num_shard > 1 else ""
    server = GenerationServer(
        serve_as, var_dir, max([*concurrency, MIXED_REQUESTS]), 2048, "--num-shard", str(num_shard), log=tp
    )
    try:
        run_sequential(model, prompts(1, vocab))  # warm-up, as nightcap's below
        static_batch_metrics(model, prompts(2, vocab))
        run_nightcap(server.address, prompts(2, vocab))
        half = SEQUENTIAL_REQUESTS // 2
        sequential = run_sequential(model, prompts(half, vocab))
        static: dict[int, list[dict[str, float]]] = {n: [] for n in concurrency}
        served: dict[int, list[dict[str, float]]] = {n: [] for n in concurrency}
        for round_ in range(rounds):
            for n in concurrency:
                batch = prompts(n, vocab, seed=1 + 100 * round_ + n)
                static[n].append(static_batch_metrics(model, batch))
                served[n].append(run_nightcap(server.address, batch))
                print(
                    f"   N={n}: static {static[n][-1]['tokens_per_s']:.0f} tok/s,"
                    f" nightcap {served[n][-1]['tokens_per_s']:.0f}"
                )
        sequential += run_sequential(model, prompts(SEQUENTIAL_REQUESTS, vocab)[half:])
        if mixed:
            measure_mixed(report, name, model, server.address, vocab, tp, rounds)
    finally:
        server.stop()
    rate = sequential_rate(sequential)
    report.add("generate", "sequential", name, {**base, "requests": SEQUENTIAL_REQUESTS}, rate)
    if model.config.model_type == "llama" and 16 in concurrency:  # the alternative engine this one was chosen over
        result = run_transformers_continuous_batching(model, prompts(16, vocab))
        report.add("generate", "transformers-generate_batch", name, {**base, "concurrency": 16}, result)
    for n in concurrency:
        ours, theirs = mean_metrics(served[n]), mean_metrics(static[n])
        params = {**base, "concurrency": n, "rounds": rounds}
        report.add("generate", "static-batch", name, params, theirs)
        report.add("generate", f"nightcap{'-' + tp[:-1] if tp else ''}", name, params, ours)
        report.ratio(f"{name}/{tp}n{n}_vs_sequential", ours["tokens_per_s"] / rate["tokens_per_s"])
        report.ratio(f"{name}/{tp}n{n}_vs_static_batch", paired_ratio(served[n], static[n]))


def mean_metrics(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each metric's mean over the rounds."""
    return {key: statistics.mean(run[key] for run in runs) for key in runs[0]}


def paired_ratio(ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> float:
    """The median over rounds of our tokens/s over theirs in the same round: the two ran back to back,
    so a round that a noisy neighbour slowed counts once instead of skewing a mean."""
    return statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, theirs, strict=True))


def mixed_workload(vocab: int, round_: int = 0) -> tuple[list[list[int]], list[int], list[float]]:
    """64 prompts (new ones each round), their requested lengths (16-256) and arrival offsets over 3 s,
    from a fixed seed."""
    rng = random.Random(64)
    lengths = [rng.randint(*MIXED_NEW_TOKENS) for _ in range(MIXED_REQUESTS)]
    arrivals = sorted(rng.uniform(0, MIXED_ARRIVAL_S) for _ in range(MIXED_REQUESTS))
    return prompts(MIXED_REQUESTS, vocab, seed=640 + round_), lengths, arrivals


def measure_mixed(
    report: BenchReport, name: str, model, address: str, vocab: int, tp: str = "", rounds: int = 1
) -> None:
    """Requests that want different lengths: a static batch runs to its longest member; nightcap lets
    each leave when done and takes arrivals as they come. Only requested tokens count."""
    lengths = mixed_workload(vocab)[1]
    params = {
        "requests": MIXED_REQUESTS, "new_tokens": "{}-{}".format(*MIXED_NEW_TOKENS), "arrival_s": MIXED_ARRIVAL_S,
        "rounds": rounds,
    }  # fmt: skip
    static_runs, served_runs = [], []
    for round_ in range(rounds):
        batch, lengths, arrivals = mixed_workload(vocab, round_)
        started, times = run_static_batch(model, batch, new_tokens=max(lengths))
        static_runs.append(
            {
                "tokens_per_s": sum(lengths) / (times[-1] - started),
                "wasted_tokens": len(batch) * len(times) - sum(lengths),
            }
        )
        timings = stream_requests(address, batch, lengths, delays=arrivals)
        served_runs.append(summarise(timings, min(t.sent for t in timings), max(t.tokens[-1] for t in timings)))
    static, served = mean_metrics(static_runs), mean_metrics(served_runs)
    print(f"   mixed: static {static['tokens_per_s']:.0f} tok/s, nightcap {served['tokens_per_s']:.0f}")
    report.add("mixed", "static-batch", name, {**params, "note": "all 64 given at once"}, static)
    report.add("mixed", "nightcap", name, params, served)
    report.ratio(f"{name}/{tp}mixed_n64_vs_static_batch", paired_ratio(served_runs, static_runs))


def measure_scaling(report: BenchReport, name: str, serve_as: str, var_dir: Path, rounds: int = 2) -> None:
    """Aggregate tokens/s at N=16: 1 server, 2 tensor-parallel ranks, 2 replicas round-robin; in turns."""
    n = SCALING_CONCURRENCY
    params = {"concurrency": n, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    one = GenerationServer(serve_as, var_dir, n, 2048, log="-tp1")
    servers = [one]
    try:
        try:
            tp2 = GenerationServer(serve_as, var_dir, n, 2048, "--num-shard", "2", "--threads", "1", log="-tp2")
            servers.append(tp2)
        except RuntimeError as error:  # e.g. SmolLM2's 9 heads do not split over 2 ranks
            print(f"   {name}: no tensor parallelism: {error}")
            tp2 = None
        replicas = [GenerationServer(serve_as, var_dir, n, 2048, "--threads", "1", log=f"-r{i}") for i in (1, 2)]
        servers += replicas
        target = "ipv4:" + ",".join(r.address for r in replicas)
        systems = {"nightcap-1": (one.address, {}), "replicas-2": (target, {"grpc.lb_policy_name": "round_robin"})}
        if tp2 is not None:
            systems["tp-2"] = (tp2.address, {})
        for address, options in systems.values():
            run_nightcap(address, prompts(4, 49_152), **options)  # warm-up
        rates: dict[str, list[float]] = {system: [] for system in systems}
        for round_ in range(rounds):
            batch = prompts(n, 49_152, seed=1600 + round_)
            for system, (address, options) in systems.items():
                rates[system].append(run_nightcap(address, batch, **options)["tokens_per_s"])
    finally:
        for server in servers:
            server.stop()
    for system, values in rates.items():
        report.add("scaling", system, name, params, {"tokens_per_s": statistics.mean(values)})
    mean = {system: statistics.mean(values) for system, values in rates.items()}
    if "tp-2" in mean:
        report.ratio(f"{name}/tp2_vs_tp1", mean["tp-2"] / mean["nightcap-1"])
    report.ratio(f"{name}/replicas2_vs_1", mean["replicas-2"] / mean["nightcap-1"])


def generate_ids(stub, prompt: list[int], new_tokens: int) -> tuple[list[int], float]:
    """One greedy stream: its tokens and its time to first token (s)."""
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=prompt),
        params=common_pb2.SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True),
    )
    sent, first, ids = time.perf_counter(), None, []
    for response in stub.Generate(request, timeout=1200):
        if response.token_ids and first is None:
            first = time.perf_counter()
        ids += response.token_ids
    assert len(ids) == new_tokens and first is not None, f"asked for {new_tokens} tokens, got {len(ids)}"
    return ids, first - sent


def conversation_ttfts(address: str, seed: int, vocab: int) -> list[float]:
    """A 10-turn conversation as the orchestrator sends it: every turn's prompt is the whole conversation
    so far (each earlier prompt and answer, token for token) plus a new user turn holding three passages
    and a question. Returns each turn's time to first token."""
    rng = random.Random(seed)
    history = [rng.randrange(100, min(vocab, 20_000)) for _ in range(CONVERSATION_SYSTEM_TOKENS)]
    ttfts = []
    with grpc.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for _ in range(CONVERSATION_TURNS):
            history += [rng.randrange(100, min(vocab, 20_000)) for _ in range(CONVERSATION_TURN_TOKENS)]
            answer, ttft = generate_ids(stub, history, CONVERSATION_ANSWER_TOKENS)
            history += answer
            ttfts.append(ttft)
    return ttfts


def measure_prefix_cache(report: BenchReport, name: str, serve_as: str, var_dir: Path, rounds: int) -> None:
    """The prefix cache on (serve's default) against off (--prefix-cache-bytes 0), in turns:
    - turn10_ttft: a 10-turn conversation with three passages a turn; the 10th turn's time to first token;
    - shared_prefix: 64 requests at once, each one long system prompt plus its own question."""
    vocab = 49_152
    cached = GenerationServer(serve_as, var_dir, SHARED_PREFIX_REQUESTS, 2048, log="-cache")
    servers = {"cache": cached}
    try:
        servers["off"] = GenerationServer(
            serve_as, var_dir, SHARED_PREFIX_REQUESTS, 2048, "--prefix-cache-bytes", "0", log="-nocache"
        )
        for server in servers.values():
            run_nightcap(server.address, prompts(2, vocab, seed=-1))  # warm-up
        turn10: dict[str, list[float]] = {system: [] for system in servers}
        shared: dict[str, list[dict[str, float]]] = {system: [] for system in servers}
        for round_ in range(rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for system in order:
                ttfts = conversation_ttfts(servers[system].address, 7000 + round_, vocab)
                turn10[system].append(ttfts[-1])
            system_prompt = prompts(1, vocab, seed=8000 + round_, length=SHARED_PREFIX_TOKENS)[0]
            batch = [system_prompt + q for q in prompts(SHARED_PREFIX_REQUESTS, vocab, seed=9000 + round_, length=16)]
            for system in order:
                timings = stream_requests(servers[system].address, batch, [NEW_TOKENS] * len(batch))
                started, finished = min(t.sent for t in timings), max(t.tokens[-1] for t in timings)
                shared[system].append(summarise(timings, started, finished))
            print(
                f"   prefix cache: turn-10 ttft {1000 * turn10['cache'][-1]:.0f} ms vs"
                f" {1000 * turn10['off'][-1]:.0f} off; shared prefix {shared['cache'][-1]['tokens_per_s']:.0f}"
                f" tok/s vs {shared['off'][-1]['tokens_per_s']:.0f}"
            )
    finally:
        for server in servers.values():
            server.stop()
    params = {
        "turns": CONVERSATION_TURNS, "turn_tokens": CONVERSATION_TURN_TOKENS,
        "answer_tokens": CONVERSATION_ANSWER_TOKENS, "rounds": rounds,
    }  # fmt: skip
    for system in servers:
        label = "nightcap" if system == "cache" else "nightcap-no-prefix-cache"
        report.add("turn10_ttft", label, name, params, {"ttft_ms": 1000 * statistics.mean(turn10[system])})
        shared_params = {"requests": SHARED_PREFIX_REQUESTS, "system_prompt_tokens": SHARED_PREFIX_TOKENS,
                         "question_tokens": 16, "new_tokens": NEW_TOKENS, "rounds": rounds}  # fmt: skip
        report.add("shared_prefix", label, name, shared_params, mean_metrics(shared[system]))
    report.ratio(
        f"{name}/turn10_ttft_cache_vs_off",
        statistics.median(a / b for a, b in zip(turn10["cache"], turn10["off"], strict=True)),
    )
    report.ratio(f"{name}/shared_prefix_tokens_per_s_vs_off", paired_ratio(shared["cache"], shared["off"]))


def measure_faster_step(report: BenchReport, name: str, serve_as: str, var_dir: Path, rounds: int) -> None:
    """Today's eager float32 decode step against the faster ones this CPU takes: ``--quantize int8`` (int8
    weights, bfloat16 activations) and, for the default model, ``--runner llamacpp`` (its Q4_1 GGUF in
    llama.cpp), one server each, in turns: decode tokens/s of one stream after its first token, and tokens/s
    of 16 streams."""
    vocab = 49_152
    servers = {"eager": GenerationServer(serve_as, var_dir, 16, 2048, log="-eager")}
    try:
        servers["int8"] = GenerationServer(serve_as, var_dir, 16, 2048, "--quantize", "int8", log="-int8")
        if name == "smollm2-135m" and importlib.util.find_spec("llama_cpp") is not None:
            servers["llamacpp"] = GenerationServer(serve_as, var_dir, 16, 2048, "--runner", "llamacpp", log="-llamacpp")
        for server in servers.values():
            run_nightcap(server.address, prompts(2, vocab, seed=-2))  # warm-up
        runs: dict[tuple[str, int], list[dict[str, float]]] = {(s, n): [] for s in servers for n in (1, 16)}
        for round_ in range(rounds):
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for n in (1, 16):
                batch = prompts(n, vocab, seed=5000 + 100 * round_ + n)
                for system in order:
                    timings = stream_requests(servers[system].address, batch, [NEW_TOKENS] * n)
                    metrics = summarise(timings, min(t.sent for t in timings), max(t.tokens[-1] for t in timings))
                    decode_s = statistics.mean(t.tokens[-1] - t.tokens[0] for t in timings)
                    metrics["decode_tokens_per_s"] = n * (NEW_TOKENS - 1) / decode_s
                    runs[(system, n)].append(metrics)
            print(
                "   faster step: "
                + ", ".join(
                    f"{system} N=1 {runs[(system, 1)][-1]['decode_tokens_per_s']:.1f} decode tok/s,"
                    f" N=16 {runs[(system, 16)][-1]['tokens_per_s']:.0f} tok/s"
                    for system in servers
                )
            )
    finally:
        for server in servers.values():
            server.stop()
    labels = {"eager": "nightcap", "int8": "nightcap --quantize int8", "llamacpp": "nightcap --runner llamacpp"}
    for (system, n), values in runs.items():
        params = {"concurrency": n, "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "rounds": rounds}
        report.add("decode_step", labels[system], name, params, mean_metrics(values))
    for n, key in ((1, "decode_tokens_per_s"), (16, "tokens_per_s")):
        ratio = statistics.median(a[key] / b[key] for a, b in zip(runs[("int8", n)], runs[("eager", n)], strict=True))
        report.ratio(f"{name}/decode_step_vs_eager_n{n}", ratio)
        if "llamacpp" in servers:  # llama.cpp on the GGUF against transformers' eager step on its de-quantized weights
            pairs = zip(runs[("llamacpp", n)], runs[("eager", n)], strict=True)
            report.ratio(f"{name}/llamacpp_vs_transformers_n{n}", statistics.median(a[key] / b[key] for a, b in pairs))


def measure_decode_beside_cache(
    report: BenchReport, name: str, gguf: Path, var_dir: Path, rounds: int, fill_tokens: int = CACHE_FILL_TOKENS
) -> None:
    """One stream's greedy decode rate on the llama.cpp runner, in process, beside a prefix cache holding
    ``fill_tokens`` tokens (1024-token prompts run until it does) and beside an empty one: two engines with
    the same limits, taking turns each round (the order alternating), a new 32-token prompt per round;
    rate = (tokens - 1) / (last token's time - first's). The ratio is the median of the rounds' ratios."""
    from services.generation.engine.request import Request, TokenChunk
    from services.generation.engine.sampling import SamplingConfig
    from services.generation.engine.scheduler import SchedulerConfig
    from services.generation.loading import load_model, start_engine

    loaded = load_model(str(gguf), ModelRegistry(var_dir / "bench" / "gguf-registry"), runner="llamacpp")
    per_token = loaded.model.kv_bytes_per_token
    config = SchedulerConfig(max_batch_total_tokens=8192, prefix_cache_bytes=(fill_tokens + 8192) * per_token)
    engines = {"full": start_engine(loaded, config), "empty": start_engine(loaded, config)}
    vocab = loaded.vocab_size

    def decode_rate(engine, prompt: list[int], new_tokens: int) -> float:
        request = engine.submit(Request(prompt, SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)))
        times = []
        for event in request.events(timeout=600):
            if isinstance(event, TokenChunk):
                times += [time.perf_counter()] * len(event.token_ids)
        assert len(times) == new_tokens, f"asked for {new_tokens} tokens, got {len(times)}"
        return (new_tokens - 1) / (times[-1] - times[0])

    rates: dict[str, list[float]] = {system: [] for system in engines}
    try:
        started, fill = time.perf_counter(), 0
        while engines["full"].scheduler.prefix.held < fill_tokens:
            fill += 1
            decode_rate(engines["full"], prompts(1, vocab, seed=-100 - fill, length=1024)[0], 2)
        held = engines["full"].scheduler.prefix.held
        print(f"   cache filled with {held} tokens in {time.perf_counter() - started:.0f} s", flush=True)
        for engine in engines.values():
            decode_rate(engine, prompts(1, vocab, seed=-3)[0], 8)  # warm-up
        for round_ in range(rounds):
            order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
            prompt = prompts(1, vocab, seed=6000 + round_)[0]
            for system in order:
                rates[system].append(decode_rate(engines[system], prompt, CACHE_DECODE_TOKENS))
            print(
                f"   decode beside a full cache {rates['full'][-1]:.1f} tok/s, beside an empty one"
                f" {rates['empty'][-1]:.1f}",
                flush=True,
            )
        cached = {system: engine.scheduler.prefix.held for system, engine in engines.items()}
    finally:
        for engine in engines.values():
            engine.shutdown(grace=1)
    params = {"new_tokens": CACHE_DECODE_TOKENS, "prompt_tokens": PROMPT_TOKENS, "rounds": rounds}
    for system in engines:
        metrics = {"decode_tokens_per_s": statistics.mean(rates[system]), "cached_tokens": cached[system]}
        report.add("decode_beside_cache", f"nightcap llamacpp, {system} cache", name, params, metrics)
    ratio = statistics.median(a / b for a, b in zip(rates["full"], rates["empty"], strict=True))
    report.ratio(f"{name}/decode_beside_full_cache_vs_empty", ratio)


def measure_memory(report: BenchReport, name: str, serve_as: str, var_dir: Path, dtype: str) -> None:
    """Resident memory of a 1-shard server and of each rank of a 2-shard one, one after the other.

    Measured after one short request, not right after loading: the 1-shard CPU process maps the
    safetensors file and only pages the weights in when a forward pass first reads them, so just after
    loading it looks far smaller than it is. Each process also carries ~0.4 GB that is not weights
    (torch, transformers, gRPC), which is why a small model cannot get near half."""
    rss: dict[int, list[int]] = {}
    for num_shard in (1, 2):
        server = GenerationServer(
            serve_as, var_dir, 4, 2048, "--num-shard", str(num_shard), "--dtype", dtype, log=f"-mem{num_shard}"
        )
        try:
            stream_requests(server.address, prompts(1, 49_152), [4])
            rss[num_shard] = server.rss_bytes()
        finally:
            server.stop()
    params = {"dtype": dtype, "measured": "after one request"}
    report.add("memory", "nightcap-1", name, params, {"rss_mb": rss[1][0] / 2**20})
    report.add("memory", "tp-2", name, {**params, "ranks": 2}, {"rss_mb_per_rank_max": max(rss[2]) / 2**20})
    report.ratio(f"{name}/tp2_rank_rss_vs_tp1", max(rss[2]) / rss[1][0])
    print(f"   memory: 1 shard {rss[1][0] / 2**20:.0f} MB, largest of 2 ranks {max(rss[2]) / 2**20:.0f} MB")


def measure_chunked_prefill(report: BenchReport, folder: Path, var_dir: Path, long_prompt_tokens: int = 1536) -> None:
    """Prefilling a long prompt in one step against chunks of 256 tokens interleaved with decode steps."""
    name, results = "pythia-160m-shape", {}
    for chunk in (long_prompt_tokens, 256):
        server = GenerationServer(str(folder), var_dir, max_batch_size=8, max_prefill_tokens=chunk)
        try:
            run_nightcap(server.address, prompts(2, 49_152))  # warm-up
            results[chunk] = run_long_prompt_interference(server.address, 49_152, long_prompt_tokens)
        finally:
            server.stop()
        params = {"decoding_streams": 4, "long_prompt_tokens": long_prompt_tokens, "max_prefill_tokens": chunk}
        report.add("long_prompt_interference", "nightcap", name, params, results[chunk])
    whole, chunked = results[long_prompt_tokens], results[256]
    report.ratio(
        f"{name}/prefill_chunked_vs_whole_decode_gap_max", chunked["decode_gap_max_ms"] / whole["decode_gap_max_ms"]
    )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
