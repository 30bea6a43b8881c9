"""Speculative decoding drafted from the prompt, on grounded prompts: nightcap with it against nightcap without,
and (llama.cpp runner) against llama.cpp's own llama-server, plain and with its own n-gram drafting.

The workload is make eval's: its single questions (tests/eval/questions.json), each asked with three passages of
the default corpus (its source article's first passage and two others, numbered, the citing style of the
orchestrator) in the model's chat template, greedy, up to --max-tokens (make eval's 64) new tokens; an answer
ends at its end-of-sequence token, as a user's does. N=1 sends the questions one at a time (decode tokens/s:
tokens after the first over the time from the first to the last, summed over the questions); N=16 sends 16 at
once (tokens/s of wall time). Every question of a round goes to every server.

Servers, each its own process on the same GGUF (the default model's Q4_1): nightcap `serve --runner <runner>`
with its speculation defaults ("spec") and with --speculative-tokens 0 ("off"); for the llama.cpp runner, when
llama-server is built (tests/bench/peers_build.py, var/peers), llama-server with its defaults for this CPU
(weight repacking on; --llama-args to change) and the same with --spec-type ngram-simple ("llama-server-ngram",
when the vendored build knows the flag); with --baseline PATH, also the `serve` of another nightcap checkout
(a previous revision) with its speculation defaults ("baseline"). All get --threads.

Checked: every stream's streamed tokens equal what its server reported; spec and off give the same greedy
tokens, and where they do not (scoring k+1 positions in one forward may round differently), the differing
answers are counted and reported (`answers_differ`). Fairness: one throwaway request warms each server; the
servers take turns within a round and the order rotates between rounds; ratios are medians of the rounds'
paired ratios, nightcap-spec over the other (above 1: spec faster).

    python tests/bench/bench_speculation.py [--runners llamacpp transformers] [--rounds 3] [--concurrency 1 16]

Writes var/bench/speculation.json with ratios <runner>/grounded_n1_spec_vs_off, <runner>/grounded_n16_spec_vs_off,
(with --baseline) <runner>/grounded_nN_spec_vs_baseline, llamacpp/grounded_n1_vs_llama_server and
llamacpp/grounded_n1_vs_llama_server_ngram, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_generation import Timings
from bench_peers import REQUEST_TIMEOUT_S, LlamaServer, NightcapServer, Stream, concurrently
from peers_build import BuildError, ensure_built
from report import BenchReport
from transformers import AutoTokenizer

from nightcap.v1 import common_pb2, generation_pb2
from services.common.paths import VarLayout
from services.generation.loading import default_gguf_path
from services.orchestrator.prompts import ChatTemplatePrompt, ContextPassage, ContextStyle, Turn
from services.retrieval.chunker import passages_of
from services.retrieval.corpus import read_wikipedia_summaries

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ROOT / "tests" / "eval" / "questions.json"
CITING = ContextStyle(numbered=True, cite=True)  # the orchestrator's grounded prompt: numbered, cited


def grounded_prompts(tokenizer, count: int) -> list[list[int]]:
    """make eval's single questions with their source article's first passage and the next two questions'."""
    items = json.loads(QUESTIONS.read_text())["single"]
    titles = list(dict.fromkeys(item["source"] for item in items))
    first = {}
    for document in read_wikipedia_summaries(titles=titles):
        passage = next(passages_of(document))
        first[document.title] = ContextPassage(passage.title, passage.text, "wikipedia")
    prompt = ChatTemplatePrompt(tokenizer.chat_template, style=CITING)
    prompts = []
    for i, item in enumerate(items[:count]):
        others = [items[(i + j) % len(items)]["source"] for j in (1, 2)]
        context = tuple(first[t] for t in [item["source"], *others])
        text = prompt.render([Turn("user", item["question"], context=context)])
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


class Answer(Stream):
    """A stream that may end before --max-tokens (at the answer's end-of-sequence token)."""

    def check(self, system: str, asked: int) -> None:
        if len(self.tokens) != self.reported_tokens or not 0 < len(self.tokens) <= asked:
            raise RuntimeError(f"{system} streamed {len(self.tokens)} tokens and reported {self.reported_tokens}")


