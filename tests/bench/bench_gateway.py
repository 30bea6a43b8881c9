"""What the HTTP gateway costs: streaming chats through it with the async openai SDK, against the same chats
sent straight to the orchestrator over gRPC (grpc.aio), on one stack.

The stack runs as subprocesses, as `make up` runs it: generation (the embedded SmolLM2-135M), the orchestrator
(no retrieval, so both sides do the same work) and the gateway. For CONCURRENCY in 16 and 64, each round runs
the same work on both systems, the order alternating between rounds, after a discarded warm-up of each: every
caller sends REQUESTS greedy chats of NEW_TOKENS tokens back to back. tokens/s is the completion tokens over
the wall time of the whole batch; TTFT is request to first text. Both sides must generate the same tokens for
the same question (greedy), and every request must finish: the script fails otherwise.

    python tests/bench/bench_gateway.py [--rounds 2] [--requests 2] [--rows gateway orchestrator]
        [--orchestrator-turns 48] [--orchestrator-busy 0 4]

Writes var/bench/gateway.json: n<N>/gateway_vs_grpc_tokens_per_s and n<N>/gateway_added_ttft_p50_ms (N = 1, 16,
64), and each process's CPU seconds per 1000 tokens (client, generation, orchestrator, gateway): on 2 shared cores
the model takes all the CPU there is, so whatever the gateway and the SDK spend comes out of its tokens/s.

The orchestrator row: the time to first text of a chat turn (a new message after two earlier turns, no
retrieval) through the orchestrator, which renders, counts and tokenizes the prompt with the served model's
tokenizer, against the same prompt sent straight to Generate as text (the generation service tokenizes it):
what preparing a turn adds. One caller, ORCHESTRATOR_TURNS turns each, alternating turn by turn, each message new
(no count is remembered from an earlier chat, no whole prompt is in the prefix cache), on an idle generation
service and beside 4 streams that keep it decoding (--orchestrator-busy); both must first give the same answer to
the same messages (greedy), or the script fails. Ratio: busy<N>/orchestrator_added_ttft_p50_ms, the median of
the paired differences. (Counting with a Tokenize call per new piece, as the orchestrator did before it held the
tokenizer, measured 0.2 to 3.8 ms more than this on an idle service and 0.6 ms more beside 4 streams.)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import openai
import psutil
from report import BenchReport

from clients.client import check_health
from nightcap.v1 import chat_pb2, chat_pb2_grpc, common_pb2, generation_pb2, generation_pb2_grpc
from services.common.registry import ModelRegistry
from services.common.server import free_port
from services.generation.loading import DEFAULT_MODEL, prepare_default

ROOT = Path(__file__).resolve().parents[2]
NEW_TOKENS = 24
QUESTIONS = ["Where is Zurich?", "What is the capital of France?", "Name a river in Germany.", "What is a cat?"]
ORCHESTRATOR_NEW_TOKENS = 4  # the row measures the time to first text; a few tokens check the answers agree
ORCHESTRATOR_TURNS = 48  # measured turns per system
BACKGROUND_NEW_TOKENS = 256  # each busy stream's answers
# the conversation each measured message follows
EARLIER = [
    ("user", "Hello! I am planning a trip to Switzerland next spring."),
    ("assistant", "That sounds lovely. Switzerland has mountains, lakes and old towns to visit."),
    ("user", "Which cities should I see first?"),
    ("assistant", "Zurich, Geneva, Bern and Lucerne are good places to start."),
]


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *command], stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)


def wait_healthy(check, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not become healthy in {timeout:.0f} s")


class Batch:
    """What one system did with one round's work: tokens, time to first text, failures, output lengths."""

    def __init__(self, requests_per_caller: int) -> None:
        self.requests_per_caller = requests_per_caller
        self.tokens = 0
        self.seconds = 0.0
        self.ttfts: list[float] = []
        self.failures: list[str] = []
        self.outputs: dict[str, set[int]] = {}
        self.cpu_s: dict[str, float] = {}  # CPU seconds each process spent on this batch

    def record(self, question: str, tokens: int, ttft: float) -> None:
        self.tokens += tokens
        self.ttfts.append(ttft)
        self.outputs.setdefault(question, set()).add(tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


async def gateway_caller(client: openai.AsyncOpenAI, number: int, batch: Batch) -> None:
    for _ in range(batch.requests_per_caller):
        question = QUESTIONS[number % len(QUESTIONS)]
        began, first = time.monotonic(), None
        try:
            stream = await client.chat.completions.create(
                model="",
                messages=[{"role": "user", "content": question}],
                max_tokens=NEW_TOKENS,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"retrieval": False},
            )
            usage = None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.monotonic()
                usage = chunk.usage or usage
            if usage is None:
                raise RuntimeError("no usage chunk")
            batch.record(question, usage.completion_tokens, (first or time.monotonic()) - began)
        except Exception as error:
            batch.failures.append(f"gateway: {type(error).__name__}: {error}")


