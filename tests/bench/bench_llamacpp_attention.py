"""llama.cpp's flash attention on and off (`serve --flash-attn`), the llama.cpp runner in process on the default
model's Q4_1 GGUF: one stream after a long prompt, and 16 streams at once after short ones.

llama.cpp turns flash attention on by itself (`auto`) wherever its backend has the kernel, a CPU included. On a
CPU that kernel walks a query's cells one at a time, where without it attention is two matrix products over
every cell of the pool, other sequences' masked ones included. So off should win for one long conversation and
lose when many rows share the pool; this measures both sides of that.

Two engines, one per setting, on the same loaded GGUF (speculation off, prefix cache off so that every prompt is
prefilled); greedy, --max-tokens new tokens with ignore_eos; each round runs both workloads on both engines, the
engine order alternating between rounds. Checked: every request produced exactly the tokens asked for.

  long1   one stream after a --long-prompt-tokens prompt: decode tokens/s after its first token
  n16     16 streams at once after --short-prompt-tokens prompts: generated tokens over wall time

    python tests/bench/bench_llamacpp_attention.py [--rounds 3] [--long-prompt-tokens 3000]

Writes var/bench/llamacpp_attention.json with ratios off_vs_on_long1 and off_vs_on_n16 (medians of the rounds'
paired ratios; above 1: off faster) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import time

from report import BenchReport

from services.common.paths import VarLayout
from services.common.registry import ModelRegistry
from services.generation.engine.engine import ContinuousBatchingEngine
from services.generation.engine.request import Finished, Request, RequestStatus, TokenChunk
from services.generation.engine.sampling import SamplingConfig
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.loading import default_gguf_path, llamacpp_missing, load_model, start_engine

SETTINGS = ("auto", "off")  # auto: llama.cpp's choice, which is on for a CPU


def prompts(count: int, length: int, rng: random.Random, vocab: int) -> list[list[int]]:
    """Random token ids from the ordinary part of the vocabulary: every prompt distinct, nothing shared."""
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(count)]


def run(engine: ContinuousBatchingEngine, batch: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(generated tokens over wall time, the first stream's decode tokens/s after its first token)."""
    config = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    started = time.perf_counter()
    requests = [engine.submit(Request(list(prompt), config)) for prompt in batch]
    first_token_at = None
    for i, request in enumerate(requests):
        for event in request.events(timeout=600):
            if isinstance(event, TokenChunk) and event.token_ids and i == 0 and first_token_at is None:
                first_token_at = time.perf_counter()
            if isinstance(event, Finished) and (
                event.status is not RequestStatus.FINISHED_LENGTH or event.generated_tokens != new_tokens
            ):
                raise RuntimeError(f"a request ended {event.status.value} after {event.generated_tokens} tokens")
        if i == 0:
            first_done = time.perf_counter()
    ended = time.perf_counter()
    assert first_token_at is not None
    return new_tokens * len(batch) / (ended - started), (new_tokens - 1) / (first_done - first_token_at)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; ratios are their median")
    parser.add_argument("--long-prompt-tokens", type=int, default=3000, help="the long1 stream's prompt")
    parser.add_argument("--short-prompt-tokens", type=int, default=300, help="each n16 stream's prompt")
    parser.add_argument("--max-tokens", type=int, default=96, help="new tokens every request generates")
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0: one per core)")
    args = parser.parse_args()
    missing = llamacpp_missing()
    if missing:
        print(f"skipped: {missing}")
        return
    layout = VarLayout.from_env(None)
    base = load_model(str(default_gguf_path()), ModelRegistry(layout.models), runner="llamacpp", threads=args.threads)
    config = SchedulerConfig(max_batch_size=16, max_batch_total_tokens=16384, prefix_cache_bytes=0)
    engines = {s: start_engine(dataclasses.replace(base, flash_attn=s), config) for s in SETTINGS}
    rng = random.Random(0)
    vocab = base.vocab_size
    long1: dict[str, list[float]] = {s: [] for s in SETTINGS}
    n16: dict[str, list[float]] = {s: [] for s in SETTINGS}
    try:
        for engine in engines.values():  # warm-up: each engine's first steps are not timed
            run(engine, prompts(2, 64, rng, vocab), 8)
        for round_ in range(args.rounds):
            long_prompt = prompts(1, args.long_prompt_tokens, rng, vocab)
            short_prompts = prompts(16, args.short_prompt_tokens, rng, vocab)
            for setting in SETTINGS if round_ % 2 == 0 else reversed(SETTINGS):
                long1[setting].append(run(engines[setting], long_prompt, args.max_tokens)[1])
                n16[setting].append(run(engines[setting], short_prompts, args.max_tokens)[0])
            print(
                f"   round {round_ + 1}: long1 on {long1['auto'][-1]:.1f} / off {long1['off'][-1]:.1f} decode"
                f" tokens/s; n16 on {n16['auto'][-1]:.1f} / off {n16['off'][-1]:.1f} tokens/s"
            )
    finally:
        for engine in engines.values():
            engine.shutdown(grace=1)
    report = BenchReport("llamacpp_attention")
    model = f"llamacpp:{default_gguf_path().name}"
    for setting in SETTINGS:
        label = "on (auto)" if setting == "auto" else "off"
        params = {"prompt_tokens": args.long_prompt_tokens, "new_tokens": args.max_tokens}
        report.add("long1", label, model, params, {"decode_tokens_per_s": statistics.mean(long1[setting])})
        params = {"streams": 16, "prompt_tokens": args.short_prompt_tokens, "new_tokens": args.max_tokens}
        report.add("n16", label, model, params, {"tokens_per_s": statistics.mean(n16[setting])})
    for name, values in (("long1", long1), ("n16", n16)):
        report.ratio(
            f"off_vs_on_{name}", statistics.median(o / a for o, a in zip(values["off"], values["auto"], strict=True))
        )
    print(report.table())
    report.write(layout.root)


if __name__ == "__main__":
    main()
