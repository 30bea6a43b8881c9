"""Turning generated token ids into streamed text: whole UTF-8 characters only, stop sequences cut."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Yields the text each new token adds.

    Decoding tokens one by one breaks multi-byte characters and word-boundary spacing, so, as TGI and
    vLLM do, we decode a short window of recent tokens twice and emit the difference; a window ending in
    U+FFFD is an unfinished character and is held back until the next token completes it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]


class StopSequenceMatcher:
    """Holds back text that might be the start of a stop sequence, so the stop text is never streamed."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.pending = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """Returns (text safe to emit now, the stop sequence that matched or None)."""
        self.pending += text
        if not self.stop:
            emit, self.pending = self.pending, ""
            return emit, None
        hits = [(self.pending.find(s), s) for s in self.stop if s in self.pending]
        if hits:
            position, matched = min(hits)
            emit, self.pending = self.pending[:position], ""
            return emit, matched
        keep = self._partial_match_length()
        emit = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep :]
        return emit, None

    def flush(self) -> str:
        emit, self.pending = self.pending, ""
        return emit

    def _partial_match_length(self) -> int:
        """Length of the longest tail of ``pending`` that is a proper prefix of some stop sequence."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:size]):
                    longest = size
                    break
        return longest
