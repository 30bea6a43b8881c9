"""Prefix caching: a prompt that starts with tokens the engine has already run reuses their KV instead of
prefilling them again (a chat's next turn, the same system prompt or the same passages).

Two halves, so that tensor-parallel ranks agree by construction:

- ``PrefixIndex`` (rank 0, beside the scheduler) is a radix tree over token ids. It decides which cached
  tokens a new request reuses, which new KV is kept and what is evicted (least recently used leaves first,
  bounded by a number of tokens), and writes each decision down as plain data (``CacheOp``s) that travel
  in the step.
- ``KVStore`` (every rank, in its transformers runner) holds the tensors of each tree node and applies those
  operations to its own shard; it decides nothing. (llama.cpp's runner keeps a node as saved sequence state
  in host memory instead: ``runners/llamacpp_state.py``.)

Why a radix tree and not vLLM's hashed blocks: our KV lives in one contiguous left-padded cache rather than
in fixed blocks, so block granularity buys nothing here, and a tree matches to the token. A chat turn's
prompt is the previous prompt, the answer and a few new tokens, and the answer's re-tokenization can differ
from the generated tokens in its last token or two: a tree reuses everything up to that token, blocks only
up to the last whole block. A tree also keeps a shared system prompt once, however many requests carry it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

Segment = tuple[int, int]  # (node id, tokens of that node used from its start)


@dataclass(frozen=True)
class StoreKV:
    """Row ``row`` of the running batch (before this step's ``keep``): its real tokens ``start:end``
    become node ``node``'s KV."""

    node: int
    row: int
    start: int
    end: int


@dataclass(frozen=True)
class SplitKV:
    """Node ``node`` keeps its first ``at`` tokens; node ``new`` gets the rest (a longer path now branches
    in the middle of it)."""

    node: int
    at: int
    new: int


@dataclass(frozen=True)
class EvictKV:
    node: int


CacheOp = StoreKV | SplitKV | EvictKV


@dataclass(frozen=True)
class Reuse:
    """What one prompt takes from the cache: ``tokens`` tokens, read from ``segments`` in order."""

    tokens: int = 0
    segments: tuple[Segment, ...] = ()


@dataclass(eq=False)
class _Node:
    id: int
    tokens: tuple[int, ...]  # the tokens on the edge from the parent
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)  # first token -> child
    last_used: int = 0


@dataclass
class PrefixStats:
    """Running totals for metrics; the engine publishes the change after each step."""

    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    evictions: int = 0


