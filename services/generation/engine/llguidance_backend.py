"""The grammar engine behind constraints: llguidance (MIT; JSON schema, regex, Lark, GBNF and choice, compiled
for a Hugging Face tokenizer into a token mask computed lazily, token by token, in Rust).

The narrow interface the rest of the engine sees: ``tokenizer_for`` (once per served tokenizer), ``compile``
(a validated ``ConstraintSpec`` -> a ``Grammar``, or ``InvalidArgument`` naming what llguidance refused) and
``Grammar.new_mask()``, a row's ``LogitsMask``: given the row's output so far it returns the tokens the row may
take next. Nothing here knows about batches, runners or the scheduler.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Sequence

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance import LLMatcher, LLTokenizer
from transformers import PreTrainedTokenizerBase

from services.common.errors import InvalidArgument
from services.generation.engine.constraints import ConstraintSpec

# Compact JSON: no free whitespace between tokens, so a sampled row cannot wander into endless blank lines (a
# schema may still ask for other whitespace through llguidance's "x-guidance" keyword).
JSON_OPTIONS = {"whitespace_flexible": False}

_tokenizers: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[tuple, LLTokenizer]] = weakref.WeakKeyDictionary()
_tokenizers_lock = threading.Lock()


def tokenizer_for(tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_ids: Iterable[int]) -> LLTokenizer:
    """llguidance's view of a served tokenizer, built once (it walks the whole vocabulary: ~0.4 s for a 49k
    vocabulary) and kept as long as the tokenizer lives. ``vocab_size`` is the width of the model's logits (it
    may exceed the tokenizer's); ``eos_ids`` the tokens that end a row (the engine's stop ids)."""
    key = (vocab_size, tuple(sorted(eos_ids)))
    with _tokenizers_lock:
        built = _tokenizers.get(tokenizer, {}).get(key)
    if built is not None:
        return built
    try:
        built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(key[1]) or None)
    except ValueError as error:  # a slow (Python) tokenizer: llguidance reads the Rust one
        raise InvalidArgument(f"constraint: the served model's tokenizer cannot be constrained: {error}") from None
    with _tokenizers_lock:
        return _tokenizers.setdefault(tokenizer, {}).setdefault(key, built)


def grammar_text(spec: ConstraintSpec) -> str:
    """The llguidance grammar (its JSON form) for ``spec``; InvalidArgument names the field when the text cannot
    even be turned into a grammar."""
    try:
        if spec.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
        if spec.kind == "json_object":
            return LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return LLMatcher.grammar_from_regex(spec.text)
        if spec.kind == "lark":
            return LLMatcher.grammar_from_lark(spec.text)
        if spec.kind == "gbnf":
            return llguidance.grammar_from("gbnf", spec.text)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", spec.text)
    except (ValueError, RuntimeError) as error:
        raise InvalidArgument(f"{spec.field}: llguidance cannot read it: {_first_lines(error)}") from None
    raise InvalidArgument(f"constraint: unknown kind {spec.kind!r}")


class Grammar:
    """A constraint compiled for one tokenizer; ``new_mask`` gives each row its own matcher."""

    def __init__(self, spec: ConstraintSpec, tokenizer: LLTokenizer, matcher: LLMatcher, eos_ids: list[int]) -> None:
        self.spec = spec
        self.tokenizer = tokenizer  # held so that a cache keyed by the tokenizer's identity stays sound
        self._matcher = matcher
        self._eos_ids = eos_ids

    def new_mask(self) -> GrammarMask:
        return GrammarMask(self._matcher.deep_copy(), self.tokenizer.vocab_size, self._eos_ids)


def compile(spec: ConstraintSpec, tokenizer: LLTokenizer, eos_ids: Iterable[int]) -> Grammar:
    """Compiles ``spec`` for ``tokenizer``; llguidance reports what it refuses (a schema feature, a regex that
    does not parse, an unknown rule) and the message names it."""
    matcher = LLMatcher(tokenizer, grammar_text(spec), log_level=0)
    if matcher.is_error():
        raise InvalidArgument(f"{spec.field}: llguidance cannot compile it: {_first_lines(matcher.get_error())}")
    return Grammar(spec, tokenizer, matcher, sorted(eos_ids))


class GrammarMask:
    """One row's matcher as a ``LogitsMask``: called with the row's output so far (the engine's list, which the
    scheduler appends accepted tokens to), it first advances the matcher over the tokens accepted since the
    last call, then returns the tokens allowed next. The end-of-sequence tokens are allowed only where the
    grammar may end, and they are all that is allowed once it is complete."""

    def __init__(self, matcher: LLMatcher, vocab_size: int, eos_ids: list[int]) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.consumed = 0
        self._bits = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def __call__(self, output: list[int]) -> torch.Tensor:
        for token in output[self.consumed :]:
            self.matcher.consume_token(token)  # a refused token leaves the matcher in error: handled below
        self.consumed = len(output)
        return self._allowed()

    def along(self, output: list[int], draft: Sequence[int]) -> list[torch.Tensor]:
        """The tokens allowed at each of a drafted step's 1 + len(draft) positions: position i as if ``draft[:i]``
        followed ``output``. The matcher walks the draft and steps back (``rollback``), so it stands after
        ``output`` again; the draft tokens the step keeps are consumed from ``output`` by the next call. From
        the first draft token the grammar refuses, the positions after it repeat its mask: the sampler cannot
        draw that token there, so nothing after it is kept."""
        masks = [self(output)]
        walked = 0
        for token in draft:
            if not bool(masks[-1][token]) or not self.matcher.consume_token(token):
                break
            walked += 1
            masks.append(self._allowed())
        if walked:
            self.matcher.rollback(walked)
        return masks + [masks[-1]] * (len(draft) + 1 - len(masks))

    def _allowed(self) -> torch.Tensor:
        if not self.matcher.is_error():
            self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
            allowed = torch.from_numpy(np.unpackbits(self._bits.numpy().view(np.uint8), bitorder="little"))
            allowed = allowed.view(torch.bool)[: self.vocab_size]
            if bool(allowed.any()):
                return allowed
        # nothing can follow (an error state, or a grammar llguidance cannot extend): end the row
        ended = torch.zeros(self.vocab_size, dtype=torch.bool)
        ended[self.eos_ids] = True
        return ended

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


def _first_lines(error: object, lines: int = 6) -> str:
    return "\n".join(str(error).strip().splitlines()[:lines])