async def grpc_caller(stub: chat_pb2_grpc.ChatStub, number: int, batch: Batch) -> None:
    for _ in range(batch.requests_per_caller):
        question = QUESTIONS[number % len(QUESTIONS)]
        began, first, tokens = time.monotonic(), None, None
        request = chat_pb2.ChatRequest(
            message=question,
            params=common_pb2.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, top_k=40, top_p=1.0),
        )
        try:
            async for message in stub.Chat(request):
                if message.HasField("delta") and message.delta and first is None:
                    first = time.monotonic()
                if message.HasField("end"):
                    tokens = message.end.completion_tokens
            if tokens is None:
                raise RuntimeError("no end message")
            batch.record(question, tokens, (first or time.monotonic()) - began)
        except grpc.aio.AioRpcError as error:
            batch.failures.append(f"grpc: {error.code().name}: {error.details()}")


def orchestrator_message(number: int) -> str:
    """A message no earlier chat sent: its tokens are counted anew, as a new user message's are, and no whole prompt
    is in the prefix cache (the earlier turns are, for every system alike)."""
    return f"{QUESTIONS[number % len(QUESTIONS)]} (question {number})"


async def orchestrator_turn(stub: chat_pb2_grpc.ChatStub, message: str) -> tuple[float, str]:
    """(time to first text, the answer) of one chat turn through the orchestrator."""
    roles = {"user": chat_pb2.ROLE_USER, "assistant": chat_pb2.ROLE_ASSISTANT}
    request = chat_pb2.ChatRequest(
        message=message,
        history=[chat_pb2.ChatMessage(role=roles[role], content=text) for role, text in EARLIER],
        params=common_pb2.SamplingParams(max_new_tokens=ORCHESTRATOR_NEW_TOKENS, temperature=0),
    )
    began, first, text = time.monotonic(), None, []
    async for response in stub.Chat(request):
        if response.HasField("delta") and response.delta:
            first = first or time.monotonic()
            text.append(response.delta)
    return (first or time.monotonic()) - began, "".join(text)


async def generate_turn(stub: generation_pb2_grpc.GenerationStub, prompt: str) -> tuple[float, str]:
    """(time to first text, the answer) of the same turn's prompt sent straight to Generate as text."""
    params = common_pb2.SamplingParams(max_new_tokens=ORCHESTRATOR_NEW_TOKENS, temperature=0)
    began, first, text = time.monotonic(), None, []
    async for response in stub.Generate(generation_pb2.GenerateRequest(text=prompt, params=params)):
        if response.text:
            first = first or time.monotonic()
            text.append(response.text)
    return (first or time.monotonic()) - began, "".join(text)


async def one_turn(system: str, channel: grpc.aio.Channel, message: str, render) -> tuple[float, str]:
    if system == "generate":
        return await generate_turn(generation_pb2_grpc.GenerationStub(channel), render(message))
    return await orchestrator_turn(chat_pb2_grpc.ChatStub(channel), message)


