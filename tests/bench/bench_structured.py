"""Structured outputs: what a constraint costs the engine, on the default model, in process (no gRPC).

``<runner>/constrained_vs_free_tokens_per_s_n<N>``: N rows decoding 64 tokens each (``--new-tokens``) under a
JSON schema (one string field of at least 2,000 characters, so no row can end before its budget) against the
same prompts free with ignore_eos; both produce exactly N x 64 tokens (checked), and the ratio is constrained
tokens/s over free.
``<runner>/mixed_batch_vs_free_n16``: half the 16 rows constrained. ``schema_compile_ms_p50``/``_p99``: the 20
schemas of tests/test_structured.py compiled cold (a fresh compiler; the tokenizer view is built once before)
and cached (the same compiler again). ``mask_us_per_row``: one row's mask (llguidance, unpacked to bools).

Fairness: both sides are warmed alike, take turns for ``--rounds`` rounds (free first on even rounds,
constrained first on odd ones), and a ratio is the median of the rounds' ratios.

    python tests/bench/bench_structured.py [--runners transformers llamacpp] [--rounds 3] [--new-tokens 64]

Writes var/bench/structured.json (tests/bench/report.py) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from report import BenchReport

from services.common.paths import VarLayout
from services.common.registry import ModelRegistry
from services.generation.engine.constraints import ConstraintCompiler, ConstraintSpec
from services.generation.engine.request import Request, RequestStatus
from services.generation.engine.sampling import SamplingConfig
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.loading import DEFAULT_MODEL, load_model, prepare_default, start_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_structured import SCHEMAS

NEW_TOKENS = 64
WARM_TOKENS = 8
PROMPT_TOKENS = 32
LONG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}}, "required": ["text"]}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_batch(engine, vocab: int, rows: int, constrained: int, grammar, seed: int, new_tokens: int) -> float:
    """tokens/s of ``rows`` concurrent requests, the first ``constrained`` of them under ``grammar``."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for row in range(rows):
        prompt = torch.randint(100, min(vocab, 20_000), (PROMPT_TOKENS,), generator=generator).tolist()
        if row < constrained:
            config = SamplingConfig(max_new_tokens=new_tokens, constraint=grammar)
        else:
            config = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
        requests.append(Request(prompt_ids=prompt, config=config))
    started = time.perf_counter()
    for request in requests:
        engine.submit(request)
    for request in requests:
        for _ in request.events(timeout=600):
            pass
    elapsed = time.perf_counter() - started
    for request in requests:
        assert request.status is RequestStatus.FINISHED_LENGTH, request.status
        assert len(request.output_ids) == new_tokens
    return rows * new_tokens / elapsed


def measure_runner(report: BenchReport, runner: str, registry: ModelRegistry, rounds: int, new_tokens: int) -> None:
    loaded = load_model(DEFAULT_MODEL, registry, runner=runner, **({"threads": 2} if runner == "llamacpp" else {}))
    engine = start_engine(loaded, SchedulerConfig(max_concurrent_requests=32, prefix_cache_bytes=0))
    compiler = ConstraintCompiler()
    grammar = compiler.compile(ConstraintSpec("json_schema", json.dumps(LONG)), loaded)
    try:
        cases = {"n1": (1, 1), "n16": (16, 16), "mixed_n16": (16, 8)}
        for rows, constrained in cases.values():  # warm both sides alike
            run_batch(engine, loaded.vocab_size, rows, 0, grammar, seed=99, new_tokens=WARM_TOKENS)
            run_batch(engine, loaded.vocab_size, rows, constrained, grammar, seed=99, new_tokens=WARM_TOKENS)
        for name, (rows, constrained) in cases.items():
            free, masked, ratios = [], [], []
            for round_ in range(rounds):
                sides = [("free", 0), ("constrained", constrained)]
                results = {}
                for side, count in sides if round_ % 2 == 0 else sides[::-1]:
                    results[side] = run_batch(engine, loaded.vocab_size, rows, count, grammar, round_, new_tokens)
                free.append(results["free"])
                masked.append(results["constrained"])
                ratios.append(results["constrained"] / results["free"])
            params = {"rows": rows, "constrained_rows": constrained, "new_tokens": new_tokens, "rounds": rounds}
            report.add("structured", f"{runner}/free", DEFAULT_MODEL, params, {"tokens_per_s": statistics.median(free)})
            report.add(
                "structured",
                f"{runner}/constrained",
                DEFAULT_MODEL,
                params,
                {"tokens_per_s": statistics.median(masked)},
            )
            label = "mixed_batch_vs_free_n16" if name == "mixed_n16" else f"constrained_vs_free_tokens_per_s_{name}"
            report.ratio(f"{runner}/{label}", statistics.median(ratios))
    finally:
        engine.shutdown(grace=1.0)
        compiler.close()
    if runner == "transformers":
        measure_compile(report, loaded)


def measure_compile(report: BenchReport, loaded) -> None:
    """The 20 test schemas compiled cold (each on a fresh compiler) and then cached; one row's mask per token."""
    specs = [ConstraintSpec("json_schema", json.dumps(schema)) for schema in SCHEMAS]
    ConstraintCompiler().tokenizer(loaded)  # the tokenizer view is per model, not per request
    cold, cached, masks = [], [], []
    for spec in specs:
        compiler = ConstraintCompiler()
        started = time.perf_counter()
        grammar = compiler.compile(spec, loaded)
        cold.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        compiler.compile(spec, loaded)
        cached.append((time.perf_counter() - started) * 1000)
        compiler.close()
        mask, output = grammar.new_mask(), []
        generator = torch.Generator().manual_seed(0)
        for _ in range(24):  # a random walk through the grammar: every token a mask allows is possible
            started = time.perf_counter()
            allowed = mask(output)
            masks.append((time.perf_counter() - started) * 1e6)
            ids = allowed.nonzero().flatten()
            token = int(ids[torch.randint(len(ids), (1,), generator=generator)])
            if token in loaded.eos_token_ids:
                break
            output.append(token)
    report.add(
        "schema_compile",
        "llguidance",
        DEFAULT_MODEL,
        {"schemas": len(specs)},
        {
            "schema_compile_ms_p50": statistics.median(cold),
            "schema_compile_ms_p99": percentile(cold, 0.99),
            "schema_compile_cached_ms_p50": statistics.median(cached),
            "schema_compile_cached_ms_p99": percentile(cached, 0.99),
            "mask_us_per_row_p50": statistics.median(masks),
            "mask_us_per_row_p99": percentile(masks, 0.99),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runners", nargs="+", default=["transformers"], choices=["transformers", "llamacpp"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens each row generates")
    args = parser.parse_args()
    layout = VarLayout.from_env(None)
    registry = ModelRegistry(layout.models)
    prepare_default(registry)
    report = BenchReport("structured")
    for runner in args.runners:
        measure_runner(report, runner, registry, args.rounds, args.new_tokens)
    report.write(layout.root)


if __name__ == "__main__":
    main()