class Nightcap(NightcapServer):
    def stream(self, _: None, prompt: list[int], new_tokens: int) -> Stream:
        request = generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=prompt),
            params=common_pb2.SamplingParams(max_new_tokens=new_tokens, temperature=0.0),
        )
        result = Answer(Timings(time.perf_counter()))
        for response in self.stub.Generate(request, timeout=REQUEST_TIMEOUT_S):
            result.timings.arrived(time.perf_counter(), len(response.token_ids))
            result.tokens.extend(response.token_ids)
            if response.HasField("finish"):
                result.reported_tokens = response.finish.generated_tokens
                self.drafted += response.finish.drafted_tokens
                self.accepted += response.finish.accepted_draft_tokens
        return result

    drafted = accepted = 0


class Llama(LlamaServer):
    ignore_eos = False  # an answer ends where the model ends it, as on nightcap's side
    stream_type = Answer


def run(server, prompts: list[list[int]], concurrency: int, new_tokens: int) -> list[Stream]:
    """The prompts one at a time (N=1) or ``concurrency`` at once; every stream checked."""
    connect, close = (server.connect, lambda c: c.close()) if isinstance(server, Llama) else (lambda: None, id)
    streams = []
    for start in range(0, len(prompts), concurrency):
        part = prompts[start : start + concurrency]
        streams += concurrently(part, new_tokens, connect, server.stream, server.name, close)
    return streams


def metrics(streams: list[Stream], concurrency: int) -> dict[str, float]:
    if concurrency == 1:
        tokens = sum(len(s.tokens) - 1 for s in streams)
        seconds = sum(s.timings.tokens[-1] - s.timings.tokens[0] for s in streams)
        return {"decode_tokens_per_s": tokens / seconds, "tokens": sum(len(s.tokens) for s in streams)}
    started = min(s.timings.sent for s in streams)
    finished = max(s.timings.tokens[-1] for s in streams)
    return {"tokens_per_s": sum(len(s.tokens) for s in streams) / (finished - started)}


def llama_knows(binary: Path, flag: str) -> bool:
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60)
    return flag in help_text.stdout + help_text.stderr


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    layout = VarLayout.from_env(args.var_dir)
    layout.bench.mkdir(parents=True, exist_ok=True)
    gguf = default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    per_round = max(args.concurrency) if max(args.concurrency) > 1 else args.n1_questions
    prompts = grounded_prompts(tokenizer, per_round * args.rounds + 1)
    report = BenchReport(args.area)
    for runner in args.runners:
        servers: dict[str, Nightcap | Llama] = {}
        try:
            contenders = [("spec", [], ROOT), ("off", ["--speculative-tokens", "0"], ROOT)]
            if args.baseline is not None:
                contenders.append(("baseline", [], args.baseline))
            for name, extra, checkout in contenders:
                flags = ["--runner", runner, *shlex.split(args.nightcap_args), *extra]
                print(f"== starting nightcap {name} (in {checkout}): {shlex.join(flags)}", flush=True)
                server = Nightcap(
                    gguf.resolve(),
                    layout.root.resolve(),
                    16,
                    args.threads,
                    flags,
                    layout.bench / f"spec-{runner}-{name}.log",
                    cwd=checkout,
                )
                server.name = f"nightcap-{name}"
                servers[name] = server
            if runner == "llamacpp" and not args.no_peer:
                servers.update(start_peers(layout, gguf, args))
            measure(report, runner, servers, prompts, args)
        finally:
            for server in servers.values():
                server.stop()
    report.write(layout.root)


def start_peers(layout: VarLayout, gguf: Path, args) -> dict[str, Llama]:
    try:
        binaries = ensure_built(layout.root, jobs=2)
    except BuildError as error:
        print(f"no llama-server to compare with (it could not be built): {error}")
        return {}
    peers = {}
    for name, extra in (("llama-server", []), ("llama-server-ngram", ["--spec-type", "ngram-simple"])):
        if extra and not llama_knows(binaries.server, extra[0]):
            print(f"this llama-server has no {extra[0]}: no {name} row")
            continue
        flags = [*shlex.split(args.llama_args), *extra]
        print(f"== starting {name}: {shlex.join(flags)}", flush=True)
        peer = Llama(binaries.server, gguf, 16, 16 * 1024, args.threads, flags, layout.bench / f"spec-{name}.log")
        peer.name = name
        peers[name] = peer
    return peers


