"""Soak: many concurrent chat sessions against a running `make up` stack, each service killed once.

    python tests/bench/soak.py --duration 600          # what `make soak` runs after `make up`

Sessions are drawn with a fixed seed: 1-4 turns with their history, retrieval on or off, some cancelled
mid-stream, some with a deadline too short to finish. Every 10 s it samples each service's RSS, threads
and open fds; spread over the run it sends SIGKILL to each service in turn (generation replicas, retrieval,
orchestrator) and times how long until it is SERVING again and a chat succeeds. Results, with every error
by code and whether it was expected, go to var/bench/soak.json.

Expected outcomes: OK; CANCELLED for a session that cancels; DEADLINE_EXCEEDED for a short deadline;
UNAVAILABLE while a killed service is down (until 30 s after it is back). Anything else is unexpected.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil
from tqdm import tqdm

from deploy.supervisor import RunFolder, Supervisord, health
from nightcap.v1 import chat_pb2, chat_pb2_grpc
from services.common.paths import VarLayout

QUESTIONS = [
    "Where is Zurich?",
    "What is the capital of France?",
    "Tell me about the Alps.",
    "Who was Albert Einstein?",
    "What is the Rhine?",
    "Name a city in Austria.",
    "What language is spoken in Geneva?",
    "Why is the sky blue?",
]
RECOVERY_WINDOW_S = 30.0  # after a killed service is SERVING again, chats must succeed within this


@dataclass
class Kill:
    service: str
    pid: int
    at: float
    back_at: float | None = None  # SERVING again under a new pid
    first_ok_at: float | None = None  # first chat that succeeded after back_at

    def covers(self, moment: float) -> bool:
        end = (self.back_at or float("inf")) + RECOVERY_WINDOW_S
        return self.at <= moment <= end


@dataclass
class Soak:
    address: str
    supervisord: Supervisord
    started: float = field(default_factory=time.monotonic)
    outcomes: Counter = field(default_factory=Counter)
    unexpected: list[dict[str, Any]] = field(default_factory=list)
    kills: list[Kill] = field(default_factory=list)
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def now(self) -> float:
        return time.monotonic() - self.started

    def record(self, kind: str, code: str, details: str, at: float) -> None:
        expected = (
            code == "OK"
            or (kind == "cancel" and code == "CANCELLED")
            or (kind == "short-deadline" and code == "DEADLINE_EXCEEDED")
            or (code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") and any(k.covers(at) for k in self.kills))
        )
        with self.lock:
            self.outcomes[f"{kind}:{code}"] += 1
            if code == "OK":
                for kill in self.kills:
                    if kill.back_at is not None and kill.first_ok_at is None and at >= kill.back_at:
                        kill.first_ok_at = at
            if not expected:
                self.unexpected.append({"t": round(at, 1), "kind": kind, "code": code, "details": details[:300]})


def session(soak: Soak, stub: chat_pb2_grpc.ChatStub, rng: random.Random, max_new_tokens: int) -> None:
    """One conversation of 1-4 turns; its kind decides how its turns end."""
    kind = rng.choices(["normal", "cancel", "short-deadline"], weights=[8, 1, 1])[0]
    retrieval = rng.random() < 0.5
    history: list[chat_pb2.ChatMessage] = []
    for _ in range(rng.randint(1, 4)):
        question = rng.choice(QUESTIONS)
        request = chat_pb2.ChatRequest(
            message=question,
            history=history,
            retrieval=retrieval,
            params={"max_new_tokens": max_new_tokens, "temperature": 0.6, "seed": rng.randrange(1 << 30)},
        )
        timeout = rng.uniform(0.2, 1.5) if kind == "short-deadline" else 300.0
        answer, code, details = [], "OK", ""
        call = stub.Chat(request, timeout=timeout)
        try:
            for response in call:
                if response.HasField("delta"):
                    answer.append(response.delta)
                    if kind == "cancel" and len(answer) >= 2:
                        call.cancel()
        except grpc.RpcError as error:
            code, details = error.code().name, error.details() or ""
        soak.record(kind, code, details, soak.now())
        if code == "UNAVAILABLE":
            time.sleep(1.0)  # as a client backs off; without it a down orchestrator is hammered in a tight loop
        if code != "OK" or soak.stop.is_set():
            return
        history += [
            chat_pb2.ChatMessage(role=chat_pb2.ROLE_USER, content=question),
            chat_pb2.ChatMessage(role=chat_pb2.ROLE_ASSISTANT, content="".join(answer)),
        ]


def chatter(soak: Soak, seed: int, max_new_tokens: int) -> None:
    rng = random.Random(seed)
    with grpc.insecure_channel(soak.address) as channel:
        stub = chat_pb2_grpc.ChatStub(channel)
        while not soak.stop.is_set():
            session(soak, stub, rng, max_new_tokens)


def sample(soak: Soak, every: float) -> None:
    while not soak.stop.wait(0 if not soak.samples else every):
        for name, state in soak.supervisord.states().items():
            entry: dict[str, Any] = {"t": round(soak.now(), 1), "pid": state.pid}
            try:
                process = psutil.Process(state.pid)
                entry.update(
                    rss_mb=round(process.memory_info().rss / 2**20, 1),
                    threads=process.num_threads(),
                    fds=process.num_fds(),
                )
            except (psutil.Error, ValueError):
                entry["down"] = True
            with soak.lock:
                soak.samples.setdefault(name, []).append(entry)


def kill_in_turn(soak: Soak, services: list[str], duration: float) -> None:
    """SIGKILL each service at evenly spaced moments, then wait for it to be SERVING under a new pid."""
    specs = {spec.name: spec for spec in soak.supervisord.specs()}
    for n, name in enumerate(services):
        if soak.stop.wait(max(0.0, duration * (n + 1) / (len(services) + 1) - soak.now())):
            return
        pid = soak.supervisord.states()[name].pid
        kill = Kill(name, pid, soak.now())
        with soak.lock:
            soak.kills.append(kill)
        tqdm.write(f"[{kill.at:6.1f}s] SIGKILL {name} (pid {pid})")
        os.kill(pid, signal.SIGKILL)
        while not soak.stop.is_set():
            state = soak.supervisord.states()[name]
            if state.pid and state.pid != pid and health(specs[name].address) == "SERVING":
                kill.back_at = soak.now()
                tqdm.write(f"[{kill.back_at:6.1f}s] {name} SERVING again (pid {state.pid})")
                break
            time.sleep(0.5)


def summarize(soak: Soak, duration: float, warmup: float) -> dict[str, Any]:
    resources = {}
    for name, series in soak.samples.items():
        live = [s for s in series if "rss_mb" in s]
        after_warmup = next((s for s in live if s["t"] >= warmup), None)
        last = live[-1] if live else None
        if after_warmup and last:
            resources[name] = {
                key: {
                    "after_warmup": after_warmup[key],
                    "end": last[key],
                    "end_vs_warmup": round(last[key] / max(after_warmup[key], 1), 3),
                }
                for key in ("rss_mb", "threads", "fds")
            }
    codes = Counter()
    for key, count in soak.outcomes.items():
        codes[key.split(":")[1]] += count
    return {
        "duration_s": duration,
        "requests": sum(soak.outcomes.values()),
        "errors_by_code": {code: n for code, n in codes.items() if code != "OK"},
        "outcomes_by_kind": dict(soak.outcomes),
        "unexpected_errors": len(soak.unexpected),
        "unexpected_examples": soak.unexpected[:20],
        "kills": [
            {
                "service": k.service,
                "at_s": round(k.at, 1),
                "back_serving_after_s": round(k.back_at - k.at, 1) if k.back_at else None,
                "first_ok_chat_after_back_s": round(k.first_ok_at - k.back_at, 1) if k.first_ok_at else None,
            }
            for k in soak.kills
        ],
        "restarts": {name: len(exits) for name, exits in soak.supervisord.exits().items()},
        "resources_end_vs_warmup": resources,
        "series": soak.samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=os.environ.get("NIGHTCAP_ADDRESS", "127.0.0.1:50050"))
    parser.add_argument("--var-dir", default=None, help="the stack's var dir (NIGHTCAP_VAR; default ./var)")
    parser.add_argument("--duration", type=float, default=float(os.environ.get("SOAK_DURATION", 600)))
    parser.add_argument("--concurrency", type=int, default=64, help="chat sessions running at once")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between resource samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the resource baseline")
    parser.add_argument("--no-kill", action="store_true", help="do not kill services")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    layout = VarLayout.from_env(args.var_dir)
    supervisord = Supervisord(RunFolder(layout))
    if supervisord.process() is None:
        sys.exit(f"no stack is up for {layout.root}: run `make up` first")
    soak = Soak(args.address, supervisord)
    services = [] if args.no_kill else [spec.name for spec in supervisord.specs()]
    threads = [threading.Thread(target=sample, args=(soak, args.sample_every), daemon=True)]
    threads.append(threading.Thread(target=kill_in_turn, args=(soak, services, args.duration), daemon=True))
    threads += [
        threading.Thread(target=chatter, args=(soak, args.seed * 1000 + n, args.max_new_tokens), daemon=True)
        for n in range(args.concurrency)
    ]
    for thread in threads:
        thread.start()
    with tqdm(total=int(args.duration), unit="s", desc=f"soak x{args.concurrency}") as bar:
        while soak.now() < args.duration:
            time.sleep(1)
            bar.n = int(soak.now())
            bar.set_postfix(requests=sum(soak.outcomes.values()), unexpected=len(soak.unexpected))
    soak.stop.set()
    for thread in threads:
        thread.join(330)
    report = summarize(soak, args.duration, args.warmup)
    out = layout.bench / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    shown = {k: v for k, v in report.items() if k not in ("series", "unexpected_examples")}
    print(json.dumps(shown, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
