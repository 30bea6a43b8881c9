"""Training data: the unified JSONL, validated line by line, rendered in the model's prompt format, tokenized
with a loss mask, packed to a fixed length, and mixed by weight.

One line is one conversation, in either of two shapes:

    {"text": "<human>: Where is Zurich?\\n<bot>: In Switzerland."}            # OpenChatKit
    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}

Used by finetune.py (training and eval data), prepare_data.py (validating what it writes) and the benchmark.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from loguru import logger

IGNORE_INDEX = -100  # the label torch's cross_entropy skips
ROLES = ("system", "user", "assistant")
_TURN = re.compile(r"<(human|bot)>:")


class DataError(ValueError):
    """Training data that cannot be used: a missing file, a malformed line (with its file and line number)."""


@dataclass(frozen=True)
class DataSource:
    path: Path
    weight: float


def parse_mixture(spec: str) -> list[DataSource]:
    """``path:weight,path:weight`` (weight defaults to 1) -> sources; every file must exist."""
    sources = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path, sep, weight = part.rpartition(":")
        if not sep or not _is_number(weight):
            path, weight = part, "1"
        value = float(weight)
        if value <= 0:
            raise DataError(f"weight of {path} must be > 0, got {weight}")
        if not Path(path).is_file():
            raise DataError(f"data file {path} does not exist")
        sources.append(DataSource(Path(path).resolve(), value))
    if not sources:
        raise DataError(f"no data files in {spec!r}; expected path:weight[,path:weight...]")
    return sources


def map_mixture_paths(spec: str, change: Callable[[str], Path]) -> str:
    """The mixture ``spec`` with each path replaced by ``change(path)``, weights kept."""
    parts = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        path, sep, weight = part.rpartition(":")
        parts.append(f"{change(path)}:{weight}" if sep and _is_number(weight) else str(change(part)))
    return ",".join(parts)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def validate_record(record: Any) -> str | None:
    """None when ``record`` is a usable conversation, else what is wrong with it."""
    if not isinstance(record, dict):
        return "not a JSON object"
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            return '"text" must be a non-empty string'
        if "<bot>:" not in text:
            return '"text" has no "<bot>:" turn to learn from'
        return None
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        return 'expected "text" or a non-empty "messages" list'
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"messages[{i}] needs a role among {', '.join(ROLES)}"
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            return f"messages[{i}] needs non-empty string content"
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant message to learn from"
    return None


def read_records(path: Path, strict: bool = False) -> Iterator[dict[str, Any]]:
    """Valid records of a JSONL file. A bad line is logged with file:line and skipped, or raises with --strict."""
    skipped = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                problem = validate_record(record)
            except json.JSONDecodeError as error:
                problem = f"invalid JSON ({error.msg})"
            if problem is None:
                yield record
                continue
            message = f"{path}:{number}: {problem}"
            if strict:
                raise DataError(message)
            logger.warning("skipping {}", message)
            skipped += 1
    if skipped:
        logger.warning("{}: skipped {} malformed line(s)", path, skipped)


def render(record: dict[str, Any], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the model sees it, and the character spans the assistant wrote.

    Chat messages use the tokenizer's chat template when it has one, otherwise OpenChatKit's turns; OpenChatKit
    text is used as written. A bot span runs from after ``<bot>:`` to the next ``<human>:`` (its newline included).
    """
    if "messages" in record and getattr(tokenizer, "chat_template", None):
        return _render_chat_template(record["messages"], tokenizer)
    text = record["text"] if "text" in record else _messages_to_openchatkit(record["messages"])
    spans = []
    turns = list(_TURN.finditer(text))
    for turn, following in zip(turns, [*turns[1:], None], strict=True):
        if turn.group(1) == "bot":
            spans.append((turn.end(), following.start() if following else len(text)))
    return text, spans


def _messages_to_openchatkit(messages: list[dict[str, str]]) -> str:
    lines = []
    for message in messages:
        if message["role"] == "system":
            lines.append(message["content"].strip())
        else:
            tag = "<human>" if message["role"] == "user" else "<bot>"
            lines.append(f"{tag}: {message['content'].strip()}")
    return "\n".join(lines) + "\n"


def _render_chat_template(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    # Templates rarely carry {% generation %} markers (SmolLM2's does not), so the assistant's spans come from
    # rendering each prefix: what turn i adds after the generation prompt is the assistant's.
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(prompt)):
            raise DataError("the chat template does not render conversations prefix by prefix; cannot mask turns")
        spans.append((len(prompt), len(upto)))
    return text, spans


def tokenize(record: dict[str, Any], tokenizer: Any, train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX outside the assistant's spans unless ``train_on_prompt``), EOS at the end."""
    text, spans = render(record, tokenizer)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = []
    for token, (start, _end) in zip(ids, encoded["offset_mapping"], strict=True):
        inside = any(s <= start < e for s, e in spans)
        labels.append(token if train_on_prompt or inside else IGNORE_INDEX)
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return ids, labels


@dataclass
class PackedData:
    """Fixed-length rows of token ids and labels (numpy int64, shape [rows, seq_length])."""

    input_ids: np.ndarray
    labels: np.ndarray
    conversations: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def pack(examples: list[tuple[list[int], list[int]]], seq_length: int, pad_id: int) -> PackedData:
    """Concatenates examples and cuts the stream into ``seq_length`` rows; the last row is padded (not trained)."""
    ids = [t for example_ids, _ in examples for t in example_ids]
    labels = [t for _, example_labels in examples for t in example_labels]
    rows = max(1, -(-len(ids) // seq_length))
    padding = rows * seq_length - len(ids)
    ids_array = np.array(ids + [pad_id] * padding, dtype=np.int64).reshape(rows, seq_length)
    labels_array = np.array(labels + [IGNORE_INDEX] * padding, dtype=np.int64).reshape(rows, seq_length)
    return PackedData(ids_array, labels_array, len(examples))


def load_packed(
    path: Path, tokenizer: Any, seq_length: int, train_on_prompt: bool = False, strict: bool = False
) -> PackedData:
    examples = [tokenize(record, tokenizer, train_on_prompt) for record in read_records(path, strict)]
    if not examples:
        raise DataError(f"{path} has no usable conversations")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pack(examples, seq_length, pad_id or 0)


def mixture_order(sizes: list[int], weights: list[float], count: int, seed: int) -> np.ndarray:
    """``count`` row indices into the concatenated sources: each draw picks a source by weight, then that source's
    next row in a shuffled pass (reshuffled each pass), like OpenChatKit's weighted task sampling.

    Deterministic in ``seed``, so a resumed run finds its data position by index and sees the same rows.
    """
    rng = np.random.default_rng(seed)
    probabilities = np.asarray(weights, dtype=np.float64) / sum(weights)
    choice = rng.choice(len(sizes), size=count, p=probabilities)
    order = np.empty(count, dtype=np.int64)
    offsets = np.cumsum([0, *sizes[:-1]])
    for source, (size, offset) in enumerate(zip(sizes, offsets, strict=True)):
        slots = np.flatnonzero(choice == source)
        passes = -(-len(slots) // size) if len(slots) else 0
        rows = np.concatenate([rng.permutation(size) for _ in range(passes)]) if passes else np.empty(0, np.int64)
        order[slots] = offset + rows[: len(slots)]
    return order
