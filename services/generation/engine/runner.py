"""What runs the model under the engine: the ``Runner`` protocol, and the order a step is applied in.

The scheduler decides everything a step does and writes it down as plain data (``ModelStep``); a runner only
scores the positions the step names, on KV memory of its own. What is not about running the model (scheduling,
the prefix tree, sampling, and next: speculation's drafts and their acceptance, grammar masks) lives above this
protocol once and serves every runner. Two implement it, in ``engine/runners/``: transformers' models over
their own KV cache, and llama.cpp on a GGUF file; the service picks one by name (``--runner``).

With tensor parallelism every rank holds a runner over its shard of the model and applies each step with
``execute_step``, so all meet in the same collectives; rank 0 samples from the logits, the others drop theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from services.generation.engine.prefix_cache import CacheOp
from services.generation.engine.scheduler import DecodeRow, ModelStep, PrefillChunk


@dataclass(frozen=True)
class RunnerMemory:
    """What the scheduler plans within: the KV one token holds, and the limits of the runner's KV memory."""

    kv_bytes_per_token: int  # keys and values of one token across the whole model (all ranks together)
    free_row_drops: bool = False  # a row leaves without copying the others', so finished rows leave at once
    max_prefix_nodes: int | None = None  # a runner with fixed slots bounds the prefix tree's nodes ...
    max_prefix_tokens: int | None = None  # ... and tokens below what --prefix-cache-bytes allows (None: no bound)


class Runner(Protocol):
    """The model side of a step. Rows are the running batch's, numbered in the order the scheduler keeps them;
    a runner never decides who runs, only holds their KV and scores what it is fed."""

    def memory(self) -> RunnerMemory:
        """The KV memory the scheduler plans within (read once, when the engine starts)."""
        ...

    def apply_cache_ops(self, ops: Sequence[CacheOp]) -> None:
        """The prefix cache's decisions, in order, on rows as the last step left them: ``StoreKV`` keeps a row's
        tokens as a node's KV, ``SplitKV`` cuts a node in two, ``EvictKV`` frees one. A later ``PrefillChunk``
        names the nodes a new row starts from."""
        ...

    def keep_rows(self, rows: Sequence[int]) -> None:
        """Frees every running row not in ``rows``; the rows kept are numbered in the order given."""
        ...

    def forward(self, decode: Sequence[DecodeRow], prefill: PrefillChunk | None) -> torch.Tensor | None:
        """One pass of the model over the positions the step names; their logits (positions, vocab), or None
        when it names none.

        ``decode`` holds an entry for every running row: its last ``rejected`` positions leave its KV (draft
        tokens the sampler turned down), then ``token`` and each ``draft`` token are fed and scored, 1 +
        len(draft) positions a row. ``prefill`` runs columns ``start:end`` of the group joining (its first chunk
        starts the group from ``prompts`` and the cached prefixes in ``reuse``); on its last chunk each of the
        group's rows is scored at its last prompt token and the group joins the running rows, after them.
        Logits come in that order: the decoding rows' positions, row by row, then the group's rows."""
        ...

    def reset(self) -> None:
        """Forgets every row and every prefix node (after a failed step; the scheduler forgets its side)."""
        ...


def execute_step(runner: Runner, step: ModelStep) -> torch.Tensor | None:
    """``step`` on ``runner``: the cache operations read rows before any leave, and rows leave before the model
    runs. Every rank runs this, so all apply the same operations to their shard."""
    runner.apply_cache_ops(step.cache_ops)
    if step.keep is not None:
        runner.keep_rows(step.keep)
    return runner.forward(step.decode, step.prefill)
