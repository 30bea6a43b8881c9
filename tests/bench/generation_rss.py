"""Generation's resident memory over rounds of concurrent requests, per allocator setting.

    python tests/bench/generation_rss.py --rounds 6 --concurrency 64     # part of `make soak`

Starts one generation service per setting (the default model from the registry), sends ``--rounds``
rounds of ``--concurrency`` concurrent Generate calls, and records RSS after loading and after each round.
Settings: glibc's defaults, and the bound the stack runs with (``MALLOC_ARENA_MAX=2`` plus a fixed mmap
threshold, so large freed tensors go back to the OS instead of staying in one of up to 8 x cores arenas).
Writes var/bench/generation_rss.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil

from deploy.stack import ALLOCATOR_ENV
from deploy.supervisor import health
from nightcap.v1 import generation_pb2, generation_pb2_grpc
from services.common.paths import VarLayout

PROMPTS = ["Where is Zurich?", "Tell me about the Alps and the Rhine.", "Who was Albert Einstein?" * 8]
SETTINGS = {"glibc-default": {}, "bounded": ALLOCATOR_ENV}


def one_round(stub: generation_pb2_grpc.GenerationStub, concurrency: int, new_tokens: int) -> int:
    def generate(n: int) -> int:
        request = generation_pb2.GenerateRequest(
            text=PROMPTS[n % len(PROMPTS)] * (1 + n % 4),
            params={"max_new_tokens": new_tokens, "ignore_eos": True, "temperature": 0.6, "seed": n},
        )
        return sum(len(r.token_ids) for r in stub.Generate(request, timeout=600))

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(generate, range(concurrency)))


def measure(name: str, env: dict[str, str], args: argparse.Namespace, port: int) -> dict:
    address = f"127.0.0.1:{port}"
    command = [sys.executable, "-m", "services.generation", "serve", "--address", address]
    command += ["--metrics-address", "", "--var-dir", str(args.var_dir), "--log-level", "WARNING"]
    server = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    try:
        while health(address) != "SERVING":
            assert server.poll() is None, f"{name}: the generation service exited"
            time.sleep(0.5)
        process = psutil.Process(server.pid)
        series = [round(process.memory_info().rss / 2**20, 1)]
        seconds = []
        with grpc.insecure_channel(address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            for round_number in range(args.rounds):
                begin = time.monotonic()
                tokens = one_round(stub, args.concurrency, args.new_tokens)
                seconds.append(round(time.monotonic() - begin, 1))
                assert tokens == args.concurrency * args.new_tokens, f"{name}: {tokens} tokens generated"
                time.sleep(1)
                series.append(round(process.memory_info().rss / 2**20, 1))
                print(f"{name:<14} round {round_number + 1}: RSS {series[-1]:.0f} MB", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    return {
        "env": env,
        "rss_mb_after_load_then_each_round": series,
        "growth_mb_after_round_1": round(series[-1] - series[1], 1),
        "seconds_per_round": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--var-dir", default=None, help="the var dir whose registry holds the default model")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=50091)
    args = parser.parse_args()
    args.var_dir = VarLayout.from_env(args.var_dir).root
    results = {name: measure(name, env, args, args.port) for name, env in SETTINGS.items()}
    out = VarLayout(args.var_dir).bench / "generation_rss.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"params": vars(args) | {"var_dir": str(args.var_dir)}, "results": results}, indent=2))
    print(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