def measure(report: BenchReport, runner: str, servers: dict, prompts: list[list[int]], args) -> None:
    for server in servers.values():  # warm-up: one throwaway question each
        run(server, prompts[-1:], 1, args.max_tokens)
    names = list(servers)
    for concurrency in args.concurrency:
        size = concurrency if concurrency > 1 else args.n1_questions
        rounds: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        differ = 0
        for number in range(args.rounds):
            batch = prompts[number * size : (number + 1) * size]
            order = names[number % len(names) :] + names[: number % len(names)]
            answers = {}
            for name in order:
                streams = run(servers[name], batch, concurrency, args.max_tokens)
                answers[name] = [s.tokens for s in streams]
                rounds[name].append(metrics(streams, concurrency))
            differ += sum(a != b for a, b in zip(answers["spec"], answers["off"], strict=True))
            shown = ", ".join(f"{n} {rounds[n][-1][_key(concurrency)]:.1f}" for n in names)
            print(f"   {runner} N={concurrency} round {number + 1}: {shown}", flush=True)
        for name in names:
            values = {k: statistics.mean(r[k] for r in rounds[name]) for k in rounds[name][0]}
            if isinstance(servers[name], Nightcap) and name != "off":
                drafted, accepted = servers[name].drafted, servers[name].accepted
                values |= {"acceptance": accepted / max(1, drafted), "drafted": drafted, "accepted": accepted}
            if name == "spec":
                values |= {"answers_differ": differ}
            report.add(f"grounded_n{concurrency}", name, f"{runner}:{default_gguf_path().name}", {}, values)
        key = _key(concurrency)
        for other, label in (
            ("off", "spec_vs_off"),
            ("baseline", "spec_vs_baseline"),
            ("llama-server", "vs_llama_server"),
        ):
            if other in rounds and (label != "vs_llama_server" or concurrency == 1):
                paired = [s[key] / o[key] for s, o in zip(rounds["spec"], rounds[other], strict=True)]
                report.ratio(f"{runner}/grounded_n{concurrency}_{label}", statistics.median(paired))
        if "llama-server-ngram" in rounds and concurrency == 1:
            paired = [s[key] / o[key] for s, o in zip(rounds["spec"], rounds["llama-server-ngram"], strict=True)]
            report.ratio(f"{runner}/grounded_n1_vs_llama_server_ngram", statistics.median(paired))


def _key(concurrency: int) -> str:
    return "decode_tokens_per_s" if concurrency == 1 else "tokens_per_s"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--runners", nargs="+", default=["llamacpp", "transformers"], choices=["llamacpp", "transformers"],
        help="nightcap runners measured (each spec against off)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; ratios are their median")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16], help="N: 1 (one at a time) or N at once")
    parser.add_argument("--n1-questions", type=int, default=6, help="questions per round at N=1, asked one at a time")
    parser.add_argument("--max-tokens", type=int, default=64, help="most new tokens an answer gets (make eval's 64)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of every server; default: all cores"
    )
    parser.add_argument("--nightcap-args", default="", help="extra flags for nightcap's serve, one quoted string")
    parser.add_argument("--llama-args", default="", help="extra llama-server flags, one quoted string")
    parser.add_argument("--no-peer", action="store_true", help="do not start llama-server (nightcap against itself)")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another nightcap checkout (e.g. `git worktree add /tmp/before HEAD~1`, then `make protos` there) served"
        " beside this one with speculation on, taking turns with it: the ratio <runner>/grounded_nN_spec_vs_baseline",
    )
    parser.add_argument("--area", default="speculation", help="writes var/bench/<area>.json")
    parser.add_argument("--var-dir", type=Path, default=None, help="runtime folder (default ./var)")
    args = parser.parse_args()
    if args.rounds < 1 or min(args.concurrency) < 1 or args.max_tokens < 2:
        parser.error("--rounds and --concurrency must be at least 1, --max-tokens at least 2")
    return args


if __name__ == "__main__":
    sys.exit(main())
