"""Chats driven from inside a host, for the cluster's fault scenarios (``bench.py``, tests/test_cluster.py).

An orchestrator runs in this process (no retrieval) in front of the generation address(es) given, and chats go to
it over loopback, so every byte between orchestrator and generation crosses the bridge and meets its faults. A
scenario that needs a fault put in mid-way writes a marker file into ``--out`` and waits for the caller's answer
file (``streaming`` -> ``partitioned``, then ``healed``); the result is ``<out>/result.json``.

    python -m deploy.netns.chatload replicas --generation 10.213.0.2:50051,10.213.0.3:50051 --out DIR
    python -m deploy.netns.chatload latency --generation 10.213.0.1:7300 --out DIR
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import grpc
import typer
from loguru import logger

from nightcap.v1 import chat_pb2, chat_pb2_grpc

CHAT_TIMEOUT_S = 300.0  # far beyond any answer here, on a busy 2-core machine: a chat that meets it counts as hung
MARKER_WAIT_S = 120.0


@dataclass
class ChatOutcome:
    """One chat as its user saw it: wall-clock times (seconds since the epoch, comparable across hosts)."""

    started: float
    status: str = "RUNNING"  # OK, a gRPC code's name, or RUNNING while (or when) it never ended
    details: str = ""
    first_token: float | None = None
    ended: float | None = None
    completion_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def tokens_per_s(self) -> float | None:
        if self.first_token is None or self.ended is None or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / max(1e-9, self.ended - self.first_token)


def chat(stub: chat_pb2_grpc.ChatStub, tokens: int, outcome: ChatOutcome, on_first: threading.Event | None = None):
    """One streamed chat of ``tokens`` tokens (EOS ignored), filling ``outcome`` as it goes."""
    request = chat_pb2.ChatRequest(
        message="Tell me about Zurich.", params={"max_new_tokens": tokens, "ignore_eos": True}
    )
    try:
        for response in stub.Chat(request, timeout=CHAT_TIMEOUT_S):
            if response.HasField("delta") and outcome.first_token is None:
                outcome.first_token = time.time()
                if on_first is not None:
                    on_first.set()
            if response.HasField("end"):
                outcome.completion_tokens = response.end.completion_tokens
        outcome.status = "OK"
    except grpc.RpcError as error:
        outcome.status, outcome.details = error.code().name, error.details() or ""
    finally:
        outcome.ended = time.time()
        if on_first is not None:
            on_first.set()


def start_chats(
    stub: chat_pb2_grpc.ChatStub, count: int, tokens: int
) -> tuple[list[ChatOutcome], list[threading.Thread]]:
    """``count`` chats at once, each on its own thread; returns once each has its first token (or ended)."""
    outcomes = [ChatOutcome(time.time()) for _ in range(count)]
    firsts = [threading.Event() for _ in range(count)]
    threads = [
        threading.Thread(target=chat, args=(stub, tokens, outcome, first), daemon=True)
        for outcome, first in zip(outcomes, firsts, strict=True)
    ]
    for thread in threads:
        thread.start()
    for first in firsts:
        first.wait(CHAT_TIMEOUT_S)
    return outcomes, threads


def wait_marker(folder: Path, name: str) -> float:
    """Waits for the caller's ``name`` file; returns the wall time written in it."""
    deadline = time.monotonic() + MARKER_WAIT_S
    marker = folder / name
    while not marker.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {marker} after {MARKER_WAIT_S} s")
        time.sleep(0.05)
    return float(marker.read_text().strip() or time.time())


def write_marker(folder: Path, name: str) -> None:
    temporary = folder / f".{name}"
    temporary.write_text(f"{time.time():.6f}\n")
    temporary.rename(folder / name)


class ServedBy:
    """Which replica served each chat, from the orchestrator's own log line (``... replica <host:port>``)."""

    def __init__(self) -> None:
        self.lines: list[tuple[float, str]] = []
        self._sink = logger.add(lambda message: self._seen(str(message)), level="INFO", format="{message}")

    def _seen(self, message: str) -> None:
        if " replica " in message:
            self.lines.append((time.time(), message.rsplit(" replica ", 1)[1].strip()))

    def since(self, when: float) -> list[str]:
        return [replica for at, replica in self.lines if at >= when]


