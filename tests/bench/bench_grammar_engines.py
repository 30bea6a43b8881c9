"""Grammar engines side by side: llguidance (what nightcap serves with), xgrammar and outlines-core, on the same
tokenizers, constraints and token sequences, in process.

Cases: the 20 JSON schemas of tests/test_structured.py and a few regular expressions, each with one valid
instance (a schema's is built by ``instance_of``, checked with jsonschema, written compact). The instance is
tokenized once per tokenizer and every engine walks the same tokens: at each position it fills a packed int32
bitmask of the tokens allowed next (``mask_us``, the per-token cost on the decode path), the token must be in it,
then the matcher advances (``advance_us``); after the last token end-of-sequence must be allowed and end the
match. An engine that refuses a case or rejects a token of it is counted, not timed.

``compile_ms``: a cold compile (a fresh compiler; the tokenizer view, ``setup_ms``, is built once before).
``cached_ms``: the same constraint on the same compiler again, for an engine with a cache of its own (xgrammar);
llguidance and outlines-core have none (nightcap's ConstraintCompiler caches any backend's result).
``first_mask_ms``: compile plus the first mask, what a request waits before its first constrained token.
``same_mask_as_llguidance``: the share of positions where the engine's mask equals llguidance's bit for bit.

Engines are interleaved per case (the order rotates), so load on the machine falls on all of them alike. xgrammar
and outlines-core are not nightcap dependencies: an engine that does not import is skipped, and the report says so.

    python tests/bench/bench_grammar_engines.py [--rounds 5] [--tokenizers smollm2-135m-instruct tiny-bpe]

Writes var/bench/grammar-engines.json (tests/bench/report.py) and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import torch
from report import BenchReport
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from services.common.paths import VarLayout
from services.common.registry import ModelRegistry
from services.generation.engine import llguidance_backend
from services.generation.engine.constraints import ConstraintSpec
from services.generation.loading import DEFAULT_MODEL, prepare_default

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import train_tiny_tokenizer
from test_structured import SCHEMAS

PATTERN_EXAMPLES = {"^[a-z]{3}-[0-9]{2}$": "abc-12"}
REGEXES = [
    (r"\d{4}-\d{2}-\d{2}", "2026-12-07"),
    (r"[a-z]+@[a-z]+\.(com|org)", "ada@example.org"),
    (r"(\+41 )?\d{2} \d{3} \d{2} \d{2}", "+41 44 668 18 00"),
    (r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)", "192.168.1.20"),
    (r"(yes|no|maybe)", "maybe"),
    (r"[A-Z][a-z]{2,9}( [A-Z][a-z]{2,9}){0,2}", "Ada King Lovelace"),
]


@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "json_schema" or "regex", as ConstraintSpec names them
    text: str
    instance: str


def instance_of(schema: dict, root: dict) -> Any:
    """A valid instance of ``schema`` (the subset the test schemas use): every property in declared order, the
    first option of a choice, the middle of an integer range, a string cut to its maxLength."""
    if "$ref" in schema:
        return instance_of(root["$defs"][schema["$ref"].rsplit("/", 1)[1]], root)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][-1]
    if "anyOf" in schema:
        return instance_of(schema["anyOf"][0], root)
    kind = schema["type"]
    if isinstance(kind, list):
        kind = next(k for k in kind if k != "null")
    if kind == "object":
        return {key: instance_of(value, root) for key, value in schema["properties"].items()}
    if kind == "array":
        count = max(schema.get("minItems", 0), min(schema.get("maxItems", 2), 2))
        return [instance_of(schema["items"], root) for _ in range(count)]
    if kind == "integer":
        low = schema["exclusiveMinimum"] + 1 if "exclusiveMinimum" in schema else schema.get("minimum", 0)
        return (low + schema.get("maximum", low + 100)) // 2
    if kind == "boolean":
        return True
    if kind == "string":
        return PATTERN_EXAMPLES.get(schema.get("pattern"), "Ada Lovelace"[: schema.get("maxLength", 12)])
    raise ValueError(f"instance_of does not know {schema}")


def cases() -> list[Case]:
    built = []
    for number, schema in enumerate(SCHEMAS):
        instance = instance_of(schema, schema)
        jsonschema.validate(instance, schema)
        compact = json.dumps(instance, separators=(",", ":"), ensure_ascii=False)
        built.append(Case(f"schema {number}", "json_schema", json.dumps(schema), compact))
    return built + [Case(f"regex {pattern}", "regex", pattern, example) for pattern, example in REGEXES]


# -- the engines: each builds its tokenizer view once, compiles a case cold, and walks a matcher ----------------


class LLGuidance:
    """nightcap's own backend, as it serves: compact JSON (llguidance_backend.JSON_OPTIONS)."""

    name, package, cache = "llguidance", "llguidance", False

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> None:
        self.view = llguidance_backend.tokenizer_for(tokenizer, len(tokenizer), [eos_id])
        self.eos_id = eos_id

    def compile(self, case: Case) -> Any:
        return llguidance_backend.compile(ConstraintSpec(case.kind, case.text), self.view, [self.eos_id])

    def matcher(self, compiled: Any) -> Any:
        return compiled.new_mask().matcher

    def fill_mask(self, matcher: Any, bits: torch.Tensor) -> None:
        matcher.unsafe_compute_mask_ptr(bits.data_ptr(), bits.numel() * 4)

    def advance(self, matcher: Any, token: int) -> bool:
        matcher.consume_token(token)
        return not matcher.is_error()

    def ended(self, matcher: Any) -> bool:
        return matcher.is_stopped()