async def background_stream(stub: generation_pb2_grpc.GenerationStub, number: int) -> None:
    """Keeps the generation service busy: one long greedy answer after another, until cancelled."""
    params = common_pb2.SamplingParams(max_new_tokens=BACKGROUND_NEW_TOKENS, temperature=0, ignore_eos=True)
    while True:
        request = generation_pb2.GenerateRequest(text=f"{QUESTIONS[number % len(QUESTIONS)]} ({number})", params=params)
        async for _ in stub.Generate(request):
            pass


async def interleaved_turns(
    addresses: dict[str, str], render, numbers: list[int], load: int = 0, generation: str = ""
) -> dict[str, list[float]]:
    """Each system's time to first text, one turn per system per number, one turn at a time, the systems' order
    rotating: on shared cores the load moves while a benchmark runs, and turn-by-turn alternation gives each system
    the same share of it. Each system gets its own messages. ``load``: streams kept generating meanwhile on the
    generation service at ``generation``."""
    systems = list(addresses)
    channels = {system: grpc.aio.insecure_channel(address) for system, address in addresses.items()}
    ttfts: dict[str, list[float]] = {system: [] for system in systems}
    busy = grpc.aio.insecure_channel(generation) if load else None
    background = [
        asyncio.ensure_future(background_stream(generation_pb2_grpc.GenerationStub(busy), n)) for n in range(load)
    ]
    try:
        if background:
            await asyncio.sleep(1.0)  # the streams are decoding
        for position, number in enumerate(numbers):
            for offset in range(len(systems)):
                system = systems[(position + offset) % len(systems)]
                message = orchestrator_message(number * len(systems) + systems.index(system))
                ttfts[system].append((await one_turn(system, channels[system], message, render))[0])
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        for channel in [*channels.values(), *([busy] if busy else [])]:
            await channel.close()
    return ttfts


