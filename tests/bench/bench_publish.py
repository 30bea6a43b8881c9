"""Train to serve: what converting and publishing a version costs a running generation service.

One generation service (a subprocess, the embedded SmolLM2-135M) serves CLIENTS concurrent streaming clients
that keep sending requests. After a discarded warm-up window, two windows of the same length and load:
  steady   no swap
  swap     ModelAdmin/LoadVersion of a second version (the same weights converted again by training/convert.py:
           same size, so memory and warm-up are a real swap's)
and the ratios between them: p99 inter-token latency, peak resident memory of the service (sampled every 20 ms),
failed requests. Also publish_to_first_new_token_s (LoadVersion call to the first token of a request served by
the new version) and convert_vs_save_pretrained (training/convert.py on the model's folder over a plain
save_pretrained of the same model, interleaved, median of REPEATS).

    python tests/bench/bench_publish.py [--clients 8] [--window 20]

Writes var/bench/publish.json (tests/bench/report.py) and prints the table.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import psutil
from report import BenchReport

from clients.client import check_health
from nightcap.v1 import admin_pb2, admin_pb2_grpc, common_pb2, generation_pb2, generation_pb2_grpc
from services.common.paths import VarLayout
from services.common.registry import ModelRegistry
from services.common.server import free_port
from services.generation.loading import DEFAULT_MODEL, prepare_default
from training import convert

ROOT = Path(__file__).resolve().parents[2]

NEW_TOKENS = 32
REPEATS = 3
CANDIDATE = "bench-candidate"


class Load:
    """CLIENTS threads sending greedy 32-token requests back to back; records gaps between tokens and failures."""

    def __init__(self, address: str, clients: int) -> None:
        self.channel = grpc.insecure_channel(address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.gaps: list[float] = []
        self.failures: list[str] = []
        self.requests = 0
        self.models: set[str] = set()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, number: int) -> None:
        request = generation_pb2.GenerateRequest(
            text=f"Question {number}: where is Zurich, and what is it known for?",
            params=common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        )
        while not self.stop.is_set():
            last = None
            try:
                for message in self.stub.Generate(request):
                    if message.model:
                        self.models.add(message.model)
                    if message.token_ids:
                        now = time.perf_counter()
                        if last is not None:
                            self.gaps.append(now - last)
                        last = now
                self.requests += 1
            except grpc.RpcError as error:
                self.failures.append(f"{error.code().name}: {error.details()}")

    def run(self, seconds: float, during=None) -> float:
        """Runs the load for ``seconds`` (plus ``during()``'s duration, called once the load is warm)."""
        for thread in self.threads:
            thread.start()
        time.sleep(2.0)
        started = time.perf_counter()
        self.gaps.clear()
        result = during() if during else None
        time.sleep(max(0.0, seconds - (time.perf_counter() - started)))
        self.stop.set()
        for thread in self.threads:
            thread.join(120)
        self.channel.close()
        return result


class RssSampler:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self) -> RssSampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join()


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98]