class PrefixIndex:
    """Which token sequences have KV in the store, as a radix tree bounded by ``capacity`` tokens (and by
    ``max_nodes`` nodes when the store has a fixed number of slots)."""

    def __init__(self, capacity: int, max_nodes: int | None = None) -> None:
        self.capacity = capacity
        self.max_nodes = max_nodes
        self.root = _Node(0, (), None)
        self.held = 0  # tokens whose KV the store holds
        self.stats = PrefixStats()
        self._next_id = 1
        self._clock = 0

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    @property
    def nodes(self) -> int:
        return sum(1 for _ in self._below(self.root))

    def match(self, tokens: Sequence[int]) -> Reuse:
        """The longest cached prefix of ``tokens``; marks the nodes on it as just used."""
        if not self.enabled:
            return Reuse()
        path = self._descend(tokens)
        at = sum(used for _, used in path)
        self.stats.lookups += 1
        if at:
            self.stats.hits += 1
            self.stats.reused_tokens += at
        return Reuse(at, tuple((node.id, used) for node, used in path))

    def insert(self, tokens: Sequence[int], row: int) -> list[CacheOp]:
        """Keeps the KV of ``tokens`` (row ``row``'s first real tokens); returns the store's operations:
        at most one split, one store of the part not cached yet, and the evictions that make room."""
        if not self.enabled or not tokens:
            return []
        path = self._descend(tokens)
        ops: list[CacheOp] = []
        if path and path[-1][1] < len(path[-1][0].tokens):  # the tokens leave the tree mid-node
            ops.append(self._split(*path[-1]))
        node = path[-1][0] if path else self.root
        at = sum(used for _, used in path)
        new = len(tokens) - at
        if new == 0 or new > self.capacity:
            return ops + self._evict(keep=None)  # already held, or more than the whole cache may hold
        leaf = _Node(self._take_id(), tuple(tokens[at:]), node, last_used=self._clock)
        node.children[leaf.tokens[0]] = leaf
        self.held += new
        ops.append(StoreKV(leaf.id, row, at, len(tokens)))
        ops.extend(self._evict(keep=leaf))
        return ops

    def clear(self) -> None:
        """Forgets everything (the store is reset alongside, after a failed step)."""
        self.root, self.held = _Node(0, (), None), 0

    def _descend(self, tokens: Sequence[int]) -> list[tuple[_Node, int]]:
        """The nodes ``tokens`` runs through from the root, each with how many of its tokens match (only
        the last may match in part), all marked as just used."""
        tick, node, at = self._tick(), self.root, 0
        path: list[tuple[_Node, int]] = []
        while at < len(tokens) and (child := node.children.get(tokens[at])) is not None:
            same = _common(child.tokens, tokens, at)
            child.last_used = tick
            path.append((child, same))
            at += same
            if same < len(child.tokens):
                break
            node = child
        return path

    def _split(self, child: _Node, at: int) -> SplitKV:
        tail = _Node(self._take_id(), child.tokens[at:], child, child.children, child.last_used)
        for grandchild in tail.children.values():
            grandchild.parent = tail
        child.tokens, child.children = child.tokens[:at], {tail.tokens[0]: tail}
        return SplitKV(child.id, at, tail.id)

    def _evict(self, keep: _Node | None) -> list[CacheOp]:
        ops: list[CacheOp] = []
        while self.held > self.capacity or (self.max_nodes is not None and self.nodes > self.max_nodes):
            # least recently used leaf; a linear scan is fine for the few thousand nodes a cache holds
            leaves = (n for n in self._below(self.root) if not n.children and n is not keep)
            victim = min(leaves, key=lambda n: n.last_used, default=None)
            if victim is None:
                break
            assert victim.parent is not None
            del victim.parent.children[victim.tokens[0]]
            self.held -= len(victim.tokens)
            self.stats.evictions += 1
            ops.append(EvictKV(victim.id))
        return ops

    def _below(self, top: _Node) -> Iterator[_Node]:
        stack = list(top.children.values())
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            yield node

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1


def _common(edge: tuple[int, ...], tokens: Sequence[int], at: int) -> int:
    """How many of ``edge``'s tokens ``tokens[at:]`` starts with."""
    same = 0
    for ours, theirs in zip(edge, tokens[at : at + len(edge)], strict=False):
        if ours != theirs:
            break
        same += 1
    return same


Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), each (heads, tokens, head_dim)


class KVStore:
    """The tensors behind a ``PrefixIndex``: each node's KV, on the model's device."""

    def __init__(self) -> None:
        self.nodes: dict[int, Layers] = {}

    def apply(self, op: CacheOp, row_kv) -> None:
        """``row_kv(row, start, end)`` reads a running row's real tokens from the batch (for ``StoreKV``)."""
        if isinstance(op, StoreKV):
            self.nodes[op.node] = row_kv(op.row, op.start, op.end)
        elif isinstance(op, SplitKV):
            layers = self.nodes[op.node]
            self.nodes[op.node] = [(k[:, : op.at].clone(), v[:, : op.at].clone()) for k, v in layers]
            self.nodes[op.new] = [(k[:, op.at :].clone(), v[:, op.at :].clone()) for k, v in layers]
        else:
            del self.nodes[op.node]

    def read(self, segments: Sequence[Segment]) -> Layers:
        """The KV of a cached prefix, one (keys, values) per layer, its segments joined in order."""
        parts = [[(k[:, :used], v[:, :used]) for k, v in self.nodes[node]] for node, used in segments]
        return [
            (torch.cat([p[layer][0] for p in parts], dim=1), torch.cat([p[layer][1] for p in parts], dim=1))
            for layer in range(len(parts[0]))
        ]

    def clear(self) -> None:
        self.nodes.clear()
