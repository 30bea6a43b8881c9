"""Convert chat datasets into the unified training JSONL (training/data.py), checking every line.

    python -m training.prepare_data dolly databricks-dolly-15k.jsonl -o var/data/dolly.jsonl
    python -m training.prepare_data oasst1 2023-04-12_oasst_ready.trees.jsonl.gz -o var/data/oasst1.jsonl
    python -m training.prepare_data oig unified_chip2.jsonl -o var/data/oig.jsonl
    python -m training.prepare_data wiki -o var/data/wiki-chat          # train.jsonl + eval.jsonl from the corpus
    python -m training.prepare_data check var/data/dolly.jsonl          # validate a file already in the format

An input may be a local file (.jsonl or .jsonl.gz) or an http(s) URL, downloaded into var/data/raw/ where the network
allows. A malformed input line is reported as file:line and skipped; ``--strict`` stops at the first one instead.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python training/prepare_data.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger

from services.common.logs import setup_logging
from services.common.paths import VarLayout
from training.data import DataError, read_records, validate_record

# Where the public datasets live: pass `hub` as the input to download one (where the network allows).
HUB_URLS = {
    "dolly": "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl",
    "oasst1": "https://huggingface.co/datasets/OpenAssistant/oasst1/resolve/main/2023-04-12_oasst_ready.trees.jsonl.gz",
    "oig": "https://huggingface.co/datasets/laion/OIG/resolve/main/unified_chip2.jsonl",
}
WIKI_PROMPTS = ("Tell me about {}.", "What is {}?", "Give me a short summary of {}.", "What do you know about {}?")


class SourceLines:
    """JSON objects of a JSONL source, each with its file:line, bad lines reported (or raised with strict)."""

    def __init__(self, path: Path, strict: bool) -> None:
        self.path, self.strict, self.skipped = path, strict, 0

    def problem(self, number: int, what: str) -> None:
        message = f"{self.path}:{number}: {what}"
        if self.strict:
            raise DataError(message)
        logger.warning("skipping {}", message)
        self.skipped += 1

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        opener = gzip.open if self.path.suffix == ".gz" else open
        with opener(self.path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    self.problem(number, f"invalid JSON ({error.msg})")
                    continue
                if not isinstance(record, dict):
                    self.problem(number, "not a JSON object")
                    continue
                yield number, record


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    return value.strip() if isinstance(value, str) else ""


def convert_dolly(lines: SourceLines) -> Iterator[dict[str, Any]]:
    """Dolly-15k: instruction (+ context) from the user, response from the assistant."""
    for number, record in lines:
        instruction, context, response = (_text(record, k) for k in ("instruction", "context", "response"))
        if not instruction or not response:
            lines.problem(number, "needs non-empty instruction and response")
            continue
        prompt = f"{instruction}\n\n{context}" if context else instruction
        yield {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def _best_reply(replies: list[dict[str, Any]]) -> dict[str, Any] | None:
    # OASST ranks sibling replies 0 = best; unranked ones come after every ranked one, in file order.
    usable = [r for r in replies if isinstance(r, dict) and not r.get("deleted") and _text(r, "text")]
    ranked = sorted(usable, key=lambda r: r["rank"] if isinstance(r.get("rank"), int) else 1 << 30)
    return ranked[0] if ranked else None


def _oasst_path(root: dict[str, Any]) -> list[dict[str, str]]:
    messages, node = [], root
    while node is not None:
        role = {"prompter": "user", "assistant": "assistant"}.get(node.get("role"))
        if role is None:
            break
        messages.append({"role": role, "content": _text(node, "text")})
        node = _best_reply(node.get("replies") or [])
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    return messages


def convert_oasst1(lines: SourceLines) -> Iterator[dict[str, Any]]:
    """OASST1 message trees (``*.trees.jsonl``, or flat messages with parent_id): the best-ranked assistant path."""
    flat: dict[str, dict[str, Any]] = {}
    roots: list[str] = []
    for number, record in lines:
        if "prompt" in record:  # one whole tree per line
            if not isinstance(record["prompt"], dict):
                lines.problem(number, '"prompt" is not a message object')
                continue
            messages = _oasst_path(record["prompt"])
            if messages:
                yield {"messages": messages}
            else:
                lines.problem(number, "tree has no assistant reply")
        elif "message_id" in record and "role" in record:  # flat export: rebuild the trees
            node = {**record, "replies": []}
            flat[record["message_id"]] = node
            if record.get("parent_id") is None:
                roots.append(record["message_id"])
        else:
            lines.problem(number, 'expected a tree ("prompt") or a message ("message_id", "role", "text")')
    for node in flat.values():
        parent = flat.get(node.get("parent_id") or "")
        if parent is not None:
            parent["replies"].append(node)
    for root in roots:
        messages = _oasst_path(flat[root])
        if messages:
            yield {"messages": messages}


def convert_oig(lines: SourceLines) -> Iterator[dict[str, Any]]:
    """OIG: ``text`` is already OpenChatKit's ``<human>: ...\\n<bot>: ...``; kept as is once checked."""
    for number, record in lines:
        text = record.get("text")
        problem = validate_record({"text": text})
        if problem or not isinstance(text, str) or "<human>:" not in text:
            lines.problem(number, problem or 'text has no "<human>:" turn')
            continue
        yield {"text": text.strip() + "\n"}