class XGrammar:
    """xgrammar with compact JSON (no free whitespace, "," and ":" separators) like nightcap's llguidance;
    GrammarCompiler's defaults otherwise (8 threads, cache on)."""

    name, package, cache = "xgrammar", "xgrammar", True

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> None:
        import xgrammar

        self.xgrammar = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=len(tokenizer), stop_token_ids=[eos_id]
        )
        self.compiler = xgrammar.GrammarCompiler(self.info)

    def forget(self) -> None:
        """An empty cache: a fresh compiler for the same tokenizer."""
        self.compiler = self.xgrammar.GrammarCompiler(self.info)

    def compile(self, case: Case) -> Any:
        if case.kind == "regex":
            return self.compiler.compile_regex(case.text)
        return self.compiler.compile_json_schema(case.text, any_whitespace=False, separators=(",", ":"))

    def matcher(self, compiled: Any) -> Any:
        return self.xgrammar.GrammarMatcher(compiled)

    def fill_mask(self, matcher: Any, bits: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bits)

    def advance(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def ended(self, matcher: Any) -> bool:
        return matcher.is_terminated()


class OutlinesCore:
    """outlines-core: a JSON schema becomes a regex (no whitespace between tokens, like the others), compiled
    with the vocabulary into a full token-level index up front. The Vocabulary is built here from the
    tokenizer's byte-level tokens (``Vocabulary.from_pretrained`` reaches for the hub)."""

    name, package, cache = "outlines-core", "outlines_core", False

    def __init__(self, tokenizer: PreTrainedTokenizerBase, eos_id: int) -> None:
        import outlines_core
        from outlines_core.json_schema import build_regex_from_schema

        self.outlines, self.build_regex = outlines_core, build_regex_from_schema
        self.vocabulary = outlines_core.Vocabulary(eos_id, byte_level_vocabulary(tokenizer))

    def compile(self, case: Case) -> Any:
        regex = case.text if case.kind == "regex" else self.build_regex(case.text, whitespace_pattern="")
        return self.outlines.Index(regex, self.vocabulary)

    def matcher(self, compiled: Any) -> Any:
        return self.outlines.Guide(compiled)

    def fill_mask(self, matcher: Any, bits: torch.Tensor) -> None:
        matcher.write_mask_into(bits.data_ptr(), bits.numel(), 4)

    def advance(self, matcher: Any, token: int) -> bool:
        if token == self.vocabulary.get_eos_token_id():
            return matcher.is_finished()  # advancing on EOS raises (outlines-core#227): it only ends the row
        try:
            matcher.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True

    def ended(self, matcher: Any) -> bool:
        return matcher.is_finished()


ENGINES = [LLGuidance, XGrammar, OutlinesCore]


def byte_level_vocabulary(tokenizer: PreTrainedTokenizerBase) -> dict[bytes, list[int]]:
    """token bytes -> ids for a GPT-2 style byte-level BPE, the special (added) tokens left out."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable + [256 + n for n in range(256 - len(printable))]
    byte_of = dict(zip(map(chr, chars), [*printable, *(b for b in range(256) if b not in printable)], strict=True))
    special = set(tokenizer.added_tokens_decoder)
    vocabulary: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id not in special:
            vocabulary.setdefault(bytes(byte_of[c] for c in token), []).append(token_id)
    return vocabulary


# -- the walk -------------------------------------------------------------------------------------------------


@dataclass
class Tally:
    """One engine's measurements on one tokenizer, over all rounds."""

    setup_ms: float = 0.0
    compile_ms: list[float] = field(default_factory=list)
    cached_ms: list[float] = field(default_factory=list)
    first_mask_ms: list[float] = field(default_factory=list)
    mask_us: list[float] = field(default_factory=list)
    advance_us: list[float] = field(default_factory=list)
    allowed: list[int] = field(default_factory=list)
    same_mask: list[bool] = field(default_factory=list)
    accepted: set[int] = field(default_factory=set)
    failures: dict[int, str] = field(default_factory=dict)

    def params(self, case_ids: set[int]) -> dict[str, Any]:
        params: dict[str, Any] = {"cases": len(case_ids), "accepted": len(case_ids & self.accepted)}
        if self.failures:
            params["failed"] = " | ".join(self.failures.values())
        return params

    def metrics(self) -> dict[str, float]:
        if not self.compile_ms:
            return {"setup_ms": self.setup_ms}
        metrics = {
            "setup_ms": self.setup_ms,
            "compile_ms_p50": statistics.median(self.compile_ms),
            "compile_ms_p99": percentile(self.compile_ms, 0.99),
            "first_mask_ms_p50": statistics.median(self.first_mask_ms),
            "first_mask_ms_p99": percentile(self.first_mask_ms, 0.99),
            "mask_us_p50": statistics.median(self.mask_us),
            "mask_us_p90": percentile(self.mask_us, 0.9),
            "mask_us_p99": percentile(self.mask_us, 0.99),
            "advance_us_p50": statistics.median(self.advance_us),
            "allowed_tokens_mean": statistics.mean(self.allowed),
        }
        if self.cached_ms:
            metrics["cached_ms_p50"] = statistics.median(self.cached_ms)
        if self.same_mask:
            metrics["same_mask_as_llguidance"] = sum(self.same_mask) / len(self.same_mask)
        return metrics


def walk(engine: Any, case: Case, tokens: list[int], words: int, tally: Tally) -> list[torch.Tensor] | None:
    """Compiles ``case`` cold (and cached) and walks ``tokens``: its masks, timed into ``tally``, or None when the
    engine refuses the case or one of its tokens (then nothing of it is timed)."""
    try:
        if engine.cache:
            engine.forget()
        started = time.perf_counter()
        compiled = engine.compile(case)
        compile_ms = (time.perf_counter() - started) * 1000
        if engine.cache:
            started = time.perf_counter()
            engine.compile(case)
            cached_ms = (time.perf_counter() - started) * 1000
    except Exception as error:  # each engine raises its own type for a grammar it refuses
        return _fail(tally, case, f"refused: {type(error).__name__}: {str(error).splitlines()[0][:120]}")
    matcher, masks, mask_us, advance_us = engine.matcher(compiled), [], [], []
    for position, token in enumerate(tokens):
        bits = torch.zeros((1, words), dtype=torch.int32)
        started = time.perf_counter_ns()
        engine.fill_mask(matcher, bits)
        mask_us.append((time.perf_counter_ns() - started) / 1000)
        masks.append(bits)
        if not bits[0, token // 32] >> (token % 32) & 1:
            return _fail(tally, case, f"token {position} ({token}) not in the mask")
        started = time.perf_counter_ns()
        advanced = engine.advance(matcher, token)
        advance_us.append((time.perf_counter_ns() - started) / 1000)
        if not advanced:
            return _fail(tally, case, f"token {position} ({token}) rejected")
    if not engine.ended(matcher):
        return _fail(tally, case, "end-of-sequence did not end the match")
    tally.compile_ms.append(compile_ms)
    tally.cached_ms += [cached_ms] if engine.cache else []
    tally.first_mask_ms.append(compile_ms + mask_us[0] / 1000)
    tally.mask_us += mask_us
    tally.advance_us += advance_us
    tally.accepted.add(id(case))
    return masks


def _fail(tally: Tally, case: Case, reason: str) -> None:
    tally.failures.setdefault(id(case), f"{case.name} ({case.instance}): {reason}")
    return None


def measure_tokenizer(report: BenchReport, label: str, tokenizer: PreTrainedTokenizerBase, rounds: int) -> None:
    eos_id = tokenizer.eos_token_id
    words = (len(tokenizer) + 31) // 32
    all_cases = cases()
    engines, tallies = [], {}
    for kind in ENGINES:
        try:
            started = time.perf_counter()
            engine = kind(tokenizer, eos_id)
        except ImportError as error:
            report.add("grammar_engine", kind.name, label, {"skipped": f"does not import: {error}"}, {})
            continue
        engines.append(engine)
        setup_ms = (time.perf_counter() - started) * 1000
        for case_kind in ("json_schema", "regex"):
            tallies[engine.name, case_kind] = Tally(setup_ms=setup_ms)
    tokens = {id(case): [*tokenizer.encode(case.instance, add_special_tokens=False), eos_id] for case in all_cases}
    for engine in engines:  # one-time initialisation (thread pools, lazy tables) is no compile's cost
        walk(engine, all_cases[0], tokens[id(all_cases[0])], words, Tally())
    for round_ in range(rounds):
        for index, case in enumerate(all_cases):
            shift = (round_ + index) % len(engines)
            masks = {}
            for engine in engines[shift:] + engines[:shift]:
                masks[engine.name] = walk(engine, case, tokens[id(case)], words, tallies[engine.name, case.kind])
            if round_ == 0:
                compare_masks(masks, {name: tallies[name, case.kind] for name in masks})
    for (name, case_kind), tally in tallies.items():
        engine = next(e for e in engines if e.name == name)
        ids = {id(c) for c in all_cases if c.kind == case_kind}
        report.add(
            f"grammar_engine/{case_kind}",
            f"{name} {package_version(engine)}",
            label,
            tally.params(ids),
            tally.metrics(),
        )


def compare_masks(masks: dict[str, list[torch.Tensor] | None], tallies: dict[str, Tally]) -> None:
    """Records each engine's allowed-token counts and whether its masks equal llguidance's, position by position."""
    reference = masks.get("llguidance")
    for name, walked in masks.items():
        if walked is None:
            continue
        tallies[name].allowed += [
            sum(bin(w & 0xFFFFFFFF).count("1") for w in bits.flatten().tolist()) for bits in walked
        ]
        if reference is not None:
            tallies[name].same_mask += [bool(torch.equal(a, b)) for a, b in zip(walked, reference, strict=True)]


def package_version(engine: Any) -> str:
    return importlib.metadata.version(engine.package.replace("_", "-"))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load_tokenizer(label: str) -> PreTrainedTokenizerBase:
    if label == "tiny-bpe":
        return train_tiny_tokenizer()  # the test models' byte-level BPE, 512 tokens, trained on the spot
    registry = ModelRegistry(VarLayout.from_env(None).models)
    return AutoTokenizer.from_pretrained(prepare_default(registry).path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--tokenizers", nargs="+", default=[DEFAULT_MODEL, "tiny-bpe"], choices=[DEFAULT_MODEL, "tiny-bpe"]
    )
    args = parser.parse_args()
    report = BenchReport("grammar-engines")
    for label in args.tokenizers:
        measure_tokenizer(report, label, load_tokenizer(label), args.rounds)
    report.write(VarLayout.from_env(None).root)


if __name__ == "__main__":
    main()
