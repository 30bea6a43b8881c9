"""One eager decode step of the default model in process: float32, bfloat16 and ``--quantize int8``.

The step alone, without the service around it (bench_generation.py's ``decode_step_vs_eager`` measures the
served stream). Each variant is loaded the way ``serve`` loads it, warmed alike, and the variants take turns
for ``--rounds`` rounds at each row count; a step time is the median of its rounds.

    python tests/bench/bench_decode_step.py [--rows 1 16] [--rounds 3] [--steps 15]

Writes var/bench/decode_step.json (ratios ``<variant>_vs_float32_rows<N>``, step time over float32's).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from report import BenchReport

from services.common.paths import VarLayout
from services.common.registry import ModelRegistry
from services.generation.loading import DEFAULT_MODEL, Placement, load_model, prepare_default

VARIANTS = {"float32": ("float32", ""), "bfloat16": ("bfloat16", ""), "int8": ("auto", "int8")}
PROMPT_TOKENS = 32


@torch.inference_mode()
def step_seconds(model, rows: int, steps: int) -> float:
    """Mean time of one decode step for ``rows`` rows after a 32-token prefill."""
    prompt = torch.randint(100, 20_000, (rows, PROMPT_TOKENS), generator=torch.Generator().manual_seed(rows))
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, prompt[:, -1:]
    for _ in range(3):
        cache = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
    started = time.perf_counter()
    for _ in range(steps):
        cache = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1).past_key_values
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="batch rows of each step")
    parser.add_argument("--rounds", type=int, default=3, help="turns each variant takes at each row count")
    parser.add_argument("--steps", type=int, default=15, help="decode steps timed per turn")
    args = parser.parse_args()
    layout = VarLayout.from_env(None)
    registry = ModelRegistry(layout.models)
    prepare_default(registry)
    models = {
        name: load_model(DEFAULT_MODEL, registry, dtype=dtype, placement=Placement(quantize=quantize)).model
        for name, (dtype, quantize) in VARIANTS.items()
    }
    report = BenchReport("decode_step")
    for rows in args.rows:
        times: dict[str, list[float]] = {name: [] for name in models}
        for round_ in range(args.rounds):
            order = list(models) if round_ % 2 == 0 else list(reversed(models))
            for name in order:
                times[name].append(step_seconds(models[name], rows, args.steps))
        for name, values in times.items():
            median = statistics.median(values)
            params = {"rows": rows, "prompt_tokens": PROMPT_TOKENS, "threads": torch.get_num_threads()}
            report.add("decode_step", name, DEFAULT_MODEL, params, {"step_ms": 1000 * median})
            print(f"   rows={rows:2d} {name:9s} {1000 * median:6.1f} ms a step")
            if name != "float32":
                report.ratio(f"{name}_vs_float32_rows{rows}", median / statistics.median(times["float32"]))
    report.write(layout.root)


if __name__ == "__main__":
    main()