def start_service(var_dir: Path, address: str, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "services.generation", "serve", "--model", f"{DEFAULT_MODEL}:1", "--address", address,
         "--var-dir", str(var_dir), "--metrics-address", "", "--log-level", "WARNING", "--runner", "transformers"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if check_health(address) == "SERVING":
                return process
        except Exception:
            if process.poll() is not None:
                raise RuntimeError(f"the generation service exited; see {log}") from None
        time.sleep(0.5)
    raise RuntimeError("the generation service did not start within 300 s")


def convert_vs_save_pretrained(var_dir: Path, source: Path) -> tuple[float, float]:
    """(median convert seconds, median save_pretrained seconds), interleaved; the last conversion stays."""
    from transformers import AutoModelForCausalLM

    convert_s, save_s = [], []
    for repeat in range(REPEATS):
        with tempfile.TemporaryDirectory() as scratch:
            model = AutoModelForCausalLM.from_pretrained(source)
            started = time.perf_counter()
            model.save_pretrained(scratch)
            save_s.append(time.perf_counter() - started)
            del model
        started = time.perf_counter()  # in process, as save_pretrained is: the work, not Python's start-up
        assert convert.main(["--hf", str(source), "--name", CANDIDATE, "--var-dir", str(var_dir)]) == 0
        convert_s.append(time.perf_counter() - started)
        registry = ModelRegistry(VarLayout.from_env(var_dir).models)
        if repeat < REPEATS - 1:  # keep one candidate version only
            shutil.rmtree(registry.root / CANDIDATE)
    return statistics.median(convert_s), statistics.median(save_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    parser.add_argument("--window", type=float, default=20.0, help="seconds of each window (steady, swap)")
    args = parser.parse_args()
    var_dir = VarLayout.from_env().root / "bench" / "publish-var"
    shutil.rmtree(var_dir / "models" / CANDIDATE, ignore_errors=True)
    registry = ModelRegistry(VarLayout.from_env(var_dir).models)
    default = prepare_default(registry)
    converted_s, saved_s = convert_vs_save_pretrained(var_dir, default.path)
    candidate = f"{CANDIDATE}:{registry.versions(CANDIDATE)[-1]}"

    address = f"127.0.0.1:{free_port()}"
    process = start_service(var_dir, address, var_dir / "generation.log")
    try:
        Load(address, args.clients).run(args.window / 2)  # warm-up, discarded: the first window ran cold before
        steady = Load(address, args.clients)
        with RssSampler(process.pid) as steady_rss:
            steady.run(args.window)

        swap = Load(address, args.clients)
        admin = admin_pb2_grpc.ModelAdminStub(grpc.insecure_channel(address))
        generation = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(address))

        def publish() -> float:
            started = time.perf_counter()
            list(admin.LoadVersion(admin_pb2.LoadVersionRequest(model=candidate)))
            probe = generation_pb2.GenerateRequest(text="Hello", params=common_pb2.SamplingParams(max_new_tokens=1))
            for message in generation.Generate(probe):
                assert message.model == candidate, message.model
                return time.perf_counter() - started
            raise RuntimeError("the probe request produced no token")

        with RssSampler(process.pid) as swap_rss:
            to_first_token = swap.run(args.window, during=publish)
    finally:
        process.terminate()
        process.wait(60)

    assert steady.requests and swap.requests, "a window finished no request"
    assert candidate in swap.models, "no request of the swap window was served by the new version"
    report = BenchReport("publish")
    for name, load, rss in (("steady", steady, steady_rss), ("swap", swap, swap_rss)):
        report.add(
            name,
            system="nightcap",
            model="smollm2-135m",
            params={"clients": args.clients, "window_s": args.window, "new_tokens": NEW_TOKENS},
            metrics={
                "requests": load.requests,
                "failed_requests": len(load.failures),
                "p50_itl_ms": statistics.median(load.gaps) * 1000,
                "p99_itl_ms": p99(load.gaps) * 1000,
                "peak_rss_mb": rss.peak / 2**20,
            },
        )
    report.add(
        "convert",
        system="nightcap",
        model="smollm2-135m",
        params={"repeats": REPEATS},
        metrics={"convert_s": converted_s, "save_pretrained_s": saved_s},
    )
    report.ratio("swap_failed_requests", len(swap.failures))
    report.ratio("swap_p99_itl_vs_steady", p99(swap.gaps) / p99(steady.gaps))
    report.ratio("publish_to_first_new_token_s", to_first_token)
    report.ratio("convert_vs_save_pretrained", converted_s / saved_s)
    report.ratio("swap_peak_rss_vs_steady", swap_rss.peak / steady_rss.peak)
    report.write()
    if swap.failures:
        print("failures during the swap:", *sorted(set(swap.failures)), sep="\n  ")


if __name__ == "__main__":
    main()
