"""Generation throughput and latency: nightcap against the two ways transformers serves in-process.

For each model and each concurrency N (same 32-token prompts, 64 new tokens with ignore_eos, greedy):
  sequential    model.generate one request at a time (how OpenChatKit's bot.py serves); its rate does
                not depend on N, so it is measured once per model over a few requests
  static-batch  model.generate on one batch of N prompts (the best this hardware does at that size)
  nightcap      the generation service over gRPC (a subprocess), N concurrent streaming clients
  transformers-generate_batch   transformers' continuous batching, in process (Llama only; N = 16)

    python tests/bench/bench_generation.py [--concurrency 1 4 16 64] [--models pythia-160m-shape smollm2-135m]

Writes var/bench/generation.json (tests/bench/report.py) and prints the table.
"""

from __future__ import annotations

import argparse
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
from services.generation.loading import DEFAULT_MODEL, prepare_default

PROMPT_TOKENS = 32
NEW_TOKENS = 64
SEQUENTIAL_REQUESTS = 4
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Timings:
    """One request's clock: when it was sent and when each token arrived."""

    sent: float
    tokens: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.tokens[0] - self.sent

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False)]


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


def prompts(count: int, vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, min(vocab, 20_000)) for _ in range(PROMPT_TOKENS)] for _ in range(count)]


@torch.inference_mode()
def run_sequential(model, batch: list[list[int]]) -> dict[str, float]:
    timings, started = [], time.perf_counter()
    for prompt in batch:
        clock = TokenClock(1)
        sent = time.perf_counter()
        model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
            streamer=clock, pad_token_id=0,
        )  # fmt: skip
        timings.append(Timings(sent, clock.times))
    return summarise(timings, started, time.perf_counter())


@torch.inference_mode()
def run_static_batch(model, batch: list[list[int]]) -> dict[str, float]:
    clock = TokenClock(len(batch))
    started = time.perf_counter()
    model.generate(
        torch.tensor(batch), attention_mask=torch.ones(len(batch), PROMPT_TOKENS, dtype=torch.long),
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, streamer=clock, pad_token_id=0,
    )  # fmt: skip
    finished = time.perf_counter()
    return summarise([Timings(started, clock.times) for _ in batch], started, finished)


@torch.inference_mode()
def run_transformers_continuous_batching(model, batch: list[list[int]]) -> dict[str, float]:
    """transformers' own continuous batching manager (Llama only: it fails for GPT-NeoX in 5.24)."""
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0)
    started = time.perf_counter()
    outputs = model.generate_batch(inputs=batch, generation_config=config, progress_bar=False)
    finished = time.perf_counter()
    tokens = sum(len(output.generated_tokens) for output in outputs.values())
    return {"tokens_per_s": tokens / (finished - started)}


def run_nightcap(address: str, batch: list[list[int]]) -> dict[str, float]:
    timings = [Timings(0.0) for _ in batch]
    barrier = threading.Barrier(len(batch))
    errors: list[BaseException] = []

    def client(row: int, channel: grpc.Channel) -> None:
        stub = generation_pb2_grpc.GenerationStub(channel)
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=batch[row]),
            params=common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True),
        )
        barrier.wait()
        timings[row].sent = time.perf_counter()
        try:
            for response in stub.Generate(request, timeout=600):
                now = time.perf_counter()
                timings[row].tokens.extend([now] * len(response.token_ids))
        except grpc.RpcError as error:
            errors.append(error)

    with grpc.insecure_channel(address) as channel:
        threads = [threading.Thread(target=client, args=(row, channel)) for row in range(len(batch))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} nightcap requests failed: {errors[0]}")
    assert all(len(t.tokens) == NEW_TOKENS for t in timings)
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
            decoders[row].tokens.append(time.perf_counter())
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
        for _ in stub.Generate(request, timeout=600):
            long_request.tokens.append(time.perf_counter())

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

    def __init__(self, model: str, var_dir: Path, max_batch_size: int, max_prefill_tokens: int = 2048) -> None:
        with socket_port() as port:
            self.address = f"127.0.0.1:{port}"
        self.log = (var_dir / "bench" / "generation-server.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.generation", "serve", "--model", model, "--address", self.address,
             "--var-dir", str(var_dir), "--metrics-address", "", "--max-batch-size", str(max_batch_size),
             "--max-prefill-tokens", str(max_prefill_tokens), "--log-level", "WARNING"],
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

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


class socket_port:
    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        return self.socket.getsockname()[1]

    def __exit__(self, *_: object) -> None:
        self.socket.close()


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="values of N")
    parser.add_argument(
        "--models", nargs="+", default=["pythia-160m-shape", "smollm2-135m"], help="which models to measure"
    )
    parser.add_argument("--var-dir", type=Path, default=None, help="runtime folder (default ./var)")
    args = parser.parse_args()
    layout = VarLayout.from_env(args.var_dir)
    layout.bench.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(layout.models)
    default = prepare_default(registry)
    folders = {
        "smollm2-135m": (default.path, DEFAULT_MODEL),
        "pythia-160m-shape": (pythia_160m_shape(layout.bench / "models" / "pythia-160m-shape", default.path),) * 2,
    }
    report = BenchReport("generation")
    for name in args.models:
        folder, serve_as = folders[name]
        print(f"== {name}", flush=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        vocab = model.get_input_embeddings().num_embeddings
        base = {"prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
        sequential = run_sequential(model, prompts(SEQUENTIAL_REQUESTS, vocab))
        report.add("generate", "sequential", name, {**base, "requests": SEQUENTIAL_REQUESTS}, sequential)
        static = {n: run_static_batch(model, prompts(n, vocab)) for n in args.concurrency}
        if model.config.model_type == "llama":  # the alternative engine this one was chosen over
            for n in [n for n in args.concurrency if n == 16]:  # its weakest point on CPU, per the issue
                result = run_transformers_continuous_batching(model, prompts(n, vocab))
                report.add("generate", "transformers-generate_batch", name, {**base, "concurrency": n}, result)
        del model
        server = GenerationServer(str(serve_as), layout.root, max_batch_size=max(args.concurrency))
        try:
            run_nightcap(server.address, prompts(2, vocab))  # warm-up
            served = {n: run_nightcap(server.address, prompts(n, vocab)) for n in args.concurrency}
        finally:
            server.stop()
        for n in args.concurrency:
            report.add("generate", "static-batch", name, {**base, "concurrency": n}, static[n])
            report.add("generate", "nightcap", name, {**base, "concurrency": n}, served[n])
            report.ratio(f"{name}/n{n}_vs_sequential", served[n]["tokens_per_s"] / sequential["tokens_per_s"])
            report.ratio(f"{name}/n{n}_vs_static_batch", served[n]["tokens_per_s"] / static[n]["tokens_per_s"])
    if "pythia-160m-shape" in args.models:
        measure_chunked_prefill(report, folders["pythia-160m-shape"][0], layout.root)
    report.write(layout.root)


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
