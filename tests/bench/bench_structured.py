"""Structured outputs: what a constraint costs the engine, on the default model, in process (no gRPC).

``<runner>/constrained_vs_free_tokens_per_s_n<N>``: N rows decoding 64 tokens each (``--new-tokens``) under a
JSON schema (one string field of at least 2,000 characters, so no row can end before its budget) against the
same prompts free with ignore_eos; both produce exactly N x 64 tokens (checked), and the ratio is constrained
tokens/s over free.
``<runner>/mixed_batch_vs_free_n16``: half the 16 rows constrained. ``schema_compile_ms_p50``/``_p99``: the 20
schemas of tests/test_structured.py compiled cold (a fresh compiler; the tokenizer view is built once before)
and cached (the same compiler again). ``mask_us_per_row``: one row's mask (llguidance, unpacked to bools).

``<runner>/constrained_spec_vs_off_n1``: one row at a time, greedy, under a JSON schema that asks for facts the
prompt's passage holds (an extraction: name, country, first sentence), with speculation drafted from the prompt
(``--speculative-tokens`` 8, ``serve``'s default) against without. The answers should be token for token the
same; where scoring k+1 positions in one forward computes a close call differently (llama.cpp's batched path
does, with or without a grammar), the differing answers are counted (``answers_differ``), with the gap in
log-probability between the two tokens where each parted (``differ_max_margin_nats``,
``differ_median_margin_nats``). Two engines, one each way, take turns (``--spec-questions`` passages a round).

Fairness: both sides are warmed alike, take turns for ``--rounds`` rounds (free first on even rounds,
constrained first on odd ones), and a ratio is the median of the rounds' ratios.

    python tests/bench/bench_structured.py [--runners transformers llamacpp] [--rounds 3] [--new-tokens 64]

Writes var/bench/structured.json (tests/bench/report.py) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import math
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
from services.generation.engine.sampling import MAX_TOP_LOGPROBS, SamplingConfig
from services.generation.engine.scheduler import SchedulerConfig
from services.generation.engine.speculation import SPECULATIVE_TOKENS
from services.generation.loading import DEFAULT_MODEL, load_model, prepare_default, start_engine
from services.retrieval.corpus import read_wikipedia_summaries

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_structured import SCHEMAS

NEW_TOKENS = 64
WARM_TOKENS = 8
PROMPT_TOKENS = 32
LONG = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}}, "required": ["text"]}
EXTRACT = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "country": {"type": "string"}, "first_sentence": {"type": "string"}},
    "required": ["name", "country", "first_sentence"],
}
EXTRACT_TOKENS = 96


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


def extraction_prompts(loaded, count: int) -> list[list[int]]:
    """Chat prompts asking for the JSON facts of one corpus article each (its summary in the prompt)."""
    prompts = []
    for document in read_wikipedia_summaries(limit=count):
        ask = (
            f"{document.text[:1200]}\n\nGive the name of the place this passage is about, its country and the"
            " passage's first sentence, as JSON."
        )
        chat = [{"role": "user", "content": ask}]
        encoded = loaded.tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)
        prompts.append(list(encoded["input_ids"]))
    return prompts


def measure_speculation(report: BenchReport, runner: str, registry: ModelRegistry, rounds: int, questions: int) -> None:
    """Constrained greedy answers that copy from their prompt, speculation on against off (one row at a time)."""
    loaded = load_model(DEFAULT_MODEL, registry, runner=runner, **({"threads": 2} if runner == "llamacpp" else {}))
    base = {"max_concurrent_requests": 4, "prefix_cache_bytes": 0}
    engines = {
        "off": start_engine(loaded, SchedulerConfig(**base)),
        "spec": start_engine(loaded, SchedulerConfig(**base, speculative_tokens=SPECULATIVE_TOKENS)),
    }
    compiler = ConstraintCompiler()
    grammar = compiler.compile(ConstraintSpec("json_schema", json.dumps(EXTRACT)), loaded)
    prompts = extraction_prompts(loaded, questions)

    def answer(side: str, prompt: list[int]) -> tuple[list[int], float]:
        request = Request(
            prompt_ids=list(prompt), config=SamplingConfig(max_new_tokens=EXTRACT_TOKENS, constraint=grammar)
        )
        engines[side].submit(request)
        first = None
        for _ in request.events(timeout=600):
            first = first or time.perf_counter()
        return list(request.output_ids), time.perf_counter() - first

    try:
        for side in engines:  # warm both alike
            answer(side, prompts[0])
        rates = {side: [] for side in engines}
        differ, margins = 0, []
        for round_ in range(rounds):
            outputs = {}
            for side in list(engines) if round_ % 2 == 0 else list(engines)[::-1]:
                tokens, seconds = 0, 0.0
                outputs[side] = []
                for prompt in prompts:
                    ids, took = answer(side, prompt)
                    outputs[side].append(ids)
                    tokens, seconds = tokens + len(ids) - 1, seconds + took
                rates[side].append(tokens / seconds)
            for prompt, a, b in zip(prompts, outputs["off"], outputs["spec"], strict=True):
                if a != b:
                    differ += 1
                    margins.append(divergence_margin(engines["off"], prompt, a, b))
        value = engines["spec"].metrics.registry.get_sample_value
        drafted = value("nightcap_generation_draft_tokens_total")
        kept = value("nightcap_generation_accepted_draft_tokens_total")
        params = {"rows": 1, "questions": questions, "rounds": rounds, "max_new_tokens": EXTRACT_TOKENS}
        for side, values in rates.items():
            metrics = {"decode_tokens_per_s": statistics.median(values)}
            if side == "spec":
                metrics |= {"drafted_tokens": drafted, "accepted_draft_tokens": kept, "answers_differ": differ}
                if margins:  # how near a tie each difference began at, in nats (inf: a token not in the top 20)
                    worst, typical = max(margins), statistics.median(margins)
                    metrics |= {"differ_max_margin_nats": worst, "differ_median_margin_nats": typical}
            report.add("structured_speculation", f"{runner}/{side}", DEFAULT_MODEL, params, metrics)
        ratios = [spec / off for spec, off in zip(rates["spec"], rates["off"], strict=True)]
        report.ratio(f"{runner}/constrained_spec_vs_off_n1", statistics.median(ratios))
    finally:
        for engine in engines.values():
            engine.shutdown(grace=1.0)
        compiler.close()


def divergence_margin(engine, prompt: list[int], off: list[int], spec: list[int]) -> float:
    """At the first token where two answers part, how far apart the model put the two tokens (the difference of
    their log-probabilities, in nats), read by the plain engine without the grammar (one prefill of the prompt and
    the common start): a mask only renormalizes, so the difference is the same under it."""
    at = next(i for i, (x, y) in enumerate(zip(off, spec, strict=False)) if x != y)
    config = SamplingConfig(max_new_tokens=1, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS)
    request = Request(prompt_ids=[*prompt, *off[:at]], config=config)
    engine.submit(request)
    chunks = [event for event in request.events(timeout=600) if getattr(event, "logprobs", None)]
    chosen = chunks[0].logprobs[0]
    top = {**dict(chosen.top), chosen.token_id: chosen.logprob}
    if off[at] not in top or spec[at] not in top:
        return math.inf
    return round(abs(top[off[at]] - top[spec[at]]), 4)


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
    parser.add_argument(
        "--spec-questions", type=int, default=6, help="extraction prompts a round of the speculation rows (0: skip)"
    )
    parser.add_argument(
        "--skip-masks", action="store_true", help="only the speculation rows (no constrained-vs-free or compile rows)"
    )
    args = parser.parse_args()
    layout = VarLayout.from_env(None)
    registry = ModelRegistry(layout.models)
    prepare_default(registry)
    report = BenchReport("structured")
    for runner in args.runners:
        if not args.skip_masks:
            measure_runner(report, runner, registry, args.rounds, args.new_tokens)
        if args.spec_questions:
            measure_speculation(report, runner, registry, args.rounds, args.spec_questions)
    report.write(layout.root)


if __name__ == "__main__":
    main()