def replicas_scenario(generation: str, out: Path, chats: int, tokens: int, after_s: float, interval: float) -> dict:
    """``chats`` long chats streaming over the replicas; the caller partitions one (``streaming`` ->
    ``partitioned``); new short chats every ``interval`` s for ``after_s`` s; the caller heals it (``healed``); new
    chats until the healed replica serves one again."""
    from services.orchestrator.server import start_chat_server

    served = ServedBy()
    orchestrator = start_chat_server(generation, None, "127.0.0.1:0", backend_timeout=10)
    channel = grpc.insecure_channel(orchestrator.address)
    stub = chat_pb2_grpc.ChatStub(channel)
    try:
        replicas = len(generation.split(","))
        warming = time.time()
        while len(set(served.since(warming))) < replicas and time.time() < warming + 120:
            chat(stub, 2, ChatOutcome(time.time()))  # until every replica has served one (it may still be loading)
            time.sleep(0.2)
        in_flight, threads = start_chats(stub, chats, tokens)
        write_marker(out, "streaming")
        partitioned = wait_marker(out, "partitioned")
        later: list[ChatOutcome] = []
        while time.time() < partitioned + after_s:
            later.append(ChatOutcome(time.time()))
            threads.append(threading.Thread(target=chat, args=(stub, 8, later[-1]), daemon=True))
            threads[-1].start()
            time.sleep(interval)
        write_marker(out, "after")
        healed = wait_marker(out, "healed")
        back: list[ChatOutcome] = []
        recovered = None
        while recovered is None and time.time() < healed + 60:  # one short chat every 0.2 s, none waited for
            back.append(ChatOutcome(time.time()))
            threads.append(threading.Thread(target=chat, args=(stub, 4, back[-1]), daemon=True))
            threads[-1].start()
            time.sleep(0.2)
            if len(set(served.since(healed))) == replicas:
                recovered = time.time() - healed  # the healed replica has answered a chat: at most this
        for thread in threads:
            thread.join(max(0.0, partitioned + CHAT_TIMEOUT_S + 5 - time.time()))
    finally:
        channel.close()
        orchestrator.stop(grace=0)
    result = {
        "partitioned_at": partitioned,
        "healed_at": healed,
        "in_flight": [asdict(o) for o in in_flight],
        "after": [asdict(o) for o in later],
        "back": [asdict(o) for o in back],
        "seconds_to_recover": recovered,
        "served_after_heal": served.since(healed),
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def latency_scenario(generation: str, out: Path, chats: int, tokens: int) -> dict:
    """``chats`` chats one after another (after one to warm up): each one's TTFT and decode tokens/s."""
    from services.orchestrator.server import start_chat_server

    orchestrator = start_chat_server(generation, None, "127.0.0.1:0", backend_timeout=30)
    channel = grpc.insecure_channel(orchestrator.address)
    stub = chat_pb2_grpc.ChatStub(channel)
    outcomes = []
    try:
        chat(stub, 2, ChatOutcome(time.time()))
        for _ in range(chats):
            outcomes.append(ChatOutcome(time.time()))
            chat(stub, tokens, outcomes[-1])
    finally:
        channel.close()
        orchestrator.stop(grace=0)
    answered = [o for o in outcomes if o.status == "OK" and o.ttft is not None]
    result = {
        "chats": chats,
        "answered": len(answered),
        "failed": [f"{o.status}: {o.details}" for o in outcomes if o.status != "OK"],
        "ttft_ms_median": 1000 * statistics.median(o.ttft for o in answered) if answered else None,
        "ttft_ms_max": 1000 * max(o.ttft for o in answered) if answered else None,
        "tokens_per_s_median": statistics.median(o.tokens_per_s for o in answered if o.tokens_per_s)
        if answered
        else None,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Chats driven from inside a host.")
Generation = Annotated[str, typer.Option(help="The generation service's address(es), as the orchestrator takes them.")]
Out = Annotated[Path, typer.Option(help="A folder for the markers and result.json.")]


@app.command()
def replicas(
    generation: Generation,
    out: Out,
    chats: Annotated[int, typer.Option(help="Long chats streaming when the partition comes.")] = 32,
    tokens: Annotated[int, typer.Option(help="Tokens each long chat asks for.")] = 900,
    after_s: Annotated[float, typer.Option(help="Seconds of new chats after the partition.")] = 12.0,
    interval: Annotated[float, typer.Option(help="Seconds between new chats after the partition.")] = 0.25,
) -> None:
    """The replica partition scenario (the caller puts in the partition and heals it)."""
    replicas_scenario(generation, out, chats, tokens, after_s, interval)


@app.command()
def latency(
    generation: Generation,
    out: Out,
    chats: Annotated[int, typer.Option(help="Chats, one after another.")] = 5,
    tokens: Annotated[int, typer.Option(help="Tokens each chat asks for.")] = 64,
) -> None:
    """TTFT and tokens/s of chats one at a time."""
    latency_scenario(generation, out, chats, tokens)


if __name__ == "__main__":
    app()