def orchestrator_rows(
    report: BenchReport, addresses: dict[str, str], registry: ModelRegistry, turns: int, loads: list[int]
) -> None:
    """The orchestrator row (see the module's docstring), on the stack's generation service and orchestrator."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(registry.resolve(DEFAULT_MODEL).path)
    earlier = [{"role": role, "content": text} for role, text in EARLIER]

    def render(message: str) -> str:
        messages = [*earlier, {"role": "user", "content": message}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    targets = {system: addresses[system] for system in ORCHESTRATOR_SYSTEMS}
    # Greedy: the same answer to the same message whichever way it came (the orchestrator's token ids are the
    # service's own); then a warm-up, discarded; then the measured turns.
    for message in [orchestrator_message(n) for n in range(1_000_000, 1_000_004)]:
        texts = {system: asyncio.run(_answer(system, address, message, render)) for system, address in targets.items()}
        if len(set(texts.values())) > 1:
            raise SystemExit(f"{message!r}: the answers differ: {texts}")
    first = 2_000_000
    for load in loads:
        print(f"orchestrator row: {turns} turns per system, interleaved, beside {load} busy streams", flush=True)
        warm = list(range(first, first + 8))
        asyncio.run(interleaved_turns(targets, render, warm, load, addresses["generation"]))
        numbers = list(range(first + 8, first + 8 + turns))
        first += 8 + turns
        measured = asyncio.run(interleaved_turns(targets, render, numbers, load, addresses["generation"]))
        ttfts = {system: [ttft * 1000 for ttft in values] for system, values in measured.items()}
        for system, values in ttfts.items():
            report.add(
                "chat-turn-ttft",
                system=ORCHESTRATOR_SYSTEMS[system],
                model=DEFAULT_MODEL,
                params={"busy_streams": load, "new_tokens": ORCHESTRATOR_NEW_TOKENS, "history_messages": len(EARLIER)},
                metrics={
                    "ttft_p50_ms": round(statistics.median(values), 1),
                    "ttft_p90_ms": round(statistics.quantiles(values, n=10)[-1], 1),
                    "requests": len(values),
                },
            )
            print(f"  {system:<22} TTFT p50 {statistics.median(values):.1f} ms over {len(values)} turns", flush=True)

        def paired(system: str, baseline: str, ttfts=ttfts) -> float:
            return statistics.median(a - b for a, b in zip(ttfts[system], ttfts[baseline], strict=True))

        report.ratio(f"busy{load}/orchestrator_added_ttft_p50_ms", paired("orchestrator", "generate"))


async def _answer(system: str, address: str, message: str, render) -> str:
    async with grpc.aio.insecure_channel(address) as channel:
        return (await one_turn(system, channel, message, render))[1]


# system -> what the report calls it
ORCHESTRATOR_SYSTEMS = {
    "orchestrator": "nightcap-orchestrator",
    "generate": "nightcap-generate-text",
}


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: sum(process.cpu_times()[:2]) for name, process in processes.items()}


async def run_batch(
    system: str, concurrency: int, requests: int, gateway: str, orchestrator: str, processes: dict[str, psutil.Process]
) -> Batch:
    batch = Batch(requests)
    cpu_before = cpu_seconds(processes)
    began = time.monotonic()
    if system == "gateway":
        client = openai.AsyncOpenAI(
            base_url=f"{gateway}/v1",
            api_key="unused",
            max_retries=0,
            timeout=120,
            http_client=openai.DefaultAsyncHttpxClient(limits=httpx.Limits(max_connections=concurrency + 8)),
        )
        try:
            await asyncio.gather(*(gateway_caller(client, n, batch) for n in range(concurrency)))
        finally:
            await client.close()
    else:
        async with grpc.aio.insecure_channel(orchestrator) as channel:
            stub = chat_pb2_grpc.ChatStub(channel)
            await asyncio.gather(*(grpc_caller(stub, n, batch) for n in range(concurrency)))
    batch.seconds = time.monotonic() - began
    batch.cpu_s = {name: after - cpu_before[name] for name, after in cpu_seconds(processes).items()}
    cpu = " ".join(f"{name} {seconds:.1f}" for name, seconds in batch.cpu_s.items())
    print(
        f"  {system:<8} n={concurrency:<3} {len(batch.ttfts)} chats, {batch.tokens} tokens in {batch.seconds:.1f} s"
        f" ({batch.tokens / batch.seconds:.1f} tokens/s, {len(batch.failures)} failures; CPU s: {cpu})",
        flush=True,
    )
    return batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2, help="chats each caller sends per round")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="streaming callers")
    parser.add_argument(
        "--rows",
        nargs="+",
        choices=["gateway", "orchestrator"],
        default=["gateway", "orchestrator"],
        help="what to run",
    )
    parser.add_argument(
        "--orchestrator-turns", type=int, default=ORCHESTRATOR_TURNS, help="measured turns per system, orchestrator row"
    )
    parser.add_argument(
        "--orchestrator-busy", type=int, nargs="+", default=[0, 4], help="streams generating beside the measured turns"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    registry = ModelRegistry(work / "models")
    prepare_default(registry)
    addresses = {name: f"127.0.0.1:{free_port()}" for name in ("generation", "orchestrator", "gateway")}
    addresses["generate"] = addresses["generation"]  # the orchestrator row's baseline: Generate, straight
    processes = [
        start(
            [
                "services.generation",
                "serve",
                "--model",
                DEFAULT_MODEL,
                "--var-dir",
                str(work),
                "--address",
                addresses["generation"],
                "--metrics-address",
                "127.0.0.1:0",
            ],
            work / "generation.log",
        ),
        start(
            [
                "services.orchestrator",
                "serve",
                "--address",
                addresses["orchestrator"],
                "--generation",
                addresses["generation"],
                "--retrieval",
                "",
            ],
            work / "orchestrator.log",
        ),
        start(
            [
                "services.gateway",
                "serve",
                "--address",
                addresses["gateway"],
                "--orchestrator",
                addresses["orchestrator"],
                "--generation",
                addresses["generation"],
                "--retrieval",
                "",
                "--log-level",
                "WARNING",
            ],
            work / "gateway.log",
        ),
    ]
    gateway = f"http://{addresses['gateway']}"
    watched = {
        "client": psutil.Process(),
        **{
            name: psutil.Process(p.pid)
            for name, p in zip(("generation", "orchestrator", "gateway"), processes, strict=True)
        },
    }
    report = BenchReport("gateway")
    try:
        wait_healthy(lambda: check_health(addresses["generation"]) == "SERVING", "generation")
        wait_healthy(lambda: httpx.get(f"{gateway}/health", timeout=2).status_code == 200, "the gateway")
        if "orchestrator" in args.rows:
            orchestrator_rows(report, addresses, registry, args.orchestrator_turns, args.orchestrator_busy)
        for concurrency in args.concurrency if "gateway" in args.rows else []:
            print(f"concurrency {concurrency}: warm-up of both, then {args.rounds} interleaved rounds", flush=True)
            for system in ("gateway", "grpc"):  # warm both the same way, discarded
                asyncio.run(run_batch(system, concurrency, 1, gateway, addresses["orchestrator"], watched))
            paired_rate, paired_ttft = [], []
            measured: dict[str, list[Batch]] = {"gateway": [], "grpc": []}
            for round_number in range(args.rounds):
                order = ("gateway", "grpc") if round_number % 2 == 0 else ("grpc", "gateway")
                batches = {}
                for system in order:
                    # one caller alone gets 8 chats, so its TTFT (no queueing: the gateway's own latency) is a median
                    chats = max(args.requests, 8 // concurrency)
                    batches[system] = asyncio.run(
                        run_batch(system, concurrency, chats, gateway, addresses["orchestrator"], watched)
                    )
                    failures = batches[system].failures
                    if failures:
                        raise SystemExit(f"{system} at {concurrency}: {len(failures)} failures, e.g. {failures[0]}")
                    measured[system].append(batches[system])
                rates = {s: w.tokens_per_s for s, w in batches.items()}
                paired_rate.append(rates["gateway"] / rates["grpc"])
                ttft = {s: statistics.median(w.ttfts) * 1000 for s, w in batches.items()}
                paired_ttft.append(ttft["gateway"] - ttft["grpc"])
            for question in QUESTIONS:  # greedy: the same tokens whichever way the chat came in
                lengths = {n for s in measured.values() for w in s for n in w.outputs.get(question, set())}
                if len(lengths) > 1:
                    raise SystemExit(f"{question!r}: token counts differ between the systems: {sorted(lengths)}")
            for system, batches_of in measured.items():
                report.add(
                    "stream-chat",
                    system="nightcap-gateway" if system == "gateway" else "nightcap-grpc",
                    model=DEFAULT_MODEL,
                    params={
                        "concurrency": concurrency,
                        "new_tokens": NEW_TOKENS,
                        "chats_per_caller": max(args.requests, 8 // concurrency),
                    },
                    metrics={
                        "tokens_per_s": round(statistics.median(w.tokens_per_s for w in batches_of), 1),
                        "ttft_p50_ms": round(
                            statistics.median(statistics.median(w.ttfts) for w in batches_of) * 1000, 1
                        ),
                        "requests": sum(len(w.ttfts) for w in batches_of),
                        **{
                            f"cpu_s_per_1k_tokens_{name}": round(
                                statistics.median(w.cpu_s[name] / w.tokens * 1000 for w in batches_of), 2
                            )
                            for name in watched
                        },
                    },
                )
            report.ratio(f"n{concurrency}/gateway_vs_grpc_tokens_per_s", statistics.median(paired_rate))
            report.ratio(f"n{concurrency}/gateway_added_ttft_p50_ms", statistics.median(paired_ttft))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
    report.write()


if __name__ == "__main__":
    main()