def wiki_conversations(limit: int | None, seed: int) -> Iterator[dict[str, Any]]:
    """The demo's chat data: "Tell me about X." -> X's Wikipedia summary, from the embedded corpus."""
    from services.retrieval.corpus import read_wikipedia_summaries

    rng = random.Random(seed)
    for document in read_wikipedia_summaries(limit=limit):
        prompt = rng.choice(WIKI_PROMPTS).format(document.title)
        yield {
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": document.text}],
            "title": document.title,
        }


CONVERTERS = {"dolly": convert_dolly, "oasst1": convert_oasst1, "oig": convert_oig}


def fetch(source: str, dataset: str, var: VarLayout) -> Path:
    """A local path as is; ``hub`` or an http(s) URL downloaded once into var/data/raw/."""
    url = HUB_URLS[dataset] if source == "hub" else source
    if not url.startswith(("http://", "https://")):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"input file {path} does not exist")
        return path
    target = var.root / "data" / "raw" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading {} -> {}", url, target)
    partial = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, partial.open("wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise DataError(f"could not download {url} ({error}); download it elsewhere and pass the local file") from None
    partial.rename(target)
    return target


def write_jsonl(records: Iterable[dict[str, Any]], path: Path) -> int:
    """Writes records that pass validate_record (a converter bug fails loudly here), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    count = 0
    with partial.open("w", encoding="utf-8") as out:
        for record in records:
            problem = validate_record(record)
            if problem:
                partial.unlink()
                raise DataError(f"converter produced an invalid record ({problem}): {record}")
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    partial.rename(path)
    return count


def split_by_title(records: Iterable[dict[str, Any]], eval_fraction: float) -> tuple[list, list]:
    """Held-out eval by a hash of the title: stable across runs and limits."""
    train, held_out = [], []
    for record in records:
        bucket = int(hashlib.sha256(record.pop("title").encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held_out if bucket < eval_fraction else train).append(record)
    return train, held_out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.prepare_data",
        description="Convert Dolly-15k, OASST1 trees, OIG or the embedded Wikipedia summaries into training JSONL.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dataset", choices=[*CONVERTERS, "wiki", "check"], help="input format (check: validate only)")
    p.add_argument("input", nargs="?", default="", help="local .jsonl/.jsonl.gz, an http(s) URL, or 'hub' (not wiki)")
    p.add_argument("-o", "--output", default="", help="output .jsonl (wiki: a folder for train.jsonl + eval.jsonl)")
    p.add_argument("--strict", action="store_true", help="fail on the first malformed line instead of skipping it")
    p.add_argument("--limit", type=int, default=None, help="wiki: use the first N articles of the corpus")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="wiki: share of articles held out for eval")
    p.add_argument("--seed", type=int, default=0, help="wiki: seed for the prompt wording")
    p.add_argument("--var-dir", default=None, help="runtime folder for downloads (var/data/raw); env NIGHTCAP_VAR")
    return p


def main(argv: list[str] | None = None) -> int:
    setup_logging("prepare-data")
    args = build_parser().parse_args(argv)
    try:
        if args.dataset == "check":
            count = sum(1 for _ in read_records(Path(args.input), strict=args.strict))
            print(f"{args.input}: {count} valid conversations")
            return 0
        if args.dataset == "wiki":
            folder = Path(args.output or VarLayout.from_env(args.var_dir).root / "data" / "wiki-chat")
            train, held_out = split_by_title(wiki_conversations(args.limit, args.seed), args.eval_fraction)
            for name, records in (("train.jsonl", train), ("eval.jsonl", held_out)):
                print(f"{folder / name}: {write_jsonl(records, folder / name)} conversations")
            return 0
        if not args.input or not args.output:
            raise DataError(f"{args.dataset} needs an input (file, URL or 'hub') and -o OUTPUT.jsonl")
        lines = SourceLines(fetch(args.input, args.dataset, VarLayout.from_env(args.var_dir)), args.strict)
        count = write_jsonl(CONVERTERS[args.dataset](lines), Path(args.output))
        print(f"{args.output}: {count} conversations ({lines.skipped} malformed input line(s) skipped)")
        return 0
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
