"""The served model's tokenizer, held by the orchestrator: a chat turn counts and tokenizes its prompt here
instead of asking the generation service, as TGI's router and vLLM's front end hold theirs.

The generation service sends its tokenizer with ModelInfo (``tokenizer_json``, a Hugging Face ``tokenizers``
JSON) and names it by ``tokenizer_digest`` (sha256 of that JSON): the tokenizer's identity, also for a model
served from a plain folder without a version. It is built once per digest; a hot swap to a version with the
same tokenizer keeps it.
"""

from __future__ import annotations

import hashlib

from tokenizers import Tokenizer

from services.common.errors import FailedPrecondition

# What the orchestrator sends as the digest it holds before it holds any: the service then sends its tokenizer.
NO_TOKENIZER = ""


class ServedTokenizer:
    """Encodes as the generation service's Tokenize does by default (no special tokens added, no truncation)."""

    def __init__(self, tokenizer_json: bytes, digest: str, split_special_tokens: bool = False) -> None:
        if not tokenizer_json or not digest:
            raise FailedPrecondition(
                "the generation service sent no tokenizer with its model info (a slow, Python-only tokenizer, or a"
                " generation service older than this orchestrator): the orchestrator needs one to count prompts"
            )
        if hashlib.sha256(tokenizer_json).hexdigest() != digest:
            raise FailedPrecondition(f"the tokenizer the generation service sent does not match its digest {digest}")
        try:
            tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as error:  # tokenizers raises plain Exceptions for a JSON it cannot read
            raise FailedPrecondition(f"the generation service's tokenizer does not load here: {error}") from None
        tokenizer.no_truncation()
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = split_special_tokens
        self.digest = digest
        self._tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        return len(self.encode(text))
